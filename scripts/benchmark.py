"""Benchmark nmf-lightning against a plain PyTorch loop, scikit-learn and GPU NMF packages.

Every method runs in this one process on the same matrix and device. For each it reports
wall time to a target relative error (scikit-learn's best + 1%), the final relative error
||X - WH||_F / ||X||_F, updates per second, peak GPU memory and achieved GFLOP/s against
the device's measured matmul rate. nmf-lightning and scikit-learn first run a few updates
on the problem's own matrix, so one-time costs of a process (Lightning's first fit, the
thread pool, the allocator's first pages of each size) are charged to no method, and each
method starts after a second's pause: the BLAS and OpenMP threads of the one before spin
for a while after it returns, and on a 2-core machine that halves the next one's speed. Writes <out>/benchmark.json and <out>/benchmark.md.

    python scripts/benchmark.py --device cpu --problems digits,dense-small,newsgroups4
    python scripts/benchmark.py --device cuda --problems all --matmul-precision high

``--scaling 1,2`` times trainer=ddp instead, through the real CLI: one process, DDP with 1
rank (the strategy's own cost), then N ranks, each on the same problem and seed (their
iterates are equal), with the bytes all-reduced per update and the share of the time
spent in the all-reduces (waiting for the slowest rank included). Writes <out>/scaling.md.

    python scripts/benchmark.py --device cpu --problems digits,dense-small --scaling 1,2
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import scipy.sparse as sp
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nmf_lightning.data import NMFDataModule, digits, newsgroups, synthetic
from nmf_lightning.init import initialize
from nmf_lightning.linalg import sq_error_gram
from nmf_lightning.module import NMFModule
from nmf_lightning.objective import negativity_penalty
from nmf_lightning.solvers import registry

ARCHIVE = Path(
    os.environ.get(
        "NMF_NEWSGROUPS_ARCHIVE",
        Path(__file__).resolve().parents[1].parent / "shared/data/newsgroups/20news-bydate.tar.gz",
    )
)


def sparse_low_rank(n: int, m: int, nnz: int, rank: int, seed: int = 0):
    """A sparse n x m matrix with ``nnz`` entries at random places, valued by a random rank-``rank`` W0 H0 plus noise."""
    from nmf_lightning.data import Matrix

    rng = np.random.default_rng(seed)
    flat = np.unique(rng.integers(0, n * m, size=int(nnz * 1.1)))  # sorted, distinct places
    flat = np.sort(rng.choice(flat, size=min(nnz, len(flat)), replace=False))
    rows, cols = np.divmod(flat, m)
    W0, H0 = rng.random((n, rank), dtype=np.float32), rng.random((rank, m), dtype=np.float32)
    vals = np.empty(len(flat), dtype=np.float32)
    for start in range(0, len(flat), 1 << 22):  # bounded (chunk, rank) gathers
        part = slice(start, start + (1 << 22))
        vals[part] = np.einsum("ij,ij->i", W0[rows[part]], H0[:, cols[part]].T)
    vals *= rng.uniform(0.9, 1.1, size=len(vals)).astype(np.float32)
    return Matrix(sp.csr_matrix((vals, (rows, cols)), shape=(n, m)), name="sparse-low-rank")


# The 20 newsgroups notebook's recipe: ||X-WH||_F + 10 * clamp penalty, Adam(1e-3, (.9, .9)),
# init |N(0, 0.01)|, no projection. Dense problems use a projected Adam with a scaled init.
NOTEBOOK = dict(lam=10.0, project=False, init="normal_abs", lr=1e-3, betas=(0.9, 0.9))
PROJECTED = dict(lam=0.0, project=True, init="random", lr=1e-2, betas=(0.9, 0.999))
PROBLEMS = {
    "digits": dict(load=digits, k=16, steps=2000, recipe=PROJECTED),
    "dense-small": dict(
        load=partial(synthetic, n_rows=2000, n_cols=1000, true_rank=20, noise=0.05),
        k=20,
        steps=2000,
        recipe=PROJECTED,
    ),
    "dense-500": dict(
        load=partial(synthetic, n_rows=500, n_cols=400, true_rank=20, noise=0.05),
        k=20,
        steps=2000,
        recipe=PROJECTED,
    ),
    "dense-large": dict(
        load=partial(synthetic, n_rows=20000, n_cols=20000, true_rank=64, noise=0.05),
        k=64,
        steps=300,
        recipe=PROJECTED,
        gpu_only=True,
    ),
    # RcppML's published GPU figure (H100 NVL): about 0.14 s per ALS iteration at this size
    "sparse-33m": dict(
        load=partial(sparse_low_rank, 5000, 40000, 33_000_000, 20), k=20, steps=100, recipe=PROJECTED, gpu_only=True
    ),
    "newsgroups4": dict(load=partial(newsgroups, archive=str(ARCHIVE)), k=100, steps=1000, recipe=NOTEBOOK),
    "newsgroups20": dict(
        load=partial(newsgroups, categories=None, archive=str(ARCHIVE)), k=100, steps=300, recipe=NOTEBOOK
    ),
}


#: pause before each timed method (see the module's docstring)
SETTLE_S = 1.0


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rel_err(X, W: np.ndarray, H: np.ndarray) -> float:
    """||X - WH||_F / ||X||_F in float64, without densifying a sparse X."""
    W, H = W.astype(np.float64), H.astype(np.float64)
    if sp.issparse(X):
        X = X.tocsr().astype(np.float64)
        x2 = (X.data**2).sum()
        sq = x2 - 2 * (X @ H.T * W).sum() + ((W.T @ W) * (H @ H.T)).sum()
        return math.sqrt(max(sq, 0.0) / x2)
    return float(np.linalg.norm(X - W @ H) / np.linalg.norm(X))


def flops_per_update(n: int, m: int, nnz: int, k: int, form: str) -> float:
    """Matmul FLOPs of one gradient update: Gram form 4 nnz k + 4 (n+m) k^2, residual 6 n m k."""
    return 4.0 * nnz * k + 4.0 * (n + m) * k * k if form == "gram" else 6.0 * n * m * k


def matmul_rate(device: str, dtype: torch.dtype) -> float:
    """Measured dense matmul throughput in GFLOP/s (the roofline the rows are compared with)."""
    size = 8192 if device.startswith("cuda") else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.startswith("cuda") else 5
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * size**3 * reps / (time.perf_counter() - t) / 1e9


def spmm_bytes(n: int, m: int, nnz: int, k: int) -> float:
    """Bytes the two sparse products of an update move at least: X (values + int64 column
    indices + row pointers) read once as CSR and once as its transpose, each dense operand
    read once and each (rows, k) result written once, in float32."""
    return 2 * (12.0 * nnz) + 8.0 * (n + m + 2) + 2 * 4.0 * k * (n + m)


def copy_bandwidth(device: str) -> float:
    """Measured memory bandwidth in GB/s: a large tensor copy (bytes read + written per second)."""
    numel = (1 << 26) if device.startswith("cuda") else (1 << 25)  # 256 MB / 128 MB of float32
    a = torch.ones(numel, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync(device)
    reps = 20 if device.startswith("cuda") else 5
    t = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    sync(device)
    return 2 * 4 * numel * reps / (time.perf_counter() - t) / 1e9


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_mb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def time_to(curve: list[tuple[float, float]], target: float | None) -> float | None:
    if target is None:
        return None
    return next((t for t, e in curve if e <= target), None)


# ----------------------------------------------------------------------------- methods
def bench_trainer(out: Path, device: str, steps: int) -> L.Trainer:
    """nmf-train's Trainer, quiet, logging a point every 10 updates (each with the time it was reached) to ``out``."""
    return L.Trainer(
        accelerator="gpu" if device.startswith("cuda") else "cpu",
        devices=1,
        max_steps=steps,
        logger=TensorBoardLogger(str(out), name="", version=""),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
    )


