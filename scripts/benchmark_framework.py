"""What the framework costs on small problems: nmf-train's Adam against a plain PyTorch loop.

The plain loop is what a user writes first: W and H as tensors, Adam, the residual
loss, a clamp at 0 after each step, torch's default threads. nmf-train runs the same
problem as a user starts it (its default threads, logger and callbacks), in this process.
Each pair runs back to back, three times; the table gives the median updates/s. With
``--busy``, the same again while a second process keeps one core busy, as other work does:

    python scripts/benchmark_framework.py --busy --out results/cpu-framework
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from nmf_lightning.data import synthetic

#: (rows, columns, rank): the sizes where a framework's own cost shows
PROBLEMS = ((500, 400, 20), (200, 300, 10))
STEPS = 2000
LR = 0.01


def plain_loop(n: int, m: int, k: int, steps: int = STEPS) -> float:
    """Updates per second of the loop a user writes first (projected Adam on ||X - WH||^2)."""
    X = torch.from_numpy(synthetic(n_rows=n, n_cols=m, true_rank=k, noise=0.05, seed=0).X).float()
    g = torch.Generator().manual_seed(0)
    W = torch.rand(n, k, generator=g).requires_grad_()
    H = torch.rand(k, m, generator=g).requires_grad_()
    opt = torch.optim.Adam([W, H], lr=LR)
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        loss = ((X - W @ H) ** 2).sum()
        loss.backward()
        opt.step()
        with torch.no_grad():
            W.clamp_(min=0)
            H.clamp_(min=0)
    float(loss)
    return steps / (time.perf_counter() - start)


def nmf_train(n: int, m: int, k: int, out: Path, steps: int = STEPS) -> float:
    """Updates per second of ``nmf-train data=synthetic ... optimizer.lr=0.01`` (its mean over the run)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from nmf_lightning.train import config_dir, train

    overrides = [
        "data=synthetic",
        f"data.n_rows={n}",
        f"data.n_cols={m}",
        f"data.true_rank={k}",
        f"model.rank={k}",
        f"optimizer.lr={LR}",
        f"trainer.max_steps={steps}",
        "trainer.accelerator=cpu",
        "++trainer.enable_progress_bar=false",
        "++callbacks.progress_bar=null",
        f"paths.output_dir={out}",
        "overwrite=true",
    ]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    GlobalHydra.instance().clear()
    threads = torch.get_num_threads()
    try:
        return float(train(cfg)["updates_per_sec"])
    finally:
        torch.set_num_threads(threads)  # threads=auto sets the process's: the plain loop gets torch's default


def _spin() -> None:
    while True:
        pass


def measure(busy: bool, repeats: int, work: Path) -> list[dict]:
    """Median updates/s of both, run back to back ``repeats`` times per problem."""
    spinner = multiprocessing.Process(target=_spin, daemon=True) if busy else None
    if spinner is not None:
        spinner.start()
    rows = []
    try:
        for n, m, k in PROBLEMS:
            loop, framework = [], []
            for r in range(repeats):
                loop.append(plain_loop(n, m, k))
                framework.append(nmf_train(n, m, k, work / f"{n}x{m}-{r}"))
            a, b = statistics.median(loop), statistics.median(framework)
            rows.append(
                {
                    "problem": f"{n} x {m}, k = {k}",
                    "machine": "busy (one core taken)" if busy else "quiet",
                    "plain_loop": a,
                    "nmf_train": b,
                    "ratio": b / a,
                }
            )
            print(rows[-1], flush=True)
    finally:
        if spinner is not None:
            spinner.terminate()
    return rows


def main() -> None:
    """Measure, then write framework.md and framework.json."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results/cpu-framework"))
    ap.add_argument("--busy", action="store_true", help="also measure with one core kept busy")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        rows = measure(False, args.repeats, Path(work))
        if args.busy:
            rows += measure(True, args.repeats, Path(work))
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    lines = [
        f"Command: `{command}`  ",
        f"Device: CPU ({os.cpu_count()} cores), torch {torch.__version__}, {platform.machine()}, "
        f"{time.strftime('%Y-%m-%d')}. {STEPS} Adam updates (lr {LR}) per run; median of {args.repeats} runs "
        "back to back. The plain loop runs on torch's default threads, nmf-train on its default (threads=auto).",
        "",
        "| problem | machine | plain loop (updates/s) | nmf-train (updates/s) | nmf-train / loop |",
        "| --- | --- | ---: | ---: | ---: |",
        *[
            f"| {r['problem']} | {r['machine']} | {r['plain_loop']:.0f} | {r['nmf_train']:.0f} | {r['ratio']:.2f} |"
            for r in rows
        ],
    ]
    (args.out / "framework.md").write_text("\n".join(lines) + "\n")
    (args.out / "framework.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
