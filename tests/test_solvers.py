import re

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.decomposition import NMF

from nmf_lightning.data import digits, known_factors
from nmf_lightning.engine import DenseBlock, MaskedBlock, ObservedBlock, SolverUpdate, SparseBlock, fit, to_block
from nmf_lightning.init import initialize
from nmf_lightning.solvers import HALS, MU, hals, mu
from nmf_lightning.solvers.rules import ALSRule
from nmf_lightning.train import train
from nmf_lightning.validation import NMFInputError

RULES = {"mu": mu, "hals": hals}


def _problem(n=30, m=20, k=4, seed=0, layout="dense"):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, m, generator=g, dtype=torch.float64)
    W = torch.rand(n, k, generator=g, dtype=torch.float64)
    H = torch.rand(k, m, generator=g, dtype=torch.float64)
    mask = rows = cols = vals = None
    Xt = None
    if layout == "sparse":
        X = (X * (X > 0.6)).to_sparse_csr()
        Xt = X.t().to_sparse_csr()
    elif layout == "masked":
        mask = torch.rand(n, m, generator=g) > 0.3
        X = X * mask
    elif layout == "triplets":
        keep = torch.rand(n, m, generator=g) > 0.8
        rows, cols = keep.nonzero(as_tuple=True)
        vals, mask = X[rows, cols], keep
    t = {
        "dense": lambda: DenseBlock(X),
        "sparse": lambda: SparseBlock(X, Xt),
        "masked": lambda: MaskedBlock(X, mask),
        "triplets": lambda: ObservedBlock(rows, cols, vals, (n, m)),
    }[layout]()
    dense_mask = mask if mask is not None else torch.ones(n, m, dtype=torch.bool)
    Xd = X.to_dense() if layout == "sparse" else X
    return t, W, H, Xd, dense_mask


def _objective(Xd, W, H, mask, l1_W=0.0, l1_H=0.0, l2_W=0.0, l2_H=0.0):
    R = (Xd - W @ H) * mask
    l2 = 0.5 * (l2_W * float((W * W).sum()) + l2_H * float((H * H).sum()))
    return 0.5 * float((R * R).sum()) + l1_W * float(W.abs().sum()) + l1_H * float(H.abs().sum()) + l2


CASES = [
    (r, lay)
    for r in ("mu", "hals")
    for lay in ("dense", "sparse", "masked", "triplets")
    if (r, lay) != ("hals", "triplets")
]


@pytest.mark.parametrize(("rule", "layout"), CASES, ids=[f"{r}-{lay}" for r, lay in CASES])
def test_updates_never_increase_the_objective_and_stay_non_negative(rule, layout):
    t, W, H, Xd, mask = _problem(layout=layout)
    if layout == "triplets":
        Xd = torch.zeros_like(mask, dtype=torch.float64).index_put_((t.rows, t.cols), t.vals)
    l1_W, l1_H, l2_W, l2_H = 0.01, 0.02, 0.03, 0.04
    prev = _objective(Xd, W, H, mask, l1_W, l1_H, l2_W, l2_H)
    for _ in range(30):
        H = RULES[rule].update_h(t, W, H, l1_H, l2_H)
        assert (H >= 0).all()
        mid = _objective(Xd, W, H, mask, l1_W, l1_H, l2_W, l2_H)
        W = RULES[rule].update_w(t, W, H, l1_W, l2_W)
        assert (W >= 0).all()
        cur = _objective(Xd, W, H, mask, l1_W, l1_H, l2_W, l2_H)
        assert mid <= prev * (1 + 1e-12) and cur <= mid * (1 + 1e-12)
        prev = cur


def test_masked_updates_ignore_missing_values():
    t, W, H, _, mask = _problem(layout="masked")
    poisoned = MaskedBlock(t.X + 1e6 * (~mask), mask)
    for rule in (mu, hals):
        torch.testing.assert_close(rule.update_h(poisoned, W, H), rule.update_h(t, W, H))
        torch.testing.assert_close(rule.update_w(poisoned, W, H), rule.update_w(t, W, H))


