"""Ratings that recommend: biased NMF on observed entries, read from rating lists as they come."""

import numpy as np
import pytest
import torch

from nmf_lightning import NMF
from nmf_lightning.data.files import from_file
from nmf_lightning.engine import Problem, Source, Spec
from nmf_lightning.solvers.registry import lookup


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
