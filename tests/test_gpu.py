"""GPU checks: run with `pytest -m gpu` on a machine with CUDA."""

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import run_cli

from nmf_lightning.train import train

pytestmark = pytest.mark.gpu
SMALL = ("data=synthetic", "data.n_rows=300", "data.n_cols=200", "data.true_rank=5", "model.rank=5")


def _factors(path):
    with np.load(path / "factors.npz") as f:
        return f["W"], f["H"]


def _on_cpu_and_gpu(make_cfg, tmp_path, *overrides: str) -> dict[str, tuple[dict, tuple]]:
    """The same run on the CPU and on CUDA, each in its own folder: accelerator -> (metrics, (W, H))."""
    out = {}
    for acc in ("cpu", "gpu"):
        d = tmp_path / acc
        d.mkdir()
        metrics = train(make_cfg(*overrides, f"trainer.accelerator={acc}", f"paths.output_dir={d}"))
        out[acc] = (metrics, _factors(d))
    return out


@pytest.mark.parametrize("precision", ["32-true", "64-true"])
def test_gpu_run_matches_the_cpu_run(make_cfg, tmp_path, precision):
    out = _on_cpu_and_gpu(
        make_cfg, tmp_path, *SMALL, f"trainer.precision={precision}", "trainer.max_steps=200", "optimizer.lr=0.01"
    )
    if precision == "64-true":
        assert out["gpu"][0]["relative_error"] == pytest.approx(out["cpu"][0]["relative_error"], rel=1e-9)
        np.testing.assert_allclose(out["gpu"][1][0], out["cpu"][1][0], rtol=1e-8, atol=1e-9)
    else:  # cuBLAS and the CPU's BLAS round differently, and 200 Adam steps amplify it (2% on the CPU alone
        # between 1 and 2 threads): the same fit, not the same bits
        assert out["gpu"][0]["relative_error"] == pytest.approx(out["cpu"][0]["relative_error"], rel=5e-2)


def test_gpu_sparse_restarts_and_bf16(make_cfg, tmp_path):
    X = sp.random(400, 300, density=0.05, random_state=0, format="csr")
    path = tmp_path / "x.npz"
    sp.save_npz(path, X)
    metrics = train(
        make_cfg(
            "data=file",
            f"data.path={path}",
            "model.rank=8",
            "model.restarts=4",
            "trainer.accelerator=gpu",
            "trainer.max_steps=100",
            "optimizer.lr=0.01",
        )
    )
    assert 0 <= metrics["best_restart"] < 4 and metrics["relative_error"] < 1
    bf16 = train(
        make_cfg(
            *SMALL,
            "trainer.accelerator=gpu",
            "trainer.precision=bf16-mixed",
            "trainer.max_steps=100",
            "optimizer.lr=0.01",
        )
    )
    assert np.isfinite(bf16["relative_error"]) and bf16["relative_error"] < 0.5


@pytest.mark.parametrize(("layout", "optimizer"), [("dense", "hals"), ("sparse", "mu"), ("dense", "adam")])
def test_gpu_streamed_rows_match_the_whole_matrix(make_cfg, tmp_path, layout, optimizer):
    rng = np.random.default_rng(0)
    if layout == "dense":
        path = tmp_path / "x.npy"
        np.save(path, rng.random((300, 5)) @ rng.random((5, 200)))
    else:
        path = tmp_path / "x.npz"
        sp.save_npz(path, sp.random(300, 200, density=0.1, random_state=0, format="csr"))
    runs = []
    for extra in ((), ("data.batch_rows=64", "data.num_workers=1")):
        out = tmp_path / f"run{len(runs)}"
        out.mkdir()
        metrics = train(
            make_cfg(
                "data=file",
                f"data.path={path}",
                "model.rank=5",
                f"optimizer={optimizer}",
                "trainer.accelerator=gpu",
                "trainer.precision=64-true",
                "trainer.max_steps=30",
                f"paths.output_dir={out}",
                *extra,
            )
        )
        runs.append((metrics, _factors(out)))
    np.testing.assert_allclose(runs[1][1][0], runs[0][1][0], rtol=1e-8, atol=1e-10)
    assert runs[1][0]["relative_error"] == pytest.approx(runs[0][0]["relative_error"], rel=1e-8)