def run_lightning(
    matrix, p: dict, device: str, steps: int, restarts: int = 1, solver: str | None = None, sweeps: int = 1
) -> dict:
    """nmf-lightning: the real NMFModule + NMFDataModule + Trainer path of nmf-train.

    ``solver`` (hals, mu) swaps Adam for a closed-form solver with scikit-learn's init and
    tolerance, so its row compares like with like.
    """
    r = p["recipe"]
    out = Path(tempfile.mkdtemp(prefix="nmfl-bench-"))
    if solver is None:
        opt, extra = partial(torch.optim.Adam, lr=r["lr"], betas=r["betas"]), {}
        extra = dict(lam=r["lam"], project=r["project"], init=r["init"])
    else:
        opt, extra = registry.lookup(solver).factory, dict(init="nndsvda", tol=1e-4)
        if sweeps > 1:  # accelerated HALS
            opt = partial(opt, sweeps=sweeps)
    model = NMFModule(rank=p["k"], optimizer=opt, restarts=restarts, seed=0, **extra)
    trainer = bench_trainer(out, device, steps)
    wall0 = time.time()
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=NMFDataModule(loader=lambda: matrix))
    sync(device)
    total = time.perf_counter() - t0
    ea = EventAccumulator(str(out), size_guidance={"scalars": 0})
    ea.Reload()
    events = ea.Scalars("train/relative_error")
    curve = [(e.wall_time - wall0, e.value) for e in events]
    steady = (events[-1].step - events[0].step) / max(events[-1].wall_time - events[0].wall_time, 1e-9)
    W, H = model.factors()
    form = _form(matrix) if solver is None else solver
    return dict(wall_s=total, curve=curve, updates=model.global_step, updates_per_s=steady, W=W, H=H, form=form)


