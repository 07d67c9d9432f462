"""Consensus NMF against cNMF's algorithm on the same machine, and its memory at R = 200, k = 20.

cNMF (scikit-learn, one restart after another, then its combine step) is reproduced in
``scripts/cnmf_reference.py`` from the ``cnmf`` package's source. Both run on the same
single-cell-like count matrix with planted programs, genes scaled to unit variance as
cNMF's ``prepare`` does; times are factorize + combine + usage refit, from one run of each,
back to back in this process. Quality: the relative error of the consensus factors, the
silhouette, and the planted programs' cosine similarity to the consensus ones (matched).

    python scripts/benchmark_consensus.py --restarts 10,100 --k 13 --out results/cpu-consensus
    python scripts/benchmark_consensus.py --memory --out results/cpu-consensus   # R=200, k=20, 20000 x 5000
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import cnmf_reference as cnmf  # noqa: E402

from nmf_lightning import NMF  # noqa: E402


def ours(X, k: int, restarts: int, max_iter: int, seed: int = 0) -> dict:
    """nmf-lightning's consensus: R restarts as one batched problem, then the clustering and W."""
    start = time.perf_counter()
    est = NMF(k, solver="cd", restarts=restarts, consensus=True, max_iter=max_iter, tol=1e-4, random_state=seed)
    W = est.fit_transform(X)
    seconds = time.perf_counter() - start
    x_sq = float(X.multiply(X).sum())
    return {
        "seconds": seconds,
        "relative_error": est.reconstruction_err_ / np.sqrt(x_sq),
        "best_restart_relative_error": est.best_restart_err_ / np.sqrt(x_sq),
        "silhouette": est.stability_,
        "kept": est.consensus_kept_,
        "H": est.components_,
        "W": W,
    }


def reference(X, k: int, restarts: int, seed: int = 0) -> dict:
    """cNMF's factorize (scikit-learn, restart after restart) and combine."""
    start = time.perf_counter()
    spectra = cnmf.factorize(X, k, restarts, seed)
    found = cnmf.combine(X, spectra, k)
    return {"seconds": time.perf_counter() - start, **found}


def compare(args: argparse.Namespace) -> list[dict]:
    X, _, H_true = cnmf.counts(args.cells, args.genes, args.planted, seed=0)
    X = cnmf.scale_genes(X)
    rows = []
    for R in args.restarts:
        theirs = reference(X, args.k, R)
        mine = ours(X, args.k, R, args.max_iter)
        row = {"restarts": R, "k": args.k, "planted": args.planted, "shape": list(X.shape), "nnz": int(X.nnz)}
        for name, found in (("cnmf", theirs), ("ours", mine)):
            _, cos = cnmf.match_programs(H_true, found["H"])  # each planted program's best match
            row[name] = {
                "seconds": round(found["seconds"], 2),
                "relative_error": round(float(found["relative_error"]), 5),
                "silhouette": round(float(found["silhouette"]), 4),
                "kept": round(float(found["kept"]), 4),
                "min_planted_cosine": round(float(cos.min()), 4),
            }
        row["ours"]["best_restart_relative_error"] = round(float(mine["best_restart_relative_error"]), 5)
        row["speedup"] = round(theirs["seconds"] / mine["seconds"], 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def memory(args: argparse.Namespace) -> dict:
    """R = 200 restarts of k = 20 on a 20 000 x 5 000 sparse matrix: peak RSS of the whole fit and consensus."""
    X, _, _ = cnmf.counts(20_000, 5_000, 20, seed=1)
    start = time.perf_counter()
    est = NMF(20, solver="cd", restarts=200, consensus=True, max_iter=args.memory_iter, random_state=0).fit(X)
    row = {
        "restarts": 200,
        "k": 20,
        "shape": list(X.shape),
        "nnz": int(X.nnz),
        "updates": args.memory_iter,
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "silhouette": round(est.stability_, 4),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--restarts", default="10,100", type=lambda s: [int(r) for r in s.split(",")])
    ap.add_argument("--cells", type=int, default=3000)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--planted", type=int, default=10, help="programs planted in the counts")
    ap.add_argument("--k", type=int, default=13, help="the rank fit (cNMF users sweep k past the planted one)")
    ap.add_argument("--max-iter", type=int, default=200, help="our updates at most (tol 1e-4 stops earlier)")
    ap.add_argument("--memory", action="store_true", help="only the R=200, k=20, 20000 x 5000 memory run")
    ap.add_argument("--memory-iter", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }
    result |= {"memory": memory(args)} if args.memory else {"compare": compare(args)}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        name = "memory.json" if args.memory else "compare.json"
        (args.out / name).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
