"""Benchmark the beta-divergence losses (KL, IS) against scikit-learn's and torchnmf's MU.

Every method starts from the same W0, H0 (nmf-lightning's random init) in float32 on
the same matrix, in this one process. scikit-learn's ``NMF(solver="mu", beta_loss=...)``
runs ``--iters`` updates (tol=0); its final divergence sets the target, 1% above it.
nmf-lightning runs the real ``NMFModule`` + ``Trainer`` path of ``nmf-train`` with
``optimizer=mu`` and the loss, logging ``train/divergence`` every 10 updates with the
time it was reached; its time to the target counts from the start of ``trainer.fit``
(set-up included). torchnmf (``NMF.fit(V, beta)``) runs the same number of updates.
Divergences are scikit-learn's ``_beta_divergence`` of each method's factors, in float64.
Writes <out>/benchmark_divergence.json and .md.

    python scripts/benchmark_divergence.py --problems kl-digits,kl-poisson,is-spectrogram,kl-newsgroups20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from benchmark import bench_trainer  # scripts/ is on the path when a script runs
from sklearn.decomposition._nmf import _beta_divergence
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nmf_lightning.data import Matrix, NMFDataModule, digits, newsgroups, spectrogram
from nmf_lightning.module import NMFModule
from nmf_lightning.solvers import MU

ARCHIVE = Path(
    os.environ.get(
        "NMF_NEWSGROUPS_ARCHIVE",
        Path(__file__).resolve().parents[1].parent / "shared/data/newsgroups/20news-bydate.tar.gz",
    )
)


def poisson(n: int = 2000, m: int = 1000, rank: int = 20, seed: int = 0) -> Matrix:
    """Dense counts: Poisson draws around a random rank-``rank`` intensity (mean about 2)."""
    rng = np.random.default_rng(seed)
    rate = rng.gamma(1.0, 1.0, (n, rank)) @ rng.gamma(1.0, 1.0, (rank, m)) * (2.0 / rank)
    return Matrix(rng.poisson(rate).astype(np.float64), name="poisson")


PROBLEMS = {
    "kl-digits": dict(load=digits, loss="kl", k=16, iters=200),
    "kl-poisson": dict(load=poisson, loss="kl", k=20, iters=200),
    "is-spectrogram": dict(load=partial(spectrogram, n_frames=2000, n_bins=512, notes=8), loss="is", k=8, iters=200),
    "kl-newsgroups20": dict(
        load=partial(newsgroups, categories=None, archive=str(ARCHIVE), weighting="counts"), loss="kl", k=20, iters=200
    ),
}
BETA = {"kl": 1.0, "is": 0.0}


def run_lightning(matrix: Matrix, loss: str, k: int, iters: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """nmf-train's path: returns the run and the initial factors it drew (for the peers)."""
    out = Path(tempfile.mkdtemp(prefix="nmfl-div-"))
    model = NMFModule(rank=k, optimizer=MU, loss=loss, seed=0)
    model.set_matrix(matrix, dtype=torch.float32)  # draws W0, H0 here, so the peers can share them
    W0, H0 = (A.detach().numpy().copy() for A in (model.W, model.H))
    trainer = bench_trainer(out, "cpu", iters)
    wall0 = time.time()
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=NMFDataModule(loader=lambda: matrix))
    total = time.perf_counter() - t0
    ea = EventAccumulator(str(out), size_guidance={"scalars": 0})
    ea.Reload()
    curve = [(e.wall_time - wall0, e.value) for e in ea.Scalars("train/divergence")]
    W, H = model.factors()
    return dict(wall_s=total, curve=curve, updates=model.global_step, W=W, H=H), W0, H0


def run_sklearn(X, beta: float, k: int, iters: int, W0: np.ndarray, H0: np.ndarray) -> dict:
    from sklearn.decomposition import NMF

    est = NMF(k, solver="mu", beta_loss=beta, init="custom", max_iter=iters, tol=0)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        W = est.fit_transform(X, W=W0.copy(), H=H0.copy())
    return dict(wall_s=time.perf_counter() - t0, curve=None, updates=est.n_iter_, W=W, H=est.components_)


