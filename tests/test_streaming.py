"""Rows as batches: X streamed in row blocks trains exactly like X held whole."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from nmf_lightning.data import Matrix
from nmf_lightning.data.datamodule import NMFDataModule
from nmf_lightning.data.rows import H5Matrix, RowBlocks, scan
from nmf_lightning.train import train
from nmf_lightning.validation import NMFInputError

N, M = 45, 30


def _dense(missing=0.0, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.random((N, 4)) @ rng.random((4, M)) + 0.05 * rng.random((N, M))
    if missing:
        X[rng.random(X.shape) < missing] = np.nan
    return X


def _sparse(seed=0):
    return sp.random(N, M, density=0.3, random_state=seed, format="csr")


def _run(make_cfg, tmp_path, name, path, *overrides):
    out = tmp_path / name
    out.mkdir(parents=True)
    metrics = train(
        make_cfg(
            "data=file",
            f"data.path={path}",
            "data.num_workers=0",
            "model.rank=4",
            "trainer.precision=64-true",
            f"paths.output_dir={out}",
            *overrides,
        )
    )
    with np.load(out / "factors.npz") as f:
        return metrics, f["W"], f["H"]


def _same_run_streamed(make_cfg, tmp_path, path, *overrides, batch_rows=7):
    whole = _run(make_cfg, tmp_path, "whole", path, *overrides)
    streamed = _run(make_cfg, tmp_path, "streamed", path, f"data.batch_rows={batch_rows}", *overrides)
    return whole, streamed


CASES = [(optimizer, layout) for optimizer in ("hals", "mu", "als", "adam") for layout in ("dense", "sparse")]


@pytest.mark.parametrize(("optimizer", "layout"), CASES, ids=[f"{o}-{lay}" for o, lay in CASES])
def test_streamed_rows_give_the_factors_of_the_whole_matrix(make_cfg, tmp_path, optimizer, layout):
    if layout == "dense":
        path = tmp_path / "x.npy"
        np.save(path, _dense())
    else:
        path = tmp_path / "x.npz"
        sp.save_npz(path, _sparse())
    extra = ("optimizer.lr=0.01",) if optimizer == "adam" else ()
    (m0, W0, H0), (m1, W1, H1) = _same_run_streamed(
        make_cfg, tmp_path, path, f"optimizer={optimizer}", "trainer.max_steps=25", *extra
    )
    np.testing.assert_allclose(W1, W0, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(H1, H0, rtol=1e-9, atol=1e-12)
    assert m1["steps"] == m0["steps"] == 25  # trainer.max_steps counts passes over X
    assert m1["relative_error"] == pytest.approx(m0["relative_error"], rel=1e-9)


@pytest.mark.parametrize("optimizer", ["mu", "adam", "hals", "als"])
def test_missing_entries_stream_too(make_cfg, tmp_path, optimizer):
    path = tmp_path / "x.npy"
    np.save(path, _dense(missing=0.2))
    extra = ("optimizer.lr=0.01",) if optimizer == "adam" else ()
    (m0, W0, H0), (m1, W1, H1) = _same_run_streamed(
        make_cfg, tmp_path, path, f"optimizer={optimizer}", "trainer.max_steps=15", *extra
    )
    np.testing.assert_allclose(W1, W0, rtol=1e-8, atol=1e-11)
    np.testing.assert_allclose(H1, H0, rtol=1e-8, atol=1e-11)
    assert m1["relative_error"] == pytest.approx(m0["relative_error"], rel=1e-8)


def test_missing_entries_in_a_few_blocks_only(make_cfg, tmp_path):
    X = _dense()
    X[0, 0] = X[3, 5] = np.nan  # the first block alone has missing entries
    path = tmp_path / "x.npy"
    np.save(path, X)
    for optimizer in ("hals", "mu"):
        (_, W0, _), (_, W1, _) = _same_run_streamed(
            make_cfg, tmp_path / optimizer, path, f"optimizer={optimizer}", "trainer.max_steps=10"
        )
        np.testing.assert_allclose(W1, W0, rtol=1e-8, atol=1e-11)


def test_restarts_and_holdout_stream_too(make_cfg, tmp_path):
    data = ("data=synthetic", "data.n_rows=45", "data.n_cols=30", "data.true_rank=4", "data.noise=0.1")
    args = (*data, "model.rank=4", "optimizer=hals", "trainer.max_steps=20", "model.restarts=3", "data.holdout=0.1")
    runs = []
    for name, extra in (("whole", ()), ("streamed", ("data.batch_rows=7", "data.num_workers=0"))):
        (tmp_path / name).mkdir()
        metrics = train(make_cfg(*args, *extra, "trainer.precision=64-true", f"paths.output_dir={tmp_path / name}"))
        with np.load(tmp_path / name / "factors.npz") as f:
            runs.append((metrics, f["W"]))
    (m0, W0), (m1, W1) = runs
    np.testing.assert_allclose(W1, W0, rtol=1e-8, atol=1e-11)
    assert m1["best_restart"] == m0["best_restart"]
    assert m1["val_relative_error"] == pytest.approx(m0["val_relative_error"], rel=1e-8)


def test_one_block_per_pass_equals_the_whole_matrix_and_workers_change_nothing(make_cfg, tmp_path):
    path = tmp_path / "x.npz"
    sp.save_npz(path, _sparse(seed=3))
    args = ("optimizer=mu", "trainer.max_steps=10")
    _, W0, _ = _run(make_cfg, tmp_path, "one", path, "data.batch_rows=1000", *args)
    _, W1, _ = _run(make_cfg, tmp_path, "workers", path, "data.batch_rows=4", "data.num_workers=1", *args)
    np.testing.assert_allclose(W1, W0, rtol=1e-9)


class _Counting:
    """An array that records which rows were asked for."""

    def __init__(self, X):
        self.X, self.shape, self.ndim, self.requests = X, X.shape, 2, []

    def __getitem__(self, index):
        assert isinstance(index, slice), "rows must be read as slices"
        self.requests.append((index.start, index.stop))
        return self.X[index]


def test_a_memory_mapped_file_is_read_a_block_at_a_time(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, _dense())
    counting = _Counting(np.load(path, mmap_mode="r"))
    dm = NMFDataModule(lambda: Matrix(counting), batch_rows=10)
    dm.setup()
    blocks = list(dm.row_blocks())
    assert [b["start"] for b in blocks] == [0, 10, 20, 30, 40]
    assert counting.requests and all(stop - start <= 10 for start, stop in counting.requests)
    np.testing.assert_array_equal(torch.cat([b["X"] for b in blocks]).numpy(), _dense().astype(np.float32))
    assert dm.summary.x_sq == pytest.approx(float((_dense() ** 2).sum()))


def test_h5ad_csr_rows_equal_the_npz_matrix(make_cfg, tmp_path):
    h5py = pytest.importorskip("h5py")
    X = _sparse(seed=1)
    with h5py.File(tmp_path / "x.h5ad", "w") as f:
        g = f.create_group("X")
        g.attrs["encoding-type"] = "csr_matrix"
        g.attrs["shape"] = X.shape
        g["data"], g["indices"], g["indptr"] = X.data, X.indices, X.indptr
    sp.save_npz(tmp_path / "x.npz", X)
    h5 = H5Matrix(tmp_path / "x.h5ad")
    assert h5.shape == X.shape and h5.nnz == X.nnz
    assert (h5.rows(5, 17) != X[5:17]).nnz == 0
    summary = scan(X, 8)
    for a, b in zip(RowBlocks(h5, 8, scan(h5, 8)), RowBlocks(X, 8, summary), strict=True):
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key
    args = ("optimizer=hals", "trainer.max_steps=10", "data.batch_rows=8")
    _, W0, H0 = _run(make_cfg, tmp_path, "npz", tmp_path / "x.npz", *args)
    _, W1, H1 = _run(make_cfg, tmp_path, "h5ad", tmp_path / "x.h5ad", *args)
    np.testing.assert_array_equal(W1, W0)
    np.testing.assert_array_equal(H1, H0)
    with pytest.raises(NMFInputError, match=r"trainer.precision=bf16-true has no sparse matrix kernels"):
        _run(make_cfg, tmp_path, "h5ad-bf16", tmp_path / "x.h5ad", *args, "trainer.precision=bf16-true")


def test_online_mode_lowers_the_objective_pass_by_pass_and_leads_early(make_cfg, tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, _dense())
    args = ("optimizer=hals", "data.batch_rows=9")
    errors = []
    for steps in (1, 3, 10):
        metrics, _, _ = _run(
            make_cfg, tmp_path, f"online{steps}", path, *args, "model.online=true", f"trainer.max_steps={steps}"
        )
        errors.append(metrics["relative_error"])
    assert errors[0] > errors[1] > errors[2]
    exact, _, _ = _run(make_cfg, tmp_path, "exact", path, *args, "trainer.max_steps=1")
    assert errors[0] < 0.8 * exact["relative_error"]  # H already learnt from the first blocks of the pass


def test_online_mode_stops_once_its_pass_cost_settles(make_cfg, tmp_path):
    rng = np.random.default_rng(0)  # word counts of 8 sparse topics, as online NMF is used on
    W = rng.exponential(1, (4000, 8)) * (rng.random((4000, 8)) < 0.3)
    H = rng.exponential(1, (8, 300)) * (rng.random((8, 300)) < 0.2)
    path = tmp_path / "counts.npz"
    sp.save_npz(path, sp.csr_matrix(rng.poisson(0.5 * W @ H).astype(np.float32)))
    args = (path, "optimizer=hals", "data.batch_rows=500", "model.online=true", "model.rank=8", "trainer.max_steps=300")
    settled, _, _ = _run(make_cfg, tmp_path, "default", *args, "trainer.precision=32-true")  # model.tol=null
    assert settled["stop_reason"].startswith("converged") and settled["steps"] < 30
    every, _, _ = _run(make_cfg, tmp_path, "all", *args, "trainer.precision=32-true", "model.tol=0")  # every pass
    assert every["steps"] == 300 and settled["relative_error"] <= 1.001 * every["relative_error"]


@pytest.mark.parametrize("optimizer", ["hals", "mu"])
def test_online_mode_with_missing_entries_measures_its_pass_cost(make_cfg, tmp_path, optimizer):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = tmp_path / "x.npy"
    np.save(path, _dense(missing=0.1))
    args = (path, f"optimizer={optimizer}", "data.batch_rows=9", "model.online=true", "trainer.max_steps=20")
    metrics, _, _ = _run(make_cfg, tmp_path, "online", *args)  # model.tol=null: tested on the pass's cost
    assert 0 < metrics["steps"] <= 20 and np.isfinite(metrics["relative_error"])
    ea = EventAccumulator(str(tmp_path / "online"), size_guidance={"scalars": 0})
    ea.Reload()
    assert len(ea.Scalars("online/loss")) >= 2  # each block's error as it was fit, summed over the pass


def test_the_engine_fit_is_what_transform_and_the_module_run(make_cfg, tmp_path, monkeypatch):
    import nmf_lightning.engine.loop as engine_loop
    from nmf_lightning.transform import transform

    calls = []
    real = engine_loop.update
    monkeypatch.setattr(engine_loop, "update", lambda *a, **k: calls.append(1) or real(*a, **k))
    train(make_cfg("data=toy", "model.rank=2", "optimizer=hals", "trainer.max_steps=7"))
    assert len(calls) == 7
    rng = np.random.default_rng(0)
    transform(rng.random((5, 4)), rng.random((2, 4)), solver="mu", max_iter=3, tol=0)  # hals: nnls_hals
    assert len(calls) == 10


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("data.batch_rows=0",), r"data.batch_rows must be an integer >= 1"),
        (("data.batch_rows=5", "optimizer=kaczmarz"), r"optimizer=kaczmarz samples rows anywhere in X"),
        (("model.online=true", "optimizer=hals"), r"model.online=true updates H after every row block"),
        (("data.batch_rows=5", "data.holdout=0.1"), r"data.holdout needs X in host memory"),
    ],
)
def test_streaming_limits_are_named_before_training(make_cfg, tmp_path, overrides, message):
    path = tmp_path / "x.npy"
    np.save(path, _dense())
    with pytest.raises(NMFInputError, match=message):
        train(make_cfg("data=file", f"data.path={path}", "model.rank=3", "trainer.max_steps=3", *overrides))
    assert not (tmp_path / "metrics.json").exists()


def test_streamed_ratings_refuse_hals_before_training(make_cfg, tmp_path):
    sp.save_npz(tmp_path / "r.npz", _sparse())
    with pytest.raises(NMFInputError, match=r"optimizer=hals needs a dense mask"):
        train(
            make_cfg(
                "data=file",
                f"data.path={tmp_path / 'r.npz'}",
                "data.unstored=missing",
                "data.batch_rows=8",
                "optimizer=hals",
                "model.rank=3",
            )
        )


def test_streamed_validation_and_online_curves(make_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = ("data=synthetic", "data.n_rows=45", "data.n_cols=30", "data.true_rank=4", "model.rank=4")
    out = tmp_path / "val"
    out.mkdir()
    common = ("data.batch_rows=8", "optimizer=hals", "trainer.max_steps=12", f"paths.output_dir={out}")
    train(make_cfg(*data, *common, "data.holdout=0.1"))
    ea = EventAccumulator(str(out), size_guidance={"scalars": 0})
    ea.Reload()
    # validated once a pass; a point every 10 updates and at the last
    assert [e.step for e in ea.Scalars("val/relative_error")] == [10, 12]
    assert [e.step for e in ea.Scalars("train/relative_error")] == [10, 12]
    out = tmp_path / "online"
    out.mkdir()
    metrics = train(make_cfg(*data, *common[:-1], f"paths.output_dir={out}", "model.online=true"))
    ea = EventAccumulator(str(out), size_guidance={"scalars": 0})
    ea.Reload()
    assert "online/relative_error" in ea.Tags()["scalars"]
    # train/* holds one point, the exact error of the final factors (HPARAMS reads it), the curves are online/*
    assert [e.step for e in ea.Scalars("train/relative_error")] == [12]
    assert ea.Scalars("train/relative_error")[0].value == pytest.approx(metrics["relative_error"], rel=1e-5)
    from nmf_lightning.data import synthetic

    X = synthetic(n_rows=45, n_cols=30, true_rank=4).X
    with np.load(out / "factors.npz") as f:
        exact = np.linalg.norm(X - f["W"] @ f["H"]) / np.linalg.norm(X)
    assert metrics["relative_error"] == pytest.approx(exact, rel=1e-4)  # the final error is exact


_RSS = """
import resource, sys
from hydra import compose, initialize_config_dir
from nmf_lightning.train import config_dir, train

