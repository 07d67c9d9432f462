"""Ratings that recommend: biased NMF on observed entries, read from rating lists as they come."""

import contextlib
import io
import json
import re

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import run_cli

from nmf_lightning import NMF
from nmf_lightning.data import Matrix
from nmf_lightning.data.files import from_file
from nmf_lightning.data.holdout import split_holdout
from nmf_lightning.engine import Problem, Source, Spec
from nmf_lightning.params import CLI_WORDS
from nmf_lightning.solvers.registry import lookup
from nmf_lightning.train import train
from nmf_lightning.transform import main, transform
from nmf_lightning.validation import NMFInputError


def test_a_rating_list_with_a_header_line_reads_without_skip_header(tmp_path):
    """RecBole's ml-100k.inter starts with ``user_id:token item_id:token rating:float timestamp:float``."""
    rows = ["196\t242\t3\t881250949", "186\t302\t3\t891717742", "196\t302\t5\t881250950"]
    header = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
    (tmp_path / "ml.inter").write_text("\n".join([header, *rows]) + "\n")
    (tmp_path / "u.data").write_text("\n".join(rows) + "\n")
    (tmp_path / "commented.tsv").write_text("\n".join(["", "# exported ratings", header, *rows]) + "\n")
    plain = from_file(str(tmp_path / "u.data"), layout="triplets", unstored="missing")
    for name in ("ml.inter", "commented.tsv"):
        headed = from_file(str(tmp_path / name), layout="triplets", unstored="missing")
        assert (headed.X != plain.X).nnz == 0 and headed.col_names == plain.col_names == ["242", "302"]
    np.testing.assert_array_equal(plain.X.toarray(), [[0, 3], [3, 5]])
    (tmp_path / "late.tsv").write_text("\n".join([header, rows[0], "186\t302\tfive\t1"]) + "\n")
    with pytest.raises(ValueError, match=r"data row 2 holds the value 'five' in its third column"):
        from_file(str(tmp_path / "late.tsv"), layout="triplets")


# ------------------------------------------------------------- l2 per observed entry (ALS-WR)
def _masked_problem(solver: str, fraction: float = 0.5, **spec):
    rng = np.random.default_rng(0)
    X = rng.random((30, 4)) @ rng.random((4, 20))
    X[rng.random(X.shape) < fraction] = np.nan
    options = {"rank": 4, "optimizer": lookup(solver).factory, "loss": "fro2", "init": "random", **spec}
    source = Source.in_memory(X, torch.float64, "cpu", observed=lookup(solver).observed)
    return X, Problem(Spec(**options), source, torch.float64)