@pytest.mark.parametrize("solver", ["cd", "mu", "adam"])
def test_estimator_on_cuda_matches_the_cpu(solver):
    """NMF(device="cuda"): the same fit as on the CPU (float64), dense, sparse and with NaN; pickles to CPU."""
    import pickle

    from nmf_lightning import NMF

    rng = np.random.default_rng(0)
    X = rng.random((400, 6)) @ rng.random((6, 120))
    X_nan = X.copy()
    X_nan[rng.random(X.shape) < 0.1] = np.nan
    for data in (X, sp.csr_matrix(np.where(X > 1.5, X, 0)), X_nan):
        fits = {
            dev: NMF(6, solver=solver, init="random", random_state=0, max_iter=50, tol=0, device=dev).fit(data)
            for dev in ("cpu", "cuda")
        }
        np.testing.assert_allclose(fits["cuda"].components_, fits["cpu"].components_, rtol=1e-6, atol=1e-8)
        assert fits["cuda"].reconstruction_err_ == pytest.approx(fits["cpu"].reconstruction_err_, rel=1e-8)
    gpu = pickle.loads(pickle.dumps(fits["cuda"]))
    assert isinstance(gpu.components_, np.ndarray)
    np.testing.assert_allclose(gpu.transform(X_nan[:10]), fits["cpu"].transform(X_nan[:10]), rtol=1e-6, atol=1e-8)


def test_estimator_float32_and_row_blocks_on_cuda():
    from nmf_lightning import NMF

    X = np.random.default_rng(1).random((3000, 200)).astype(np.float32)
    whole = NMF(10, random_state=0, max_iter=30, tol=0, device="cuda").fit(X)
    blocks = NMF(10, random_state=0, max_iter=30, tol=0, device="cuda", batch_rows=700).fit(X)
    assert whole.components_.dtype == np.float32
    np.testing.assert_allclose(blocks.components_, whole.components_, rtol=1e-3, atol=1e-5)
    bf16 = NMF(10, random_state=0, max_iter=30, tol=0, device="cuda", precision="bf16").fit(X)
    assert bf16.reconstruction_err_ < 1.2 * whole.reconstruction_err_


@pytest.mark.parametrize("optimizer", ["hals", "adam"])
def test_gpu_curves_have_the_grid_points_timed_by_cuda_events(make_cfg, tmp_path, optimizer):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = train(
        make_cfg(
            *SMALL, "trainer.accelerator=gpu", f"optimizer={optimizer}", "trainer.max_steps=2000", "model.inner_steps=7"
        )
    )
    ea = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    ea.Reload()
    events = ea.Scalars("train/relative_error")
    assert [e.step for e in events] == list(range(10, 2001, 10))
    assert events[-1].value == pytest.approx(metrics["relative_error"], rel=1e-4)
    walls = [e.wall_time for e in events]
    assert walls == sorted(walls)


@pytest.mark.parametrize(
    ("loss", "optimizer", "layout"),
    [("kl", "mu", "sparse"), ("kl", "adam", "sparse"), ("is", "mu", "dense"), ("kl", "mu", "masked")],
)
def test_gpu_beta_divergence_matches_the_cpu(make_cfg, tmp_path, loss, optimizer, layout):
    rng = np.random.default_rng(0)
    if layout == "sparse":
        X = sp.random(300, 200, density=0.05, random_state=0, format="csr")
        X.data = np.ceil(4 * X.data)
        sp.save_npz(tmp_path / "x.npz", X)
        path = tmp_path / "x.npz"
    else:
        X = rng.gamma(2.0, 1.0, (300, 200)) + 0.01
        if layout == "masked":
            X[rng.random(X.shape) < 0.1] = np.nan
        np.save(tmp_path / "x.npy", X)
        path = tmp_path / "x.npy"
    out = _on_cpu_and_gpu(
        make_cfg,
        tmp_path,
        "data=file",
        f"data.path={path}",
        f"model.loss={loss}",
        f"optimizer={optimizer}",
        "model.rank=5",
        "trainer.precision=64-true",
        "trainer.max_steps=100",
    )
    assert out["gpu"][0]["divergence"] == pytest.approx(out["cpu"][0]["divergence"], rel=1e-8)
    np.testing.assert_allclose(out["gpu"][1][1], out["cpu"][1][1], rtol=1e-6, atol=1e-9)


def _moved(t, W, H, device, dtype):
    moved = t.to(device, dtype)
    moved._x_sq = None  # measured in the block's own values
    return moved, W.detach().to(device, dtype).clone(), H.detach().to(device, dtype).clone()