def run(*overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["trainer.accelerator=cpu", "logger=none", "callbacks=none", "overwrite=true",
                                          "paths.output_dir=" + sys.argv[1], *overrides])
    train(cfg)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

common = ("model.rank=4", "optimizer=mu", "trainer.max_steps=2")
tiny = run("data=toy", *common)
streamed = run("data=file", "data.path=" + sys.argv[2], "data.batch_rows=2000", *common)
print("PEAK_RSS_MB", tiny, streamed)
"""


@pytest.mark.slow  # a subprocess or a multirun: -m slow (and CI) runs it
def test_peak_memory_of_a_streamed_file_stays_far_below_its_size(tmp_path):
    n, m = 192_000, 500  # 384 MB of float32
    X = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float32, shape=(n, m))
    rng = np.random.default_rng(0)
    for start in range(0, n, 16_000):
        X[start : start + 16_000] = rng.random((16_000, m), dtype=np.float32)
    X.flush()
    del X
    size_mb = (tmp_path / "big.npy").stat().st_size / 2**20
    # one process: peak RSS after a tiny run, then after streaming the file (the peak only grows)
    proc = subprocess.run(
        [sys.executable, "-c", _RSS, str(tmp_path / "run"), str(tmp_path / "big.npy")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    tiny, streamed = (float(v) for v in proc.stdout.split("PEAK_RSS_MB")[-1].split())
    assert streamed < tiny + 0.25 * size_mb, (streamed, tiny, size_mb)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["relative_error"] < 0.6


@pytest.mark.parametrize("optimizer", ["hals", "adam"])
def test_a_streamed_run_resumes_exactly_from_its_checkpoint(make_cfg, tmp_path, optimizer):
    path = tmp_path / "x.npy"
    np.save(path, _dense())
    args = (f"optimizer={optimizer}", "data.batch_rows=8", *(("optimizer.lr=0.01",) if optimizer == "adam" else ()))
    _run(make_cfg, tmp_path, "first", path, *args, "trainer.max_steps=10")
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    resumed, W1, H1 = _run(make_cfg, tmp_path, "resumed", path, *args, "trainer.max_steps=20", f"ckpt_path={ckpt}")
    straight, W0, H0 = _run(make_cfg, tmp_path, "straight", path, *args, "trainer.max_steps=20")
    assert resumed["steps"] == 20
    np.testing.assert_allclose(W1, W0, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(H1, H0, rtol=1e-10, atol=1e-12)


def test_a_bad_entry_in_a_streamed_file_is_named_with_its_rows(make_cfg, tmp_path):
    X = _dense()
    X[21, 3] = -1.0
    np.save(tmp_path / "x.npy", X)
    with pytest.raises(
        NMFInputError, match=r"X has 1 negative entries .*the first at row 21, column 3.* \(found in rows 21 to 27\)"
    ):
        train(make_cfg("data=file", f"data.path={tmp_path / 'x.npy'}", "data.batch_rows=7", "model.rank=3"))
    assert not (tmp_path / "metrics.json").exists()


def test_tol_stops_a_streamed_run_where_the_whole_run_stops(make_cfg, tmp_path):
    data = ("data=synthetic", "data.n_rows=120", "data.n_cols=60", "data.true_rank=6", "data.noise=0.1")
    args = (*data, "model.rank=6", "optimizer=hals", "model.tol=1e-4", "trainer.max_steps=3000")
    steps = []
    for extra in ((), ("data.batch_rows=30",)):
        out = tmp_path / f"run{len(steps)}"
        out.mkdir()
        metrics = train(make_cfg(*args, *extra, f"paths.output_dir={out}"))
        assert metrics["stop_reason"].startswith("converged")
        steps.append(metrics["steps"])
    # the same objective is tested (float32 rounding may move the stop by one window of 10 updates)
    assert abs(steps[1] - steps[0]) <= 10, steps


@pytest.mark.parametrize("layout", ["dense", "sparse", "small"])
@pytest.mark.parametrize("init", ["nndsvd", "nndsvda", "nndsvdar"])
def test_svd_inits_of_a_streamed_x_are_the_in_memory_ones(make_cfg, tmp_path, init, layout):
    """A randomized SVD needs only products with X, a small X's exact one X^T X: passes over the row blocks."""
    rng = np.random.default_rng(0)
    X = rng.random((400, 8)) @ rng.random((8, 200 if layout != "small" else 40)) + 0.01 * rng.random((400, 1))
    if layout != "sparse":
        path = tmp_path / "x.npy"
        np.save(path, X)
    else:
        path = tmp_path / "x.npz"
        sp.save_npz(path, sp.csr_matrix(X * (rng.random(X.shape) < 0.2)))
    args = ("optimizer=hals", f"model.init={init}", "trainer.max_steps=1")
    _, W_whole, H_whole = _run(make_cfg, tmp_path, "whole", path, *args)
    _, W_rows, H_rows = _run(make_cfg, tmp_path, "rows", path, *args, "data.batch_rows=64")
    np.testing.assert_allclose(H_rows, H_whole, rtol=1e-9, atol=1e-12 * np.abs(H_whole).max())
    np.testing.assert_allclose(W_rows, W_whole, rtol=1e-9, atol=1e-12 * np.abs(W_whole).max())