def run_torchnmf(X, beta: float, k: int, iters: int, W0: np.ndarray, H0: np.ndarray) -> dict:
    from torchnmf.nmf import NMF as TNMF

    if sp.issparse(X):
        coo = X.tocoo()
        idx = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
        V = torch.sparse_coo_tensor(idx, torch.from_numpy(coo.data), X.shape).coalesce()
    else:
        V = torch.from_numpy(X)
    # torchnmf factors V (n, m) ~ H (n, k) @ W (m, k)^T
    model = TNMF(W=torch.from_numpy(H0.T.copy()), H=torch.from_numpy(W0.copy()))
    t0 = time.perf_counter()
    n_iter = model.fit(V, beta=beta, tol=float("-inf"), max_iter=iters)  # -inf: never stops early
    total = time.perf_counter() - t0
    return dict(wall_s=total, curve=None, updates=n_iter, W=model.H.detach().numpy(), H=model.W.detach().numpy().T)


def bench(name: str, iters: int | None) -> list[dict]:
    p = PROBLEMS[name]
    matrix = p["load"]()
    X = matrix.X.astype(np.float32)
    iters = iters or p["iters"]
    beta = BETA[p["loss"]]
    ours, W0, H0 = run_lightning(matrix, p["loss"], p["k"], iters)
    runs = {"nmf-lightning mu": ours}
    runs["scikit-learn mu"] = run_sklearn(X, beta, p["k"], iters, W0, H0)
    try:
        runs["torchnmf"] = run_torchnmf(X, beta, p["k"], iters, W0, H0)
    except Exception as err:  # a peer's failure is a result, not the end of the benchmark
        print(f"{name}: torchnmf failed: {type(err).__name__}: {err}", file=sys.stderr)
    X64 = matrix.X.astype(np.float64)
    target = None
    rows = []
    for method, run in runs.items():
        d = float(_beta_divergence(X64, run["W"].astype(np.float64), run["H"].astype(np.float64), beta))
        if method == "scikit-learn mu":
            target = 1.01 * d
        rows.append(dict(problem=name, shape=f"{X.shape[0]}x{X.shape[1]}", nnz=_nnz(X), k=p["k"], loss=p["loss"]))
        rows[-1].update(method=method, updates=run["updates"], wall_s=run["wall_s"], divergence=d, curve=run["curve"])
    for row in rows:
        curve = row.pop("curve")
        row["target"] = target
        row["time_to_target_s"] = next((t for t, v in curve if v <= target), None) if curve else None
        if row["method"] == "scikit-learn mu":
            row["time_to_target_s"] = row["wall_s"]  # its own final value is within 1% of itself
        row["updates_per_s"] = row["updates"] / row["wall_s"]
        print(json.dumps(row), flush=True)
    return rows


def _nnz(X) -> int:
    return int(X.nnz if sp.issparse(X) else np.count_nonzero(X))


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", default="kl-digits,kl-poisson,is-spectrogram")
    ap.add_argument("--iters", type=int, default=None, help="override each problem's update count")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--out", default="results/cpu-divergence")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = list(PROBLEMS) if args.problems == "all" else args.problems.split(",")
    unknown = sorted(set(names) - set(PROBLEMS))
    if unknown:
        ap.error(f"unknown problems {unknown}; choose from {sorted(PROBLEMS)} or all")
    if "kl-newsgroups20" in names and not ARCHIVE.is_file():
        ap.error(f"kl-newsgroups20 reads {ARCHIVE}; set NMF_NEWSGROUPS_ARCHIVE to the 20news-bydate.tar.gz path")
    rows = [row for name in names for row in bench(name, args.iters)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(
        command="python " + " ".join(sys.argv),
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        torch=torch.__version__,
        threads=torch.get_num_threads(),
    )
    (out / "benchmark_divergence.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [
        f"# Beta-divergence benchmark\n\n`{meta['command']}`\n\n{meta['machine']}, torch {meta['torch']}, "
        f"{meta['threads']} threads. Same W0, H0 and float32 for every method; divergence = scikit-learn's "
        "`_beta_divergence` of the final factors; target = scikit-learn's final divergence + 1%.\n",
        "| problem | shape | nnz | k | loss | method | updates | wall s | updates/s | divergence | time to target s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['problem']} | {r['shape']} | {r['nnz']} | {r['k']} | {r['loss']} | {r['method']} | {r['updates']} "
            f"| {r['wall_s']:.2f} | {r['updates_per_s']:.1f} | {r['divergence']:.6g} | "
            f"{_fmt(r['time_to_target_s'], '.2f')} |"
        )
    (out / "benchmark_divergence.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}/benchmark_divergence.md")


if __name__ == "__main__":
    main()