SOLVER_LAYOUTS = [
    (solver, layout)
    for solver in ("hals", "mu", "als", "kaczmarz", "adam")
    for layout in ("dense", "sparse", "masked", "triplets")
    if not (solver == "hals" and layout == "triplets")
    and not (solver == "kaczmarz" and layout in ("masked", "triplets"))
]


@pytest.mark.parametrize(("solver", "layout"), SOLVER_LAYOUTS)
@pytest.mark.parametrize("restarts", [1, 3])
@pytest.mark.parametrize("dtype", ["float64", "float32", "tf32", "bf16"])
def test_every_solver_layout_and_precision_on_cuda_follows_the_cpu(solver, layout, restarts, dtype):
    """The engine on CUDA against float64 on the CPU from the same start.

    float64: the same factors to 1e-8. Lower precisions: HALS and ALS clip at 0, so rounding
    changes which entries do and the factors part ways; the fit must not, so the relative
    error is compared, to the dtype's rounding.
    """
    import torch
    from test_solvers import _problem

    from nmf_lightning.engine import GradientUpdate, SolverUpdate, fit, sq_error
    from nmf_lightning.objective import Objective
    from nmf_lightning.solvers import registry

    if dtype == "bf16" and (layout == "sparse" or solver == "als"):
        pytest.skip("no bf16 sparse kernels or Cholesky (refused up front)")
    torch_dtype = {"float64": torch.float64, "float32": torch.float32, "tf32": torch.float32}.get(dtype, torch.bfloat16)
    t, W0, H0, *_ = _problem(n=120, m=80, k=5, layout=layout)
    if restarts > 1:
        W0 = W0.expand(restarts, *W0.shape) * torch.linspace(0.5, 1.5, restarts, dtype=W0.dtype)[:, None, None]
        H0 = H0.expand(restarts, *H0.shape).clone()
    runs = {}
    for device in ("cpu", "cuda"):
        torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
        try:
            target, W, H = _moved(t, W0, H0, device, torch.float64 if device == "cpu" else torch_dtype)
            if solver == "adam":
                W.requires_grad_(True)
                H.requires_grad_(True)
                update = GradientUpdate(torch.optim.Adam([W, H], lr=1e-2), Objective("fro2", n_obs=target.n_obs))
            else:
                update = SolverUpdate(registry.lookup(solver).factory.rule_class())
            fit(target, W, H, update, 20)
            W, H = W.detach().double(), H.detach().double()
            exact, _, _ = _moved(t, W, H, device, torch.float64)
            rel = (sq_error(exact, W, H) / exact.x_sq).sqrt().cpu()
            runs[device] = (rel, W.cpu())
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False
    assert torch.isfinite(runs["cuda"][0]).all()
    if dtype == "float64" and solver != "kaczmarz":  # Kaczmarz draws other rows on another device
        torch.testing.assert_close(runs["cuda"][1], runs["cpu"][1], rtol=1e-8, atol=1e-10)
    tol = {"float64": 1e-8, "float32": 5e-3, "tf32": 2e-2, "bf16": 5e-2}[dtype]
    tol = max(tol, 0.05) if solver == "kaczmarz" else tol
    torch.testing.assert_close(runs["cuda"][0], runs["cpu"][0], rtol=0, atol=tol)


def test_cli_on_cuda_with_factor_pictures(make_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = train(
        make_cfg(
            "data=digits",
            "optimizer=hals",
            "model.rank=8",
            "trainer.accelerator=gpu",
            "trainer.max_steps=60",
            "callbacks.factor_pictures.every_n_steps=20",
        )
    )
    assert metrics["relative_error"] < 0.5
    ea = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    ea.Reload()
    assert ea.Tags()["images"], "the pictures callback drew nothing from CUDA factors"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL sums between ranks need two GPUs")
def test_ddp_on_cuda_runs_nccl_and_matches_one_process(tmp_path):
    """trainer=ddp on every visible GPU (NCCL): the factors of one process, to float32 rounding."""
    ranks = torch.cuda.device_count()
    common = ("trainer.accelerator=gpu", *SMALL, "optimizer=hals", "trainer.max_steps=50", "logger=none")
    for name, extra in (("one", ()), ("ddp", ("trainer=ddp", f"trainer.devices={ranks}"))):
        result = run_cli(*common, *extra, f"hydra.run.dir={tmp_path / name}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    for a, b in zip(_factors(tmp_path / "ddp"), _factors(tmp_path / "one"), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert metrics["ddp_ranks"] == ranks and metrics["comm_bytes_per_update"] >= 4 * (25 + 5 * 200)