@pytest.mark.parametrize("stored", ["contiguous", "chunked"])
def test_h5ad_rows_read_alike_however_stored_and_the_file_is_never_changed(tmp_path, stored):
    """Contiguous and chunked (compressed) CSR arrays give the same blocks, pass after pass.

    A block with duplicates is made canonical as read: every pass reads the file's values.
    """
    h5py = pytest.importorskip("h5py")
    data, indices, indptr = np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.array([1, 0, 0, 1, 2]), np.array([0, 3, 4, 5])
    options = {"chunks": True, "compression": "gzip"} if stored == "chunked" else {}
    path = tmp_path / "x.h5ad"
    with h5py.File(path, "w") as f:
        g = f.create_group("X")
        g.attrs["encoding-type"], g.attrs["shape"] = "csr_matrix", (3, 3)
        for name, values in (("data", data), ("indices", indices), ("indptr", indptr)):
            g.create_dataset(name, data=values, **options)
    before = path.read_bytes()
    h5 = H5Matrix(path)
    want = np.array([[5.0, 1.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 5.0]])  # row 0 holds column 0 twice
    for _ in range(2):
        blocks = list(RowBlocks(h5, 2, scan(h5, 2), torch.float64, transposes=False))
        got = [torch.sparse_csr_tensor(b["indptr"], b["indices"], b["data"], b["shape"]).to_dense() for b in blocks]
        np.testing.assert_array_equal(torch.cat(got).numpy(), want)
    h5.close()
    assert path.read_bytes() == before