def test_count_scaled_l2_weighs_each_column_by_its_observed_entries():
    """ALS's H-update with l2_scale=count solves (G_j + l2_H n_j I) h_j = W^T x_j per column, as ALS-WR does."""
    X, problem = _masked_problem("als", l2_H=0.3, l2_scale="count")
    W, H = problem.initial_factors()
    G_W = torch.rand(W.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    new = problem.rule().update_h(problem.blocks, G_W, H, 0.0, problem.l2_weights()[1])
    observed = ~np.isnan(X)
    for j in range(X.shape[1]):
        Wj = G_W.numpy()[observed[:, j]]
        G = Wj.T @ Wj
        G += (0.3 * observed[:, j].sum() + 1e-6 * np.diag(G).mean()) * np.eye(4)
        expected = np.clip(np.linalg.solve(G, Wj.T @ X[observed[:, j], j]), 0, None)
        np.testing.assert_allclose(new[:, j].numpy(), expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("solver", ["mu", "hals", "als"])
def test_count_scaled_l2_objective_falls_and_equals_the_hand_written_one(solver):
    X, problem = _masked_problem(solver, l2_W=0.05, l2_H=0.1, l2_scale="count")
    W, H = problem.initial_factors()
    observed = ~np.isnan(X)

    def by_hand(W, H):
        R = np.where(observed, X - W.numpy() @ H.numpy(), 0.0)
        rows, cols = observed.sum(1)[:, None], observed.sum(0)[None, :]
        return 0.5 * (R**2).sum() + 0.025 * (rows * W.numpy() ** 2).sum() + 0.05 * (cols * H.numpy() ** 2).sum()

    losses = [float(problem.loss(W, H))]
    assert losses[0] == pytest.approx(by_hand(W, H), rel=1e-12)
    update = problem.update(problem.rule())
    for _ in range(20):
        problem.fit(W, H, update, 1)
        losses.append(float(problem.loss(W, H)))
    assert losses[-1] == pytest.approx(by_hand(W, H), rel=1e-12)
    if solver != "als":  # MU and HALS never raise their objective (projected ALS may)
        assert all(b <= a * (1 + 1e-12) for a, b in zip(losses, losses[1:], strict=False))
    assert losses[-1] < 0.5 * losses[0]


def test_count_scaling_is_scikit_learns_on_a_complete_x():
    """Every row of a complete X has n_features entries: alpha scaled per entry is alpha scaled by size."""
    X = np.random.default_rng(0).random((40, 12))
    options = {"solver": "mu", "alpha_W": 0.01, "alpha_H": 0.02, "random_state": 0, "max_iter": 30, "tol": 0}
    plain, counted = NMF(4, **options), NMF(4, l2_scale="count", **options)
    np.testing.assert_allclose(counted.fit_transform(X), plain.fit_transform(X), rtol=1e-12)
    np.testing.assert_allclose(counted.components_, plain.components_, rtol=1e-12)


# ------------------------------------------------------------------------------ biased NMF
def _ratings(n: int, m: int, observed: float, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Biased low-rank ratings with noise, sampled sparsely, and the values without noise.

    X = mu + b_i + c_j + (W H)_ij + N(0, 0.3) at a share ``observed`` of the entries, NaN
    elsewhere (ratings are >= 0: the few below 0, 4 sigma out, are clipped).
    """
    rng = np.random.default_rng(seed)
    W, H = rng.gamma(2.0, 0.4, (n, k)), rng.gamma(2.0, 0.4, (k, m))
    clean = 3.0 + rng.normal(0, 0.5, (n, 1)) + rng.normal(0, 0.5, (1, m)) + W @ H
    X = np.clip(clean + rng.normal(0, 0.3, (n, m)), 0.0, None)
    X[rng.random((n, m)) >= observed] = np.nan
    return X, clean


def _floor(X: np.ndarray, clean: np.ndarray) -> float:
    """The held-out RMSE of the model that made X (data.holdout=0.1, holdout_seed 0): the noise floor."""
    held = split_holdout(Matrix(X), 0.1, seed=0)[1]
    return float(np.sqrt(np.mean((clean[held.rows, held.cols] - held.values) ** 2)))


def _triplets_file(path, X: np.ndarray) -> None:
    """X's observed entries as a rating list with a header line, as RecBole writes one."""
    rows, cols = np.nonzero(~np.isnan(X))
    lines = [f"{i}\t{j}\t{X[i, j]:.17g}" for i, j in zip(rows, cols, strict=True)]
    path.write_text("user_id:token\titem_id:token\trating:float\n" + "\n".join(lines) + "\n")


RATINGS = ("data=file", "data.layout=triplets", "data.unstored=missing", "data.holdout=0.1", "logger=none")
ALS_WR = ("model.l2_W=0.001", "model.l2_H=0.001", "model.l2_scale=count", "model.loss=fro2", "model.rank=3")


def test_biased_nmf_reaches_the_noise_floor_of_biased_ratings(make_cfg, tmp_path):
    """144,000 planted biased ratings: the held-out RMSE comes within 5% of the noise; without biases it cannot."""
    X, clean = _ratings(1000, 800, observed=0.2)
    _triplets_file(tmp_path / "r.tsv", X)
    common = (*RATINGS, f"data.path={tmp_path / 'r.tsv'}", "optimizer=als", "trainer.max_steps=60", *ALS_WR)
    floor = _floor(X, clean)
    biased = train(make_cfg(*common, "model.biases=true"))
    assert floor < biased["val_rmse"] < 1.05 * floor
    plain = train(make_cfg(*common))
    assert plain["val_rmse"] > 1.2 * biased["val_rmse"]  # offsets below the mean: W H >= 0 cannot hold them


@pytest.mark.parametrize(("solver", "steps"), [("als", 30), ("mu", 200), ("adam", 400)])
def test_biases_train_with_closed_form_and_gradient_solvers(make_cfg, tmp_path, solver, steps):
    """27,000 ratings: each kind of solver takes the biases' steps and ends near the floor (fewer ratings: 10% over)."""
    X, clean = _ratings(400, 300, observed=0.25)
    np.save(tmp_path / "r.npy", X)  # NaN at the missing entries: kept as triplets for the biased model
    options = ("data=file", f"data.path={tmp_path / 'r.npy'}", "data.holdout=0.1", "logger=none", *ALS_WR)
    options += (f"optimizer={solver}", f"trainer.max_steps={steps}", "model.biases=true")
    metrics = train(make_cfg(*options, *(("optimizer.lr=0.02",) if solver == "adam" else ())))
    assert metrics["val_rmse"] < 1.12 * _floor(X, clean)
    with np.load(tmp_path / "factors.npz") as f:
        mu, b, c, W, H = float(f["mu"]), f["b"], f["c"], f["W"], f["H"]
    assert b.shape == (400,) and c.shape == (300,) and (b < 0).any() and (c < 0).any()  # unconstrained
    assert (W >= 0).all() and (H >= 0).all()
    trained = split_holdout(Matrix(X), 0.1, seed=0)[0].X  # the training entries: the held-out ones are NaN
    residual = (mu + b[:, None] + c[None, :] + W.astype(np.float64) @ H - trained)[~np.isnan(trained)]
    assert metrics["rmse"] == pytest.approx(np.sqrt(np.mean(residual**2)), rel=1e-4)  # the model factors.npz holds


def _hand_update(X: sp.csr_matrix, W, H, mu, b, c, l2: float, l2_bias: float):
    """One biased ALS-WR update written out: b, then W, then H, then mu and c, each exact for the others."""
    C = X.tocoo()
    rows, cols, vals = (torch.from_numpy(A) for A in (C.row.astype(np.int64), C.col.astype(np.int64), C.data))
    n, m = X.shape
    n_i, n_j = torch.bincount(rows, minlength=n).double(), torch.bincount(cols, minlength=m).double()
    wh = lambda W, H: (W[rows] * H[:, cols].T).sum(-1)  # noqa: E731

    def ridge(index, size, F, target, counts):  # min over each row g of sum (target - F g)^2 + l2 n ||g||^2, g >= 0
        G = torch.zeros(size, F.shape[1], F.shape[1], dtype=torch.float64).index_add_(
            0, index, F[:, :, None] * F[:, None]
        )
        G += (l2 * counts)[:, None, None] * torch.eye(F.shape[1], dtype=torch.float64)
        rhs = torch.zeros(size, F.shape[1], dtype=torch.float64).index_add_(0, index, target[:, None] * F)
        return torch.linalg.solve(G, rhs).clamp_min(0)

    b = torch.zeros(n, dtype=torch.float64).index_add_(0, rows, vals - mu - c[cols] - wh(W, H)) / (n_i + l2_bias)
    target = vals - mu - b[rows] - c[cols]
    W = ridge(rows, n, H[:, cols].T, target, n_i)
    H = ridge(cols, m, W[rows], target, n_j).T
    mu = mu + (vals - mu - b[rows] - c[cols] - wh(W, H)).mean()
    c = torch.zeros(m, dtype=torch.float64).index_add_(0, cols, vals - mu - b[rows] - wh(W, H)) / (n_j + l2_bias)
    return W, H, mu, b, c


def test_a_biased_update_is_the_written_out_alternation():
    """The engine's update of (b, W, H, mu, c) against the formulas, written out on a small ratings matrix."""
    X = sp.random(30, 20, density=0.3, random_state=1, format="csr")
    X.data = np.random.default_rng(0).integers(1, 6, X.nnz).astype(float)
    spec = Spec(rank=3, optimizer=lookup("als").factory, biases=True, l2_bias=2.0, l2_W=0.1, l2_H=0.1, l2_scale="count")
    problem = Problem(
        spec, Source.in_memory(X, torch.float64, "cpu", unstored_missing=True, biased=True), torch.float64
    )
    W, H = problem.initial_factors()
    biases = problem.biases
    start = (W.clone(), H.clone(), biases.mu[0, 0].clone(), biases.b[:, 0].clone(), biases.c[0].clone())
    problem.fit(W, H, problem.update(problem.rule()), 1)
    expected = _hand_update(X, *start, l2=0.1, l2_bias=2.0)
    for got, want in zip((W, H, biases.mu[0, 0], biases.b[:, 0], biases.c[0]), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # (ALS's relative ridge of 1e-6 apart)


def test_mu_with_biases_never_raises_the_objective():
    """MU steps (the target below 0 in the denominator) and the biases' exact steps: each lowers the objective."""
    X, _ = _ratings(60, 50, observed=0.3)
    spec = Spec(rank=3, optimizer=lookup("mu").factory, loss="fro2", biases=True, l2_bias=3.0, l2_W=0.1, l2_H=0.1)
    problem = Problem(spec, Source.in_memory(X, torch.float64, "cpu", biased=True), torch.float64)
    W, H = problem.initial_factors()
    biases, update = problem.biases, problem.update(problem.rule())

    def objective() -> float:  # the loss with the biases' shrinkage, which the loss leaves out
        shrink = 0.5 * 3.0 * float((biases.b**2).sum() + (biases.c**2).sum())
        return float(problem.loss(W, H)) + shrink

    losses = [objective()]
    for _ in range(40):
        problem.fit(W, H, update, 1)
        losses.append(objective())
    assert all(b <= a * (1 + 1e-12) for a, b in zip(losses, losses[1:], strict=False))
    assert losses[-1] < 0.2 * losses[0] and (W >= 0).all() and (H >= 0).all()


def _run_files(tmp_path):
    X, _ = _ratings(120, 80, observed=0.3)
    np.save(tmp_path / "dense.npy", X)
    _triplets_file(tmp_path / "r.tsv", X)
    return {"dense": tmp_path / "dense.npy", "ratings": tmp_path / "r.tsv"}


def _outputs(folder) -> dict[str, np.ndarray]:
    with np.load(folder / "factors.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("layout", ["ratings", "dense"])
@pytest.mark.parametrize("solver", ["als", "adam"])
def test_streamed_row_blocks_equal_the_matrix_in_memory(make_cfg, tmp_path, layout, solver):
    path = _run_files(tmp_path)[layout]
    options = ("data=file", f"data.path={path}", "trainer.precision=64-true", "logger=none", "trainer.max_steps=15")
    options += (f"optimizer={solver}", "model.biases=true", "model.l2_bias=2", *ALS_WR)
    if layout == "ratings":  # (a .npy file streams from disk, where entries cannot be held out)
        options += ("data.layout=triplets", "data.unstored=missing", "data.holdout=0.1")
    whole = train(make_cfg(*options, f"paths.output_dir={tmp_path / 'whole'}"))
    streamed = train(make_cfg(*options, "data.batch_rows=25", f"paths.output_dir={tmp_path / 'streamed'}"))
    for key in ("rmse", "loss", *(("val_rmse",) if layout == "ratings" else ())):
        assert streamed[key] == pytest.approx(whole[key], rel=1e-9)
    a, b = _outputs(tmp_path / "whole"), _outputs(tmp_path / "streamed")
    assert sorted(a) == ["H", "W", "b", "c", "mu"]
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-8, atol=1e-10)


def test_the_cli_and_the_estimator_fit_the_same_biased_model(make_cfg, tmp_path):
    X = _run_files(tmp_path)["dense"]
    options = ("data=file", f"data.path={X}", "trainer.precision=64-true", "logger=none", "trainer.max_steps=12")
    options += ("optimizer=als", "model.biases=true", "model.l2_bias=2", "model.rank=3", "model.l2_W=0.05")
    options += ("model.l2_H=0.05", "model.l2_scale=count", "model.loss=fro2", "seed=4")
    train(make_cfg(*options))
    cli = _outputs(tmp_path)
    est = NMF(3, solver="als", init="random", biases=True, l2_bias=2, alpha_W=0.05, l2_scale="count", max_iter=12)
    est.set_params(tol=0, random_state=4)
    W = est.fit_transform(np.load(X))
    for got, want in ((W, cli["W"]), (est.components_, cli["H"]), (est.row_bias_, cli["b"]), (est.col_bias_, cli["c"])):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert est.intercept_ == pytest.approx(float(cli["mu"]), rel=1e-12)


# ---------------------------------------------------------------------------- rating range
def test_rating_range_clips_the_held_out_predictions_and_travels_with_the_factors(make_cfg, tmp_path):
    X, _ = _ratings(150, 100, observed=0.3)
    X = np.clip(X, 1.0, 5.0)  # a 1-5 scale, where a fit predicts beyond either end now and then
    np.save(tmp_path / "r.npy", X)
    options = ("data=file", f"data.path={tmp_path / 'r.npy'}", "data.holdout=0.1", "logger=none", *ALS_WR)
    options += ("optimizer=als", "model.biases=true", "trainer.max_steps=20", "trainer.precision=64-true")
    clipped = train(make_cfg(*options, "data.rating_range=[1,5]"))
    out = _outputs(tmp_path)
    np.testing.assert_array_equal(out["rating_range"], [1.0, 5.0])
    held = split_holdout(Matrix(X), 0.1, seed=0)[1]
    r, c = held.rows, held.cols
    raw = out["mu"] + out["b"][r] + out["c"][c] + (out["W"][r] * out["H"][:, c].T).sum(1)
    assert ((raw < 1) | (raw > 5)).sum() > 5  # the clip has work to do
    assert clipped["val_rmse"] == pytest.approx(np.sqrt(np.mean((np.clip(raw, 1, 5) - held.values) ** 2)), rel=1e-9)
    free = train(make_cfg(*options))
    assert free["val_rmse"] == pytest.approx(np.sqrt(np.mean((raw - held.values) ** 2)), rel=1e-9)
    assert clipped["val_rmse"] < free["val_rmse"]  # the same factors: only the clip differs
    assert clipped["rmse"] == free["rmse"]  # training reads the unclipped model


def test_the_estimator_predicts_entries_with_its_biases_within_the_rating_range():
    X, _ = _ratings(150, 100, observed=0.3)
    X = np.clip(X, 1.0, 5.0)
    est = NMF(3, solver="als", biases=True, rating_range=(1, 5), max_iter=20, random_state=0)
    W = est.fit_transform(X)
    rows, cols = np.nonzero(np.isnan(X))  # the entries a recommender fills in
    got = est.predict_entries(rows, cols)
    raw = est.intercept_ + est.row_bias_[rows] + est.col_bias_[cols] + (W[rows] * est.components_[:, cols].T).sum(1)
    assert ((raw < 1) | (raw > 5)).any()
    np.testing.assert_allclose(got, np.clip(raw, 1, 5), rtol=1e-12)
    np.testing.assert_allclose(
        NMF(**{**est.get_params(), "rating_range": None}).fit(X).predict_entries(rows, cols), raw
    )
    with pytest.raises(ValueError, match=r"rows must index X's 150 rows \(0 to 149\), got 0 to 150"):
        est.predict_entries([0, 150], [0, 1])
    with pytest.raises(ValueError, match=r"rows and cols must have the same length, got 2 and 1"):
        est.predict_entries([0, 1], [0])
    with pytest.raises(ValueError, match=r"cols must be a 1-D sequence of integers"):
        est.predict_entries([0], [0.5])
    with pytest.raises(ValueError, match=r"inverse_transform cannot restore X from W alone with biases=True"):
        est.inverse_transform(W)  # W H without mu + b + c is not X


# ------------------------------------------------------------------------- refused settings
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("optimizer=hals",), r"optimizer=hals cannot fit model.biases=true: a biased model reads X as its observed "
                              r"entries only; use optimizer=mu or als, or a gradient solver"),
        (("optimizer=kaczmarz",), r"optimizer=kaczmarz cannot fit model.biases=true"),
        (("model.loss=kl",), r"model.biases=true adds unconstrained biases to W H, which the model.loss=kl family"),
        (("model.restarts=2",), r"model.biases=true trains one start, but model.restarts=2; set model.restarts=1"),
        (("model.online=true", "data.batch_rows=10"), r"model.biases=true takes its column biases' step from a whole"),
        (("model.rank=auto",), r"model.rank=auto chooses the rank of an unbiased model"),
        (("data.rating_range=[5,1]",), r"data.rating_range must be null or a pair \[low, high\] of finite numbers "
                                       r"with low < high \(the scale predictions are clipped to\), got \[5, 1\]"),
        (("data.rating_range=[1,2,5]",), r"data.rating_range must be null or a pair"),
        (("model.l2_bias=-1",), r"model.l2_bias must be a finite number >= 0 \(the biases' shrinkage"),
        (("model.l2_scale=rows",), r"model.l2_scale must be one of 'none', 'count'"),
        (("data.unstored=zero",), r"model.biases=true predicts ratings at the observed entries, but X is sparse with "
                                  r"its unstored entries observed zeros; set data.unstored=missing"),
    ],
    ids=["hals", "kaczmarz", "kl", "restarts", "online", "rank-auto", "range-reversed", "range-three", "l2-bias",
         "l2-scale", "sparse-zeros"],
)  # fmt: skip
def test_what_a_biased_model_cannot_take_is_refused_before_any_work(make_cfg, tmp_path, overrides, message):
    X, _ = _ratings(40, 30, observed=0.3)
    _triplets_file(tmp_path / "r.tsv", X)
    options = ("data=file", f"data.path={tmp_path / 'r.tsv'}", "data.layout=triplets", "data.unstored=missing")
    options += ("optimizer=als", "model.biases=true", "model.rank=3", "logger=none", *overrides)
    with pytest.raises(NMFInputError, match=message):
        train(make_cfg(*options, f"paths.output_dir={tmp_path / 'run'}"))
    assert not (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "run" / "factors.npz").exists()


def test_projected_als_that_diverges_without_a_ridge_says_which_ridge_steadies_it():
    X, _ = _ratings(60, 40, observed=0.3)
    problem = Problem(
        Spec(rank=3, optimizer=lookup("als").factory, biases=True),
        Source.in_memory(X, torch.float32, "cpu", biased=True),
    )
    error = problem.diverged(None, 13, 14, None, None, CLI_WORDS)  # the block of update 14
    assert str(error) == (
        "the loss became nan at update 14; check X for extreme values, or steady ALS's solves with a ridge "
        "(model.l2_W, model.l2_H)."
    )


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"solver": "cd"}, r"solver='cd' cannot fit biases=True: a biased model reads X as its observed entries only; "
                           r"use solver='mu' or 'als', or a gradient solver"),
        ({"beta_loss": "kullback-leibler", "solver": "mu"}, r"biases=True adds unconstrained biases to W H"),
        ({"n_components": "auto"}, r"n_components='auto' chooses the rank of an unbiased model"),
        ({"rating_range": (5, 1)}, r"rating_range must be None or a pair \[low, high\]"),
        ({"l2_bias": -1.0}, r"l2_bias must be a finite number >= 0"),
    ],
    ids=["cd", "kl", "auto", "range", "l2-bias"],
)  # fmt: skip
def test_the_estimator_refuses_the_same_settings_before_reading_x(params, message):
    with pytest.raises(ValueError, match=message):
        NMF(**{"n_components": 3, "solver": "als", "biases": True, **params}).fit(np.full((4, 3), np.nan))
    with pytest.raises(ValueError, match=r"biases=True predicts ratings at the observed entries, but X is sparse"):
        NMF(3, solver="als", biases=True).fit(sp.random(20, 10, density=0.5, format="csr", random_state=0))