def test_batched_restarts_update_each_restart_like_a_single_problem():
    t, W, H, _, _ = _problem()
    Wb, Hb = torch.stack([W, 2 * W]), torch.stack([H, 0.5 * H])
    for rule in (mu, hals):
        Hn = rule.update_h(t, Wb, Hb)
        torch.testing.assert_close(Hn[1], rule.update_h(t, 2 * W, 0.5 * H))


def _start(solver, matrix, k, init):
    t = to_block(matrix.X, torch.float64)
    W, H = initialize(t.X, k, init, generator=torch.Generator().manual_seed(0))
    return t, W, H, SolverUpdate(solver([W, H]).rule)


def _fit(solver, matrix, k, steps, init="nndsvda"):
    t, W, H, update = _start(solver, matrix, k, init)
    fit(t, W, H, update, steps)
    W, H = W.numpy(), H.numpy()
    return np.linalg.norm(matrix.X - W @ H) / np.linalg.norm(matrix.X)


def test_hals_recovers_the_known_factors_matrix():
    assert _fit(HALS, known_factors(), 3, 2000, init="random") < 1e-6  # the notebook's ALS: 0.696


def test_mu_converges_on_the_known_factors_matrix_with_more_steps():
    # MU converges sublinearly: each tenfold of updates cuts the error about tenfold
    errors = [_fit(MU, known_factors(), 3, steps, init="nndsvda") for steps in (300, 3000)]
    assert errors[1] < 2e-3 and errors[1] < errors[0] / 5


def test_hals_and_mu_match_scikit_learn_on_digits():
    X = digits().X
    sk = {}
    for solver in ("cd", "mu"):
        est = NMF(16, solver=solver, init="nndsvda", tol=1e-4, max_iter=1000)
        W = est.fit_transform(X)
        sk[solver] = np.linalg.norm(X - W @ est.components_) / np.linalg.norm(X)
    assert _fit(HALS, digits(), 16, 300) <= sk["cd"] * 1.01
    assert _fit(MU, digits(), 16, 300) <= sk["mu"] * 1.01


def test_hals_and_mu_match_scikit_learn_on_a_noisy_low_rank_matrix():
    rng = np.random.default_rng(0)
    X = rng.random((500, 20)) @ rng.random((20, 400))
    X = np.clip(X + 0.1 * X.std() * rng.standard_normal(X.shape), 0, None)
    est = NMF(20, solver="cd", init="nndsvda", tol=1e-4, max_iter=1000)
    W = est.fit_transform(X)
    sk = np.linalg.norm(X - W @ est.components_) / np.linalg.norm(X)
    from nmf_lightning.data import Matrix

    assert _fit(HALS, Matrix(X), 20, 300) <= sk * 1.01
    est = NMF(20, solver="mu", init="nndsvda", tol=1e-4, max_iter=1000)
    W = est.fit_transform(X)
    sk_mu = np.linalg.norm(X - W @ est.components_) / np.linalg.norm(X)
    assert _fit(MU, Matrix(X), 20, 300) <= sk_mu * 1.01


@pytest.mark.parametrize("solver", ["mu", "hals"])
def test_solvers_run_from_the_cli_config(make_cfg, solver, tmp_path):
    metrics = train(
        make_cfg(
            "data=known_factors",
            "model.rank=3",
            f"optimizer={solver}",
            "trainer.max_steps=2000",
            "trainer.precision=64-true",
        )
    )
    assert metrics["relative_error"] < {"hals": 1e-6, "mu": 0.1}[solver]
    assert metrics["W_neg_fraction"] == 0 and metrics["H_neg_fraction"] == 0
    with np.load(tmp_path / "factors.npz") as f:
        assert (f["W"] >= 0).all() and (f["H"] >= 0).all()


def test_solvers_on_sparse_and_ratings_data(make_cfg, tmp_path):
    X = sp.random(60, 50, density=0.1, random_state=0, format="csr")
    sp.save_npz(tmp_path / "x.npz", X)
    for extra in ([], ["data.unstored=missing"]):
        metrics = train(
            make_cfg(
                "data=file",
                f"data.path={tmp_path / 'x.npz'}",
                *extra,
                "model.rank=4",
                "optimizer=mu",
                "trainer.max_steps=50",
            )
        )
        assert np.isfinite(metrics["relative_error"]) and metrics["relative_error"] < 1


