"""Consensus over restarts and automatic rank: the math against scikit-learn, and both front ends on planted data."""

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, silhouette_score

from nmf_lightning import NMF
from nmf_lightning.consensus import consensus, distance_image, kmeans, local_density, normalized, silhouette
from nmf_lightning.rank import RankRow, choose, coarse, refine
from nmf_lightning.report import report
from nmf_lightning.train import train
from nmf_lightning.validation import NMFInputError


def planted(n=240, m=160, k=5, noise=0.05, seed=0, sparse=False):
    """X = W H + noise with gamma factors (sparse: most factor entries 0, so X is sparse with rank k)."""
    rng = np.random.default_rng(seed)
    W, H = rng.gamma(0.5, 1.0, (n, k)), rng.gamma(0.5, 1.0, (k, m))
    if sparse:
        W *= rng.random((n, k)) < 0.3
        H *= rng.random((k, m)) < 0.3
        H[np.arange(k), rng.integers(0, m, k)] += 1.0  # no empty component
    X = W @ H
    X = np.clip(X + noise * X.std() * rng.standard_normal(X.shape) * (X > 0 if sparse else 1), 0, None)
    return (sp.csr_matrix(X) if sparse else X), H


def matched_cosines(A, B):
    """Cosine similarity of each row of B with its match among the rows of A (Hungarian on cosine)."""
    A = A / np.linalg.norm(A, axis=1, keepdims=True)
    B = B / np.linalg.norm(B, axis=1, keepdims=True)
    C = B @ A.T
    rows, cols = linear_sum_assignment(-C)
    return C[rows, cols]


def restarts_of(H, R=30, spread=0.05, seed=0):
    """R noisy, permuted, rescaled copies of the components H (k, m), as a batched (R, k, m) tensor."""
    g = torch.Generator().manual_seed(seed)
    H = torch.as_tensor(H, dtype=torch.float64)
    copies = [H[torch.randperm(len(H), generator=g)] for _ in range(R)]
    noisy = torch.stack(copies) * (1 + spread * torch.rand(R, *H.shape, generator=g))
    return noisy * torch.rand(R, len(H), 1, generator=g) * 5


def test_silhouette_and_kmeans_equal_scikit_learns_chunked():
    P = normalized(restarts_of(np.random.default_rng(1).random((4, 30)) ** 3, R=25, spread=0.3))
    labels, _ = kmeans(P, 4, seed=0)
    ref = KMeans(4, n_init=10, random_state=0).fit_predict(P.numpy())
    assert adjusted_rand_score(ref, labels.numpy()) == pytest.approx(1.0)
    expected = silhouette_score(P.numpy(), labels.numpy())
    assert silhouette(P, labels, 4, chunk=7) == pytest.approx(expected, abs=1e-9)
    assert silhouette(P, labels, 4) == pytest.approx(expected, abs=1e-9)
    random = torch.randint(0, 4, (len(P),), generator=torch.Generator().manual_seed(0))
    assert silhouette(P, random, 4, chunk=11) == pytest.approx(silhouette_score(P.numpy(), random.numpy()), abs=1e-9)


def test_consensus_finds_the_components_and_drops_outliers():
    H_true = np.random.default_rng(2).random((5, 40)) ** 3
    H = restarts_of(H_true, R=30)
    H[3, 2] = torch.rand(40, generator=torch.Generator().manual_seed(9))  # an accident of one start
    found = consensus(H)
    assert found.labels[3 * 5 + 2] == -1  # dropped by its local density
    assert found.kept == pytest.approx(1 - 1 / 150)
    assert found.stability > 0.9
    assert matched_cosines(H_true, found.H.numpy()).min() > 0.99
    np.testing.assert_allclose(found.H.sum(1).numpy(), 1.0, rtol=1e-6)  # cNMF's scaling
    dense = local_density(normalized(H), 9, chunk=10_000)
    np.testing.assert_allclose(local_density(normalized(H), 9, chunk=13).numpy(), dense.numpy(), rtol=1e-6)
    image = distance_image(H, found.labels)
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8