def _form(matrix) -> str:
    return "gram" if sp.issparse(matrix.X) or not np.isnan(matrix.X).any() else "residual"


def run_torch_loop(matrix, p: dict, device: str, steps: int, form: str) -> dict:
    """The 20 newsgroups notebook's loop, verbatim math; ``form='gram'`` swaps in the Gram loss."""
    r = p["recipe"]
    if form == "residual":  # the notebook densifies X
        Xd = matrix.X.toarray() if sp.issparse(matrix.X) else matrix.X
        X = torch.from_numpy(np.asarray(Xd, dtype=np.float32)).to(device)
    elif sp.issparse(matrix.X):
        csr = matrix.X.tocsr().astype(np.float32)
        X = torch.sparse_csr_tensor(
            torch.from_numpy(csr.indptr.astype(np.int64)),
            torch.from_numpy(csr.indices.astype(np.int64)),
            torch.from_numpy(csr.data),
            size=csr.shape,
        ).to(device)
    else:
        X = torch.from_numpy(matrix.X.astype(np.float32)).to(device)
    Xt = X.t().to_sparse_csr() if X.layout == torch.sparse_csr else X.T
    x_sq = (X.values() if X.layout == torch.sparse_csr else X).double().pow(2).sum().float()
    W0, H0 = initialize(X, p["k"], r["init"], generator=torch.Generator().manual_seed(0))
    W, H = W0.clone().requires_grad_(), H0.clone().requires_grad_()
    opt = torch.optim.Adam([W, H], lr=r["lr"], betas=r["betas"])
    log_every = max(1, steps // 20)
    curve, wall0 = [], time.perf_counter()
    for i in range(steps):
        opt.zero_grad()
        loss = torch.norm(X - W @ H) if form == "residual" else torch.sqrt(sq_error_gram(X, W, H, x_sq, Xt))
        if r["lam"]:
            loss = loss + r["lam"] * negativity_penalty(W, H)
        loss.backward()
        opt.step()
        if r["project"]:
            with torch.no_grad():
                W.clamp_(min=0)
                H.clamp_(min=0)
        if (i + 1) % log_every == 0:  # sync point for the curve, as a user's print would be
            with torch.no_grad():
                sq = sq_error_gram(X, W, H, x_sq, Xt)
                curve.append((time.perf_counter() - wall0, math.sqrt(float(sq) / float(x_sq))))
    sync(device)
    total = time.perf_counter() - wall0
    return dict(
        wall_s=total,
        curve=curve,
        updates=steps,
        updates_per_s=steps / total,
        W=W.detach().cpu().numpy(),
        H=H.detach().cpu().numpy(),
        form=form,
    )


def run_sklearn(matrix, p: dict, solver: str, max_iter: int) -> dict:
    from sklearn.decomposition import NMF

    X = matrix.X.astype(np.float32) if not sp.issparse(matrix.X) else matrix.X.astype(np.float32)
    est = NMF(n_components=p["k"], solver=solver, init="nndsvda", tol=1e-4, max_iter=max_iter, random_state=0)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        W = est.fit_transform(X)
    total = time.perf_counter() - t0
    return dict(
        wall_s=total,
        curve=None,
        updates=est.n_iter_,
        updates_per_s=est.n_iter_ / total,
        W=W,
        H=est.components_,
        form="-",
    )


def run_torchnmf(matrix, p: dict, device: str, max_iter: int) -> dict:
    from torchnmf.nmf import NMF as TNMF

    Xd = matrix.X.toarray() if sp.issparse(matrix.X) else matrix.X
    V = torch.from_numpy(np.asarray(Xd, dtype=np.float32)).to(device)
    model = TNMF(V.shape, rank=p["k"]).to(device)
    t0 = time.perf_counter()
    n_iter = model.fit(V, beta=2, tol=1e-4, max_iter=max_iter)
    sync(device)
    total = time.perf_counter() - t0
    # torchnmf factors V (n, m) ~ H (n, k) @ W (m, k)^T
    Wn, Hn = model.H.detach().cpu().numpy(), model.W.detach().cpu().numpy().T
    return dict(wall_s=total, curve=None, updates=n_iter, updates_per_s=n_iter / total, W=Wn, H=Hn, form="residual")


def run_nmf_torch(matrix, p: dict, device: str, algo: str = "halsvar") -> dict:
    from nmf import run_nmf

    Xd = matrix.X.toarray() if sp.issparse(matrix.X) else matrix.X
    X = torch.from_numpy(np.asarray(Xd, dtype=np.float32))
    t0 = time.perf_counter()
    A, B, _ = run_nmf(
        X,
        n_components=p["k"],
        init="nndsvda",
        algo=algo,
        tol=1e-4,
        use_gpu=device.startswith("cuda"),
        random_state=0,
    )
    total = time.perf_counter() - t0
    A, B = np.asarray(A), np.asarray(B)
    W, H = (A, B) if A.shape[0] == Xd.shape[0] else (B.T, A.T)
    return dict(wall_s=total, curve=None, updates=None, updates_per_s=None, W=W, H=H, form="-")


# ------------------------------------------------------------------------------ driver
def bench_problem(name: str, device: str, peak: float, args) -> list[dict]:
    p = PROBLEMS[name]
    if p.get("gpu_only") and not device.startswith("cuda"):
        return [dict(problem=name, method="all", status="skipped: needs a GPU (too slow for a 2-core CPU)")]
    if "newsgroups" in name and not ARCHIVE.is_file():
        return [dict(problem=name, method="all", status=f"skipped: {ARCHIVE} not found")]
    matrix = p["load"]()
    X = matrix.X
    n, m = X.shape
    nnz = X.nnz if sp.issparse(X) else n * m
    steps = args.steps or p["steps"]
    base = dict(
        problem=name,
        n=n,
        m=m,
        nnz=nnz,
        k=p["k"],
        device=device,
        dtype="float32",
        sparse=sp.issparse(X),
        matmul=args.matmul_precision,
    )
    methods = [
        ("sklearn cd", lambda: run_sklearn(matrix, p, "cd", args.sk_max_iter)),
        ("sklearn mu", lambda: run_sklearn(matrix, p, "mu", args.sk_max_iter)),
        ("nmf-lightning hals (tol 1e-4)", lambda: run_lightning(matrix, p, device, args.sk_max_iter, solver="hals")),
        (
            "nmf-lightning hals, 2 sweeps (tol 1e-4)",
            lambda: run_lightning(matrix, p, device, args.sk_max_iter, solver="hals", sweeps=2),
        ),
        ("nmf-lightning mu (tol 1e-4)", lambda: run_lightning(matrix, p, device, args.sk_max_iter, solver="mu")),
        ("nmf-lightning als (tol 1e-4)", lambda: run_lightning(matrix, p, device, args.sk_max_iter, solver="als")),
        (
            "nmf-lightning kaczmarz (tol 1e-4)",
            lambda: run_lightning(matrix, p, device, args.sk_max_iter, solver="kaczmarz"),
        ),
        ("nmf-lightning adam", lambda: run_lightning(matrix, p, device, steps)),
        (
            "torch loop adam (notebook, residual)",
            lambda: run_torch_loop(matrix, p, device, steps, "residual"),
        ),
        ("torch loop adam (gram)", lambda: run_torch_loop(matrix, p, device, steps, "gram")),
        ("torchnmf mu (GPU package)", lambda: run_torchnmf(matrix, p, device, args.sk_max_iter)),
        ("nmf-torch halsvar (GPU package)", lambda: run_nmf_torch(matrix, p, device)),
        ("nmf-torch mu (GPU package)", lambda: run_nmf_torch(matrix, p, device, algo="mu")),
        ("nmf-torch bpp (GPU package)", lambda: run_nmf_torch(matrix, p, device, algo="bpp")),
    ]
    for r in (int(v) for v in str(args.restarts).split(",")):  # batched restarts against r sequential runs
        if r > 1:
            methods.append(
                (f"nmf-lightning adam x{r} restarts", partial(run_lightning, matrix, p, device, steps, restarts=r))
            )
    if args.methods:
        wanted = args.methods.split(",")
        methods = [(name, fn) for name, fn in methods if any(w in name for w in wanted)]
    dense_gb = n * m * 4 / 2**30
    rows: list[dict] = []
    warm_up(matrix, p, device, sklearn=_skip_reason(name, "sklearn cd", device, dense_gb, args) is None)
    for method, fn in methods:
        row = dict(base, method=method)
        skip = _skip_reason(name, method, device, dense_gb, args)
        if skip:
            rows.append(dict(row, status=f"skipped: {skip}"))
            continue
        _reset_peak(device)
        time.sleep(SETTLE_S)  # let the previous method's spinning threads go idle
        try:
            res = fn()
        except Exception as err:  # a peer that fails is reported, not dropped
            traceback.print_exc()
            rows.append(dict(row, status=f"failed: {type(err).__name__}: {str(err)[:160]}"))
            continue
        row.update(
            status="ok",
            wall_s=res["wall_s"],
            updates=res["updates"],
            updates_per_s=res["updates_per_s"],
            final_rel_err=rel_err(X, res["W"], res["H"]),
            peak_mem_mb=_peak_mb(device),
            curve=res["curve"],
            form=res["form"],
        )
        if res["updates_per_s"] and res["form"] in ("gram", "residual"):
            gflops = flops_per_update(n, m, nnz, p["k"], res["form"]) * res["updates_per_s"] / 1e9
            row.update(gflops=gflops, pct_of_matmul_peak=100 * gflops / peak)
        if res["updates_per_s"] and sp.issparse(X) and method.startswith("nmf-lightning"):
            gbs = spmm_bytes(n, m, nnz, p["k"]) * res["updates_per_s"] / 1e9  # as if the SpMMs took the update
            row.update(spmm_gbs=gbs, pct_of_bandwidth=100 * gbs / args.bandwidth)
        rows.append(row)
        print(_fmt_row(row), flush=True)
    sk = [r["final_rel_err"] for r in rows if r["method"].startswith("sklearn") and r.get("status") == "ok"]
    target = min(sk) * 1.01 if sk else None
    for r in rows:
        r["target_rel_err"] = target
        if r.get("status") != "ok":
            continue
        if r["curve"] is not None:
            r["time_to_target_s"] = time_to(r["curve"], target)
        elif target is not None:
            r["time_to_target_s"] = r["wall_s"] if r["final_rel_err"] <= target else None
        r.pop("curve")
    if sp.issparse(X):
        csr = X.tocsr()
        base_bytes = csr.data.nbytes + csr.indices.nbytes + csr.indptr.nbytes + 4 * p["k"] * (n + m)
        for r in rows:
            r["mem_budget_mb"] = 3 * base_bytes / 2**20  # 3 x (X's CSR arrays + W + H)
    return rows


def warm_up(matrix, p: dict, device: str, sklearn: bool = True) -> None:
    """A few updates of each library on the problem's matrix, untimed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for solver in ("hals", None):
            run_lightning(matrix, p, device, 3, solver=solver)
        if sklearn:
            run_sklearn(matrix, p, "cd", 3)


def _skip_reason(problem: str, method: str, device: str, dense_gb: float, args) -> str | None:
    cpu = not device.startswith("cuda")
    if method.startswith("sklearn") and problem == "dense-large":
        return "scikit-learn on a 20000x20000 dense matrix takes longer than this benchmark's budget"
    if method == "sklearn cd" and problem == "newsgroups20":
        return "single-threaded coordinate descent on 11k x 101k at k=100 outlasts this benchmark's budget"
    residual_like = "residual" in method or "torchnmf" in method or "nmf-torch" in method
    if residual_like and cpu and dense_gb > 0.1 and problem not in ("dense-small", "newsgroups4"):
        return f"dense n x m residual ({dense_gb:.1f} GB per temporary) is too slow on a CPU"
    if residual_like and dense_gb > 8:
        return f"dense X would take {dense_gb:.0f} GB"
    return None


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _fmt_row(r: dict) -> str:
    if r.get("status") != "ok":
        return f"| {r['problem']} | {r['method']} | {r.get('status')} |"
    return (
        f"| {r['problem']} | {r['method']} | {_fmt(r.get('time_to_target_s'), '.2f')} | {r['final_rel_err']:.4f} "
        f"| {r['wall_s']:.2f} | {_fmt(r['updates'], 'd')} | {_fmt(r['updates_per_s'], '.1f')} "
        f"| {_fmt(r.get('peak_mem_mb'), '.0f')} | {_fmt(r.get('gflops'), '.1f')} "
        f"| {_fmt(r.get('pct_of_matmul_peak'), '.1f')} | {_fmt(r.get('spmm_gbs'), '.1f')} "
        f"| {_fmt(r.get('pct_of_bandwidth'), '.1f')} |"
    )


HEADER = (
    "| problem | method | time to target (s) | final rel. error | wall (s) | updates | updates/s "
    "| peak GPU MB | GFLOP/s | % of matmul peak | SpMM GB/s | % of bandwidth |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


SCALING_HEADER = (
    "| problem | method | processes | time to target (s) | updates/s | speed-up | final rel. error "
    "| all-reduced bytes/update | statistics' bytes | time in all-reduce |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)
#: the solvers the scaling mode runs, with their options
SCALING_METHODS = {
    "hals": ("optimizer=hals",),
    "mu": ("optimizer=mu",),
    "adam": ("optimizer=adam", "optimizer.lr=auto"),
}


def scaling(names: list[str], ranks: list[int], device: str, steps: int | None, out: Path) -> list[dict]:
    """nmf-train on one process, as DDP with 1 rank, and as DDP with each N in ``ranks``; one row per run.

    The target is the one-process run's final relative error + 1%: the ranks' iterates
    are the same as one process's, so their time to it is the updates to it over their rate.
    """
    rows = []
    accelerator = "gpu" if device.startswith("cuda") else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            p = PROBLEMS[name]
            matrix = p["load"]()
            path = Path(tmp) / (f"{name}.npz" if sp.issparse(matrix.X) else f"{name}.npy")
            sp.save_npz(path, sp.csr_matrix(matrix.X)) if sp.issparse(matrix.X) else np.save(path, matrix.X)
            k, n_steps = p["k"], steps or p["steps"]
            for method, options in SCALING_METHODS.items():
                target = None
                base = None
                for label, world in [("1 process", 0), ("DDP, 1 rank", 1)] + [
                    (f"DDP, {r} ranks", r) for r in ranks if r > 1
                ]:
                    run = Path(tmp) / f"{name}-{method}-{world}"
                    command = [
                        sys.executable, "-m", "nmf_lightning.train", "data=file", f"data.path={path}", *options,
                        f"model.rank={k}", f"trainer.max_steps={n_steps}", f"trainer.accelerator={accelerator}",
                        "logger=csv", "trainer.log_every_n_steps=10", "callbacks=none", f"hydra.run.dir={run}",
                    ]  # fmt: skip
                    if world:
                        command += ["trainer=ddp", f"trainer.devices={world}"]
                    done = subprocess.run(command, capture_output=True, text=True)
                    if done.returncode:
                        print(f"{name} {method} {label}: failed\n{done.stderr[-2000:]}", flush=True)
                        continue
                    metrics = json.loads((run / "metrics.json").read_text())
                    curve = _csv_curve(run / "csv" / "metrics.csv")
                    target = target if target is not None else metrics["relative_error"] * 1.01
                    reached = next((step for step, err in curve if err <= target), None)
                    rate = metrics["updates_per_sec"]
                    base = base or rate
                    row = dict(
                        problem=name, method=method, processes=label, rate=rate, speedup=rate / base,
                        time_to_target=None if reached is None else reached / rate, rel_err=metrics["relative_error"],
                        comm_bytes=metrics.get("comm_bytes_per_update"), comm_share=metrics.get("comm_time_share"),
                        formula_bytes=4 * (k * matrix.X.shape[1] + (1 if method == "adam" else k * k)),
                    )  # fmt: skip
                    rows.append(row)
                    print(_fmt_scaling(row), flush=True)
                    _write_scaling(out, rows)
    return rows


def _csv_curve(path: Path) -> list[tuple[int, float]]:
    """(update, train relative error) from a CSVLogger's metrics.csv."""
    with open(path) as f:
        return [
            (int(r["step"]), float(r["train/relative_error"]))
            for r in csv.DictReader(f)
            if r.get("train/relative_error")
        ]


def _fmt_scaling(r: dict) -> str:
    comm = "-" if r["comm_bytes"] is None else f"{r['comm_bytes']:.0f}"
    share = "-" if r["comm_share"] is None else f"{r['comm_share']:.0%}"
    return (
        f"| {r['problem']} | {r['method']} | {r['processes']} | {_fmt(r['time_to_target'], '.2f')} | {r['rate']:.0f} "
        f"| {r['speedup']:.2f}x | {r['rel_err']:.4f} | {comm} | {r['formula_bytes']:.0f} | {share} |"
    )


def _write_scaling(out: Path, rows: list[dict]) -> None:
    command = " ".join([sys.executable.split("/")[-1], *sys.argv])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} threads)"
    md = [
        f"Command: `{command}`  ",
        f"Device: {device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. Each row is a whole `nmf-train` "
        "run (start-up excluded from updates/s). Target = the one-process run's final relative error + 1%. "
        "Statistics' bytes: what an update must all-reduce, k^2 + k m float32 numbers (W^T W and W^T X; adam: "
        "H's gradient, k m, and the error); the measured bytes add the metrics' scalars, once per logged point.",
        "",
        SCALING_HEADER,
        *[_fmt_scaling(r) for r in rows],
    ]
    (out / "scaling.md").write_text("\n".join(md) + "\n")
    (out / "scaling.json").write_text(json.dumps(rows, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--problems", default="digits,dense-small,newsgroups4")
    ap.add_argument("--steps", type=int, default=None, help="override each problem's update count")
    ap.add_argument("--sk-max-iter", type=int, default=400)
    ap.add_argument("--restarts", default="1", help="also time r batched restarts (comma-separated: 8,32)")
    ap.add_argument("--matmul-precision", default="highest", choices=["highest", "high", "medium"])
    ap.add_argument("--out", default="results/benchmark")
    ap.add_argument("--methods", default=None, help="comma-separated: only the methods whose name contains one")
    ap.add_argument("--scaling", default=None, help="time trainer=ddp with these numbers of processes (e.g. 1,2)")
    args = ap.parse_args()
    if args.scaling:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        names = args.problems.split(",")
        scaling(names, [int(r) for r in args.scaling.split(",")], args.device, args.steps, out)
        print((out / "scaling.md").read_text())
        return
    torch.set_float32_matmul_precision(args.matmul_precision)
    names = list(PROBLEMS) if args.problems == "all" else args.problems.split(",")
    device = args.device
    peak = matmul_rate(device, torch.float32)
    args.bandwidth = copy_bandwidth(device)
    dev_name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({os.cpu_count()} threads)"
    print(f"device: {dev_name}, float32 matmul ({args.matmul_precision}): {peak:.0f} GFLOP/s", flush=True)
    print(HEADER)
    rows: list[dict] = []
    meta = dict(
        command=" ".join([sys.executable.split("/")[-1], *sys.argv]),
        date=time.strftime("%Y-%m-%d"),
        device=dev_name,
        torch=torch.__version__,
        python=platform.python_version(),
        matmul_gflops=peak,
        bandwidth_gbs=args.bandwidth,
        matmul_precision=args.matmul_precision,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:  # write after each problem, so a cut-off run keeps what it measured
        rows += bench_problem(name, device, peak, args)
        write_results(out, meta, rows)
    print((out / "benchmark.md").read_text())


def write_results(out: Path, meta: dict, rows: list[dict]) -> None:
    (out / "benchmark.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=float) + "\n")
    md = [
        f"Command: `{meta['command']}`  ",
        f"Device: {meta['device']}, torch {meta['torch']}, {meta['date']}; measured float32 matmul "
        f"({meta['matmul_precision']}): {meta['matmul_gflops']:.0f} GFLOP/s; measured copy bandwidth: "
        f"{meta.get('bandwidth_gbs', float('nan')):.0f} GB/s. Target = best scikit-learn relative error + 1%. "
        "SpMM GB/s (sparse X): the bytes the update's two sparse products move at least, per second of update.",
        "",
        HEADER,
        *[_fmt_row(r) for r in rows],
    ]
    (out / "benchmark.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