def test_solver_limits_are_named(make_cfg, tmp_path):
    with pytest.raises(NMFInputError, match=r"optimizer=hals has no closed form for the L2,1 penalty"):
        train(make_cfg("data=toy", "model.rank=2", "optimizer=hals", "model.l21_H=1", "trainer.max_steps=5"))
    X = sp.random(30, 20, density=0.1, random_state=0, format="csr")
    sp.save_npz(tmp_path / "r.npz", X)
    with pytest.raises(NMFInputError, match=r"optimizer=hals needs a dense mask"):
        train(
            make_cfg(
                "data=file",
                f"data.path={tmp_path / 'r.npz'}",
                "data.unstored=missing",
                "model.rank=2",
                "optimizer=hals",
                "trainer.max_steps=5",
            )
        )
    with pytest.raises(NMFInputError, match=r"optimizer=als solves k x k systems, which trainer.precision=bf16-true"):
        train(
            make_cfg("data=toy", "model.rank=2", "optimizer=als", "trainer.precision=bf16-true", "trainer.max_steps=5")
        )
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("solver", ["als", "kaczmarz"])
def test_als_and_kaczmarz_keep_factors_non_negative_and_beat_the_notebook(solver):
    from nmf_lightning.solvers import registry

    factory = registry.lookup(solver).factory
    err = _fit(factory, known_factors(), 3, 300)
    assert err < 0.2  # the notebook's ALS stalled at 0.696 (and its Kaczmarz did worse)
    t, W, H, update = _start(factory, known_factors(), 3, "random")
    for _ in range(20):
        fit(t, W, H, update, 1)
        assert (W >= 0).all() and (H >= 0).all()


def test_masked_als_ignores_missing_values():
    from nmf_lightning.solvers import als

    t, W, H, _, mask = _problem(layout="masked")
    poisoned = MaskedBlock(t.X + 1e6 * (~mask), mask)
    torch.testing.assert_close(als.update_h(poisoned, W, H), als.update_h(t, W, H))
    torch.testing.assert_close(als.update_w(poisoned, W, H), als.update_w(t, W, H))
    trip, W, H, _, _ = _problem(layout="triplets")
    dense = MaskedBlock(*trip.for_svd())  # the same entries as a dense X with a mask
    torch.testing.assert_close(als.update_h(trip, W, H), als.update_h(dense, W, H))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_als_solves_a_column_with_no_observed_entry_to_zero(dtype):
    """A held-out split can leave an item with no rating: its system is all zeros, its column of H is 0."""
    rng = np.random.default_rng(0)
    X = rng.random((40, 6)) @ rng.random((6, 30))
    X[rng.random(X.shape) < 0.7] = np.nan
    X[:, 3] = np.nan
    for triplets in (False, True):
        t = to_block(X, dtype, triplets=triplets)
        W = torch.from_numpy(rng.random((40, 6))).to(dtype)
        H = ALSRule().update_h(t, W, torch.ones(6, 30, dtype=dtype))
        assert torch.isfinite(H).all() and (H[:, 3] == 0).all() and (H.sum(0) > 0).sum() > 20


def test_kaczmarz_runs_on_sparse_x_without_densifying_it(make_cfg, tmp_path):
    X = sp.random(80, 60, density=0.1, random_state=1, format="csr")
    sp.save_npz(tmp_path / "x.npz", X)
    metrics = train(
        make_cfg(
            "data=file", f"data.path={tmp_path / 'x.npz'}", "model.rank=4", "optimizer=kaczmarz", "trainer.max_steps=30"
        )
    )
    assert np.isfinite(metrics["relative_error"]) and metrics["relative_error"] < 1