def test_consensus_threshold_that_keeps_too_few_says_so():
    H = restarts_of(np.random.default_rng(3).random((4, 20)), R=10)
    with pytest.raises(NMFInputError, match="keeps 0 of the 40 components.*raise it"):
        consensus(H, density_threshold=1e-9)


def test_estimator_consensus_recovers_planted_components_near_the_best_restart():
    X, H_true = planted(k=5, noise=0.05)
    est = NMF(5, restarts=20, consensus=True, max_iter=300, random_state=0).fit(X)
    assert est.components_.shape == (5, X.shape[1])
    assert matched_cosines(H_true, est.components_).min() >= 0.95
    assert est.stability_ > 0.8 and 0 < est.consensus_kept_ <= 1
    assert est.reconstruction_err_ <= 1.01 * est.best_restart_err_
    W = est.transform(X)
    assert np.linalg.norm(X - W @ est.components_) == pytest.approx(est.reconstruction_err_, rel=1e-3)


def test_consensus_refine_fits_as_the_best_restart_and_keeps_rows_summing_to_one():
    X = np.random.default_rng(5).random((120, 40))  # no structure: the consensus alone fits worse
    plain = NMF(6, restarts=10, consensus=True, max_iter=200, random_state=0).fit(X)
    polished = NMF(6, restarts=10, consensus=True, consensus_refine=50, max_iter=200, random_state=0).fit(X)
    assert plain.reconstruction_err_ > 1.01 * plain.best_restart_err_
    assert polished.reconstruction_err_ <= 1.01 * polished.best_restart_err_
    np.testing.assert_allclose(polished.components_.sum(1), 1.0, rtol=1e-6)


def test_consensus_needs_restarts():
    with pytest.raises(NMFInputError, match="consensus=True.*restarts=1"):
        NMF(4, consensus=True).fit(np.random.default_rng(0).random((20, 10)))


@pytest.mark.parametrize(
    ("k", "sparse", "missing"),
    [(4, False, False), (7, False, True), (5, True, False)],
    ids=["dense", "masked", "sparse"],
)
def test_auto_rank_returns_the_planted_rank(k, sparse, missing):
    X, _ = planted(k=k, noise=0.05, seed=k, sparse=sparse)
    if missing:
        X[np.random.default_rng(0).random(X.shape) < 0.1] = np.nan
    est = NMF("auto", rank_min=2, rank_max=12, max_iter=150, random_state=0).fit(X)
    assert est.n_components_ == k
    ranks = [row["rank"] for row in est.rank_search_]
    assert ranks == sorted(ranks) and k - 1 in ranks and k + 1 in ranks  # refined around the chosen one
    assert min(est.rank_search_, key=lambda r: r["heldout_rmse"])["rank"] == k


def test_auto_rank_on_x_streamed_in_row_blocks_chooses_as_in_memory():
    X, _ = planted(k=4, noise=0.05, seed=4)
    whole = NMF("auto", rank_min=2, rank_max=8, max_iter=100, random_state=0).fit(X)
    streamed = NMF("auto", rank_min=2, rank_max=8, max_iter=100, random_state=0, batch_rows=64).fit(X)
    assert streamed.n_components_ == whole.n_components_ == 4
    for a, b in zip(whole.rank_search_, streamed.rank_search_, strict=True):
        assert a["rank"] == b["rank"] and a["heldout_rmse"] == pytest.approx(b["heldout_rmse"], rel=1e-3)


def test_rank_choice_rules_and_grid():
    rows = [RankRow(r, rmse, se, 0.1, 0.0) for r, rmse, se in [(2, 1.0, 0.01), (4, 0.50, 0.02), (6, 0.49, 0.02)]]
    assert choose(rows, "min") == 6
    assert choose(rows, "1se") == 4  # 0.25 <= 0.2401 + 0.02
    assert coarse(2, 20) == [2, 6, 9, 13, 16, 20] and coarse(3, 5) == [3, 4, 5]
    tried = {r.rank: r for r in rows}
    assert refine(tried, 2, 20) == [5]
    tried[5] = RankRow(5, 0.6, 0.0, 0.1, 0.0)
    assert refine(tried, 2, 20) == []