def test_a_biased_run_resumes_from_its_checkpoint_as_a_straight_run(make_cfg, tmp_path):
    X, _ = _ratings(60, 40, observed=0.4)
    _triplets_file(tmp_path / "r.tsv", X)
    common = (*RATINGS, f"data.path={tmp_path / 'r.tsv'}", "optimizer=als", "model.biases=true", "model.l2_bias=2")
    common += (*ALS_WR, "trainer.precision=64-true", "model.inner_steps=5")
    straight = train(make_cfg(*common, "trainer.max_steps=20", f"paths.output_dir={tmp_path / 'straight'}"))
    train(make_cfg(*common, "trainer.max_steps=10", f"paths.output_dir={tmp_path / 'half'}"))
    ckpt = tmp_path / "half" / "checkpoints" / "last.ckpt"
    resumed = train(
        make_cfg(*common, "trainer.max_steps=20", f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path / 'r'}")
    )
    assert resumed["val_rmse"] == pytest.approx(straight["val_rmse"], rel=1e-12)
    a, b = _outputs(tmp_path / "straight"), _outputs(tmp_path / "r")
    for name in ("W", "H", "mu", "b", "c"):
        np.testing.assert_allclose(b[name], a[name], rtol=1e-12, atol=1e-14)
    unbiased = tuple(o for o in common if o != "model.biases=true")
    with pytest.raises(NMFInputError, match=r"was trained with model.biases=true, this run has model.biases=false"):
        train(make_cfg(*unbiased, "trainer.max_steps=20", f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path / 'x'}"))


@pytest.mark.slow  # two ranks in subprocesses
@pytest.mark.ddp
def test_two_ranks_fit_the_biased_model_of_one_process_and_share_its_checkpoints(make_cfg, tmp_path):
    """b is sharded with W's rows, mu and c come from sums over both ranks, as H does."""
    X, _ = _ratings(61, 40, observed=0.4)  # 61 rows: the ranks hold 30 and 31
    _triplets_file(tmp_path / "r.tsv", X)
    common = (*RATINGS, f"data.path={tmp_path / 'r.tsv'}", "optimizer=mu", "model.biases=true", "model.l2_bias=2")
    common += (*ALS_WR, "trainer.precision=64-true", "++trainer.enable_progress_bar=false")
    common += ("++callbacks.progress_bar=null", "trainer.accelerator=cpu")
    ddp = tmp_path / "ddp"
    result = run_cli(*common, "trainer=ddp", "trainer.devices=2", "trainer.max_steps=20", f"hydra.run.dir={ddp}",
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    one = train(make_cfg(*common, "trainer.max_steps=20", f"paths.output_dir={tmp_path / 'one'}"))
    a, b = _outputs(ddp), _outputs(tmp_path / "one")
    for name in ("W", "H", "mu", "b", "c"):
        np.testing.assert_allclose(a[name], b[name], rtol=1e-10, atol=1e-12)
    assert json.loads((ddp / "metrics.json").read_text())["val_rmse"] == pytest.approx(one["val_rmse"], rel=1e-10)
    state = torch.load(ddp / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert state["b"].shape == (61, 1)  # all rows of b, gathered
    resumed = train(make_cfg(*common, "trainer.max_steps=30", f"ckpt_path={ddp / 'checkpoints' / 'last.ckpt'}",
                             f"paths.output_dir={tmp_path / 'r'}"))  # fmt: skip
    straight = train(make_cfg(*common, "trainer.max_steps=30", f"paths.output_dir={tmp_path / 's'}"))
    assert resumed["val_rmse"] == pytest.approx(straight["val_rmse"], rel=1e-10)
    again = tmp_path / "again"  # one process's checkpoint, resumed on two ranks: each keeps its rows of b
    result = run_cli(*common, "trainer=ddp", "trainer.devices=2", "trainer.max_steps=30", f"hydra.run.dir={again}",
                     f"ckpt_path={tmp_path / 'one' / 'checkpoints' / 'last.ckpt'}", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for name, value in _outputs(again).items():
        np.testing.assert_allclose(value, _outputs(tmp_path / "s")[name], rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------- new rows: transform
def test_transform_solves_new_rows_and_their_biases_with_the_fitted_ones_held(make_cfg, tmp_path):
    """Rows made by the model itself (their own b, W) are completed exactly from half of their entries."""
    rng = np.random.default_rng(3)
    H, c, mu = rng.gamma(2.0, 0.5, (3, 40)), rng.normal(0, 0.5, 40), 3.0
    W_new, b_new = rng.gamma(2.0, 0.5, (25, 3)), rng.normal(0, 0.5, 25)
    truth = mu + b_new[:, None] + c[None, :] + W_new @ H
    X_new = np.where(rng.random(truth.shape) < 0.5, truth, np.nan)
    for solver in ("als", "mu"):
        W, b = transform(X_new, H, solver, max_iter=3000, tol=1e-12, biases=(mu, c))
        filled = mu + b[:, None] + c[None, :] + W @ H
        np.testing.assert_allclose(
            filled, truth, rtol=0, atol=2e-3 if solver == "mu" else 1e-4
        )  # (ALS: its relative ridge)
    # nmf-transform: a run's factors.npz, new users' ratings with NaN where they rated nothing
    X, _ = _ratings(120, 80, observed=0.4)
    X = np.clip(X, 1.0, 5.0)
    np.save(tmp_path / "r.npy", X)
    options = ("data=file", f"data.path={tmp_path / 'r.npy'}", "logger=none", *ALS_WR, "optimizer=als")
    train(make_cfg(*options, "model.biases=true", "trainer.max_steps=20", "data.rating_range=[1,5]"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main([str(tmp_path), str(tmp_path / "r.npy"), "--out", str(tmp_path / "W.npy"), "--solver", "als",
              "--predictions", str(tmp_path / "p.npy")])  # fmt: skip
    values = np.load(tmp_path / "p.npy")
    assert values.shape == (120, 80) and values.min() >= 1.0 and values.max() <= 5.0
    rmse = float(re.search(r"RMSE (\S+) at the (\d+) entries, predictions within \[1\.0, 5\.0\]", out.getvalue())[1])
    assert rmse == pytest.approx(np.sqrt(np.nanmean((values - X) ** 2)), rel=1e-5)
    with np.load(tmp_path / "factors.npz") as f:
        trained = np.clip(f["mu"] + f["b"][:, None] + f["c"][None, :] + f["W"] @ f["H"], 1, 5)
    assert rmse < 1.1 * np.sqrt(np.nanmean((trained - X) ** 2))  # the training rows, solved again: as good a fit


def test_nmf_transform_reads_a_sparse_matrix_of_ratings_as_the_run_read_x(tmp_path, capsys):
    """A run with data.unstored=missing: new rows in a sparse .npz (stored = rated) solve as the same rows with NaN."""
    X, _ = _ratings(60, 40, observed=0.3)
    rng = np.random.default_rng(1)
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    np.savez(run / "factors.npz", W=np.ones((60, 3)), H=rng.gamma(2.0, 0.5, (3, 40)), mu=3.0, b=np.zeros(60),
             c=rng.normal(0, 0.3, 40))  # fmt: skip
    (run / ".hydra" / "config.yaml").write_text("data:\n  unstored: missing\nmodel:\n  loss: fro\n")
    np.save(tmp_path / "dense.npy", X)
    sp.save_npz(tmp_path / "sparse.npz", sp.csr_matrix(np.nan_to_num(X)))  # (no rating is exactly 0)
    outputs = {}
    for name in ("dense.npy", "sparse.npz"):
        main([str(run), str(tmp_path / name), "--out", str(tmp_path / f"W_{name}.npy"), "--solver", "als"])
        said = capsys.readouterr().out
        rmse = re.search(r"RMSE (\S+) at the (\d+) entries", said).groups()
        outputs[name] = np.load(tmp_path / f"W_{name}.npy"), rmse
    np.testing.assert_allclose(outputs["sparse.npz"][0], outputs["dense.npy"][0], rtol=1e-10, atol=1e-12)
    assert outputs["sparse.npz"][1] == outputs["dense.npy"][1]
    assert int(outputs["dense.npy"][1][1]) == (~np.isnan(X)).sum()
    assert "the run read data.unstored=missing" in said
    with pytest.raises(SystemExit) as exit_:  # the same file read with zeros observed: a biased model refuses it
        main([str(run), str(tmp_path / "sparse.npz"), "--out", str(tmp_path / "W.npy"), "--unstored", "zero"])
    assert exit_.value.code == 2 and "(nmf-transform --unstored missing)" in capsys.readouterr().err
    np.savez(run / "factors.npz", W=np.ones((60, 3)), H=rng.gamma(2.0, 0.5, (3, 40)))  # no biases: relative error
    errors = []
    for name in ("dense.npy", "sparse.npz"):
        main([str(run), str(tmp_path / name), "--out", str(tmp_path / "W.npy"), "--solver", "mu"])
        errors.append(re.search(r"relative error (\S+)", capsys.readouterr().out)[1])
    assert errors[0] == errors[1]


def test_the_ratings_experiment_beats_the_mean_rating_on_a_rating_list_as_it_comes(make_cfg, tmp_path):
    """experiment=ratings on a u.data-like list of 1-5 stars (a header line, timestamps): better than the mean."""
    X, _ = _ratings(300, 200, observed=0.15, k=4)
    X = np.rint(np.clip(X, 1, 5))  # whole stars
    rows, cols = np.nonzero(~np.isnan(X))
    lines = [
        f"{i + 1}\t{j + 1}\t{int(X[i, j])}\t{881250949 + n}" for n, (i, j) in enumerate(zip(rows, cols, strict=True))
    ]
    (tmp_path / "u.data").write_text("user_id\titem_id\trating\ttimestamp\n" + "\n".join(lines) + "\n")
    cfg = make_cfg("experiment=ratings", f"data.path={tmp_path / 'u.data'}", "logger=none")
    assert cfg.optimizer._target_.endswith("ALS") and cfg.model.biases and cfg.data.rating_range == [1, 5]
    metrics = train(cfg)
    held = split_holdout(Matrix(X), 0.1, seed=0)[1]  # the same entries: ids in numeric order are X's rows
    mean = np.nanmean(split_holdout(Matrix(X), 0.1, seed=0)[0].X)
    assert metrics["val_rmse"] < 0.9 * np.sqrt(np.mean((held.values - mean) ** 2))
    assert metrics["steps"] == 30 and json.loads((tmp_path / "metrics.json").read_text())["status"] == "completed"


@pytest.mark.gpu
@pytest.mark.parametrize("solver", ["als", "mu", "adam"])
@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_the_biased_model_on_cuda_follows_the_cpu(make_cfg, tmp_path, solver, streamed):
    X, _ = _ratings(200, 120, observed=0.3)
    _triplets_file(tmp_path / "r.tsv", X)
    options = (*RATINGS, f"data.path={tmp_path / 'r.tsv'}", f"optimizer={solver}", "model.biases=true", *ALS_WR)
    options += ("trainer.precision=64-true", "trainer.max_steps=15", "data.rating_range=[1,5]", "model.l2_bias=2")
    options += ("data.batch_rows=64",) if streamed else ()
    options += ("optimizer.lr=0.02",) if solver == "adam" else ()
    runs = {acc: train(make_cfg(*options, f"trainer.accelerator={acc}", f"paths.output_dir={tmp_path / acc}"))
            for acc in ("cpu", "gpu")}  # fmt: skip
    assert runs["gpu"]["val_rmse"] == pytest.approx(runs["cpu"]["val_rmse"], rel=1e-8)
    cpu, gpu = _outputs(tmp_path / "cpu"), _outputs(tmp_path / "gpu")
    for name in ("W", "H", "mu", "b", "c"):
        np.testing.assert_allclose(gpu[name], cpu[name], rtol=1e-6, atol=1e-9)
    est = {device: NMF(3, solver=solver if solver != "adam" else "als", biases=True, device=device, max_iter=10)
           for device in ("cpu", "cuda")}  # fmt: skip
    dense = np.clip(X, 1, 5)
    for model in est.values():
        model.set_params(random_state=0, rating_range=(1, 5)).fit(dense)
    np.testing.assert_allclose(est["cuda"].predict_entries([0, 5], [1, 7]), est["cpu"].predict_entries([0, 5], [1, 7]))