def test_tol_stops_early_and_records_why(make_cfg, tmp_path):
    metrics = train(
        make_cfg("data=digits", "optimizer=hals", "model.init=nndsvda", "model.tol=1e-4", "trainer.max_steps=5000")
    )
    assert metrics["steps"] < 5000 and metrics["steps"] % 10 == 0
    assert metrics["stop_reason"].startswith("converged: the objective changed by less than model.tol=0.0001")
    assert metrics["relative_error"] < 0.2605  # scikit-learn cd with the same tol: 0.2576
    # the stop point does not depend on how updates are grouped into Lightning steps
    again = train(
        make_cfg(
            "data=digits",
            "optimizer=hals",
            "model.init=nndsvda",
            "model.tol=1e-4",
            "trainer.max_steps=5000",
            "model.inner_steps=7",
        )
    )
    assert again["steps"] == metrics["steps"]


def test_transform_recovers_the_rows_of_a_planted_matrix(tmp_path):
    from nmf_lightning.transform import main, transform

    rng = np.random.default_rng(0)
    W0, H0 = rng.random((40, 3)), rng.random((3, 25))
    for solver in ("hals", "mu", "als"):
        W = transform(W0 @ H0, H0, solver=solver, max_iter=3000, tol=1e-12)
        assert (W >= 0).all()
        # ALS carries its ridge bias; MU converges slowly
        np.testing.assert_allclose(W, W0, rtol=0, atol={"hals": 1e-9, "als": 1e-4, "mu": 1e-2}[solver])
    X = W0 @ H0
    X[0, 0] = np.nan  # a missing entry leaves the other entries to decide
    np.testing.assert_allclose(transform(X, H0, max_iter=3000, tol=1e-12), W0, atol=1e-6)
    np.savez(tmp_path / "factors.npz", W=W0, H=H0)
    np.save(tmp_path / "new.npy", W0[:5] @ H0)
    main([str(tmp_path), str(tmp_path / "new.npy"), "--out", str(tmp_path / "w.npy"), "--device", "cpu"])
    np.testing.assert_allclose(np.load(tmp_path / "w.npy"), W0[:5], atol=1e-5)
    with pytest.raises(NMFInputError, match=r"H has shape \(3, 25\) but X has 7 columns"):
        transform(np.ones((2, 7)), H0)


def test_transform_solves_the_nnls_of_features_of_very_different_scales():
    """The exact per-row NNLS (scipy's active set) is what transform's defaults reach, with a warning if cut short."""
    from scipy.optimize import nnls

    from nmf_lightning.transform import transform

    rng = np.random.default_rng(1)
    scales = np.logspace(-1, 3, 30)  # as breast-cancer features: their Gram is badly conditioned
    H = (0.8 + 0.2 * rng.random((5, 30))) * scales  # and overlapping components
    X = np.clip(rng.random((60, 5)) @ H + rng.normal(0, 0.05, (60, 30)) * scales, 0, None)
    exact = np.array([nnls(H.T, x)[0] for x in X])
    best = np.linalg.norm(X - exact @ H)
    W = transform(X, H)
    assert np.linalg.norm(X - W @ H) == pytest.approx(best, rel=1e-9)
    with pytest.warns(UserWarning, match=r"stopped at max_iter=5 before tol=1e-08.*--max-iter"):
        short = transform(X, H, max_iter=5)
    assert np.linalg.norm(X - short @ H) > best * (1 + 1e-3)