def test_auto_rank_bad_ranges_and_partial_fit_are_refused():
    X = np.random.default_rng(0).random((30, 20))
    with pytest.raises(NMFInputError, match="rank_min=9 is above rank_max=5"):
        NMF("auto", rank_min=9, rank_max=5).fit(X)
    with pytest.raises(ValueError, match="n_components='auto' chooses the rank on a whole X"):
        NMF("auto").partial_fit(X)
    assert NMF(None, max_iter=5).fit(X).n_components_ == 20  # None: scikit-learn's n_features


def test_cli_auto_rank_and_consensus_write_their_metrics_and_curves(make_cfg, tmp_path):
    X, H_true = planted(n=200, m=120, k=4, noise=0.05, seed=4)
    np.save(tmp_path / "x.npy", X)
    cfg = make_cfg(
        "data=file",
        f"data.path={tmp_path / 'x.npy'}",
        "optimizer=hals",
        "model.rank=auto",
        "model.rank_max=8",
        "model.restarts=10",
        "model.consensus=true",
        "trainer.max_steps=150",
    )
    metrics = train(cfg)
    assert metrics["rank"] == 4
    assert [row["rank"] for row in metrics["rank_search"]][0] == 2
    assert all("stability" in row for row in metrics["rank_search"])
    assert metrics["stability"] > 0.8 and metrics["consensus_relative_error"] <= 1.01 * metrics["relative_error"]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["rank"] == 4 and len(saved["rank_search"]) == len(metrics["rank_search"])
    factors = np.load(tmp_path / "factors.npz")
    assert factors["H"].shape == (4, 120)
    np.testing.assert_allclose(factors["H"].sum(1), 1.0, rtol=1e-5)  # the consensus, not the best restart
    assert matched_cosines(H_true, factors["H"]).min() >= 0.95
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = list(tmp_path.rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(runs[0].parent), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("rank_search/heldout_rmse")]
    assert steps == [row["rank"] for row in metrics["rank_search"]]
    assert "consensus/distances" in acc.Tags()["images"]


def test_cli_and_estimator_choose_the_same_rank_from_the_same_settings(make_cfg, tmp_path):
    X, _ = planted(n=150, m=90, k=3, noise=0.05, seed=3)
    X = X.astype(np.float32)
    np.save(tmp_path / "x.npy", X)
    settings = ("model.rank=auto", "model.rank_max=6", "model.tol=1e-4", "trainer.max_steps=100", "model.loss=fro2")
    cli = train(make_cfg("data=file", f"data.path={tmp_path / 'x.npy'}", "optimizer=hals", *settings))
    est = NMF("auto", solver="cd", init="random", rank_max=6, tol=1e-4, max_iter=100, random_state=0).fit(X)
    assert cli["rank"] == est.n_components_ == 3
    for a, b in zip(cli["rank_search"], est.rank_search_, strict=True):
        assert a["rank"] == b["rank"] and a["heldout_rmse"] == pytest.approx(b["heldout_rmse"], rel=1e-4)


def test_cli_refuses_auto_rank_on_x_read_from_disk(make_cfg, tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((50, 20)))
    cfg = make_cfg("data=file", f"data.path={tmp_path / 'x.npy'}", "data.batch_rows=10", "model.rank=auto")
    with pytest.raises(NMFInputError, match="rank=auto holds out entries"):
        train(cfg)
    assert not (tmp_path / "metrics.json").exists()


def test_sweep_report_draws_k_selection_for_consensus_runs(tmp_path):
    for job, (rank, stability, error) in enumerate([(3, 0.9, 0.40), (4, 0.95, 0.30), (5, 0.7, 0.29)]):
        folder = tmp_path / f"{job}_rank={rank}"
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(f"- model.rank={rank}\n- model.consensus=true\n")
        metrics = {"status": "completed", "relative_error": error - 0.01, "consensus_relative_error": error}
        (folder / "metrics.json").write_text(json.dumps(metrics | {"stability": stability}))
    result = report(tmp_path)
    assert result["written"]["k_selection"].name == "k_selection.png"
    assert "stability" in result["written"]["markdown"].read_text()
