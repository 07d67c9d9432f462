"""Where an update's time goes: torch ops per update, and on a GPU the kernels' own time.

An update that is launch-bound spends its time issuing many small kernels, not running
them. For each solver this runs warm-up updates through the engine, then profiles
``--updates`` more with ``torch.profiler`` and reports per update:

- ``ops``: top-level torch calls that compute (views and allocations left out): on a GPU
  each is about one kernel launch;
- ``wall ms``: the updates' wall time, synchronised;
- on CUDA, ``kernels`` and ``kernel ms`` (the sum of the kernels' own times) and
  ``wall / kernels``: 1 where the GPU never waits for the host.

    python scripts/profile_update.py --device cpu --dtype bfloat16   # HALS's GPU path, on the CPU
    python scripts/profile_update.py --device cuda --out results/gpu
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from nmf_lightning.engine import GradientUpdate, SolverUpdate, fit, to_block
from nmf_lightning.engine.updates import fused_optimizer
from nmf_lightning.objective import Objective
from nmf_lightning.solvers.rules import HALSRule, MURule

#: torch calls that make views or allocate, and launch no kernel of their own
NO_KERNEL = {
    "aten::slice", "aten::select", "aten::view", "aten::as_strided", "aten::squeeze", "aten::unsqueeze",
    "aten::diagonal", "aten::t", "aten::transpose", "aten::expand", "aten::reshape", "aten::alias",
    "aten::mT", "aten::numpy_T", "aten::flatten", "aten::detach", "aten::_unsafe_view", "aten::lift_fresh",
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::result_type", "aten::split",
    "aten::resolve_conj", "aten::resolve_neg", "aten::contiguous", "aten::size", "aten::stride",
}  # fmt: skip
PROBLEMS = {"digits-like k=16": (1797, 64, 16), "dense 2000 x 2000 k=100": (2000, 2000, 100)}


def _update(method: str, W: torch.Tensor, H: torch.Tensor):
    if method == "hals":
        return SolverUpdate(HALSRule())
    if method == "mu":
        return SolverUpdate(MURule())
    optimizer = fused_optimizer(lambda p: torch.optim.Adam(p, lr=1e-3), [W, H])
    return GradientUpdate(optimizer, Objective("fro2"))


def profile_method(method: str, shape: tuple[int, int, int], device: str, dtype: torch.dtype, updates: int) -> dict:
    """Ops, wall time and (CUDA) kernel time per update of one solver on one random problem."""
    n, m, k = shape
    g = np.random.default_rng(0)
    X = g.random((n, k)) @ g.random((k, m))
    t = to_block(X.astype(np.float32), dtype, device)
    W = torch.rand(n, k, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    H = torch.rand(k, m, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    if method == "adam":
        W.requires_grad_(), H.requires_grad_()
    step = _update(method, W, H)
    fit(t, W, H, step, 5)  # warm-up: first-call costs, allocator, cuBLAS handles
    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fit(t, W, H, step, updates)
        if cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / updates
    top = [e for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")]
    ops = Counter(e.name for e in top if e.name not in NO_KERNEL)
    row = {"ops": sum(ops.values()) / updates, "wall ms": 1e3 * wall, "top ops": dict(ops.most_common(4))}
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        kernel_us = sum(e.device_time for e in kernels) / updates
        row.update({"kernels": len(kernels) / updates, "kernel ms": kernel_us / 1e3})
        row["wall / kernels"] = row["wall ms"] / max(row["kernel ms"], 1e-9)
    return row


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({torch.get_num_threads()} threads)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    ap.add_argument("--methods", default="hals,mu,adam")
    ap.add_argument("--updates", type=int, default=20)
    ap.add_argument("--out", default=None, help="write profile.json and profile.md here")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = []
    for problem, shape in PROBLEMS.items():
        for method in args.methods.split(","):
            row = {
                "problem": problem,
                "method": method,
                **profile_method(method, shape, args.device, dtype, args.updates),
            }
            rows.append(row)
            print(json.dumps(row))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "profile.json").write_text(json.dumps(rows, indent=2) + "\n")
        cols = [c for c in ("ops", "kernels", "wall ms", "kernel ms", "wall / kernels") if c in rows[0]]
        lines = [
            f"Command: `python scripts/profile_update.py {' '.join(sys.argv[1:])}`  ",
            f"Device: {_device_name(args.device)}, torch {torch.__version__}",
            "",
            "| problem | method | " + " | ".join(cols) + " |",
            "|---|---|" + "---|" * len(cols),
        ]
        lines += [f"| {r['problem']} | {r['method']} | " + " | ".join(f"{r[c]:.3g}" for c in cols) + " |" for r in rows]
        (out / "profile.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