@pytest.mark.parametrize(
    ("factors", "out", "message"),
    [
        ("cut", "w.npy", r"could not read .*factors.npz \(File is not a zip file\); a run's factors.npz holds"),
        ("objects", "w.npy", r"Object arrays cannot be loaded"),
        ("nan", "w.npy", r"H must hold finite numbers >= 0"),
        ("good", "nowhere/w.npy", r"the folder .*nowhere does not exist"),
        ("good", "w.xlsx", r"--out .*w.xlsx: write a matrix as .npy, .csv, .tsv, .txt"),
    ],
)
def test_transform_cli_refuses_bad_factors_and_outputs_in_one_line(tmp_path, capsys, factors, out, message):
    from nmf_lightning.transform import main

    H = np.random.default_rng(0).random((2, 4))
    path = tmp_path / "factors.npz"
    if factors == "objects":
        np.savez(path, W=np.ones((3, 2)), H=np.array([[1, "a"]], dtype=object))
    else:
        np.savez(path, W=np.ones((3, 2)), H=np.full_like(H, np.nan) if factors == "nan" else H)
    if factors == "cut":
        path.write_bytes(path.read_bytes()[:60])
    np.save(tmp_path / "new.npy", np.ones((3, 4)))
    with pytest.raises(SystemExit) as exit_:
        main([str(path), str(tmp_path / "new.npy"), "--out", str(tmp_path / out), "--device", "cpu"])
    text = f"{exit_.value.code} {capsys.readouterr().err}"
    assert re.search(message, text), text
    assert not list(tmp_path.rglob("w.*")) and not list(tmp_path.rglob("*.part"))


def test_transform_cli_solves_on_the_loss_the_run_trained_and_names_its_own_flags(tmp_path, capsys):
    from nmf_lightning.transform import main, transform

    rng = np.random.default_rng(0)
    H, X = rng.random((3, 6)) + 0.1, rng.random((8, 6)) + 0.1
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    np.savez(run / "factors.npz", W=np.ones((8, 3)), H=H)
    (run / ".hydra" / "config.yaml").write_text("model:\n  loss: kl\n  beta: null\n")
    np.save(tmp_path / "new.npy", X)
    main([str(run), str(tmp_path / "new.npy"), "--out", str(tmp_path / "w.npy"), "--device", "cpu"])
    assert "model.loss=kl: solving W on the beta=1 divergence" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(tmp_path / "w.npy"), transform(X, H, beta=1.0))
    for name, delimiter in (("w.csv", ","), ("w.tsv", "\t")):  # W as text, as the extension says: the same numbers
        main([str(run), str(tmp_path / "new.npy"), "--out", str(tmp_path / name), "--device", "cpu"])
        np.testing.assert_array_equal(np.loadtxt(tmp_path / name, delimiter=delimiter), np.load(tmp_path / "w.npy"))
    (tmp_path / "new.csv").write_text("a,b,c,d,e,f\n" + "1,2,3,4,5,6\n")
    with pytest.raises(SystemExit) as exit_:
        main([str(run), str(tmp_path / "new.csv"), "--out", str(tmp_path / "w2.npy"), "--device", "cpu"])
    assert exit_.value.code == 2 and "set --skip-header 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # in this command's words: it has no data.path
        main([str(run), str(tmp_path / "nope.npy"), "--out", str(tmp_path / "w3.npy"), "--device", "cpu"])
    assert re.match(r"error: '.*nope.npy' does not exist or is not a file", capsys.readouterr().err)


def test_l2_penalty_matches_scikit_learn_folding():
    # HALS with l2 equals coordinate descent on W^T W + l2 I: check the fixed point by hand
    t, W, H, Xd, _ = _problem(n=12, m=9, k=2)
    for _ in range(500):
        H = hals.update_h(t, W, H, 0.0, 0.5)
        W = hals.update_w(t, W, H, 0.0, 0.5)
    gH = W.T @ (W @ H - Xd) + 0.5 * H  # projected gradient of the penalised objective vanishes
    assert torch.where(H > 0, gH.abs(), (-gH).clamp_min(0)).max() < 1e-6


@pytest.mark.parametrize("rule", [hals, mu])
def test_h_from_summed_statistics_equals_the_direct_update(rule):
    t, W, H, _, _ = _problem(layout="masked")
    W[:, 1] = 0  # a component no observed entry sees
    halves = [MaskedBlock(t.X[a:b], t.mask[a:b], start=a) for a, b in ((0, 13), (13, 30))]
    stats = [rule.h_stats(h, W[h.start : h.stop], H) for h in halves]
    summed = {k: stats[0][k] + stats[1][k] for k in stats[0]}
    torch.testing.assert_close(rule.h_from_stats(summed, H, 0.1, 0.5), rule.update_h(t, W, H, 0.1, 0.5))
