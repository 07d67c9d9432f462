"""Rows as batches, measured: streaming overhead, memory of a file larger than it should hold, online mode.

Three parts, each a table row set in ``streaming.md`` and ``streaming.json`` under ``--out``:

- ``overhead``: the same dense matrix trained whole and streamed in row blocks through the
  real ``nmf-train`` path, one process, back to back: updates/s and their ratio, with X
  held in host memory (blocks are views) and read from a ``.npy`` every pass.
- ``grid``: the same Poisson counts as a dense ``.npy``, a CSR ``.npz`` and an AnnData
  ``.h5ad``, at each of ``--grid-ranks`` and ``--grid-blocks`` (row blocks per pass):
  updates/s streamed against the whole run of the same file and rank (each the best of
  ``--grid-repeats`` runs: on a shared machine one run in a busy moment moved a ratio by 15 %).
- ``memory``: a dense memory-mapped ``.npy`` of ``--gb`` GB (generated into ``--dir``) trained
  with ``data.batch_rows``; peak RSS from ``/usr/bin/time -v`` against a tiny run's.
- ``online``: all 20 newsgroups TF-IDF (k = 20): scikit-learn's ``MiniBatchNMF`` against
  ``model.online=true optimizer=hals`` (and exact passes); time for ours to reach
  MiniBatchNMF's final relative error, from the call of ``train`` (loading and checking
  X count; the exact error measured after every pass does not); then the estimators'
  ``partial_fit`` over the same batches (MiniBatchNMF's and ``NMF``'s, defaults).

    python scripts/benchmark_streaming.py --parts overhead,memory,online --out results/cpu-streaming
    python scripts/benchmark_streaming.py --parts grid --threads 1 --out results/cpu-streaming-grid
    python scripts/benchmark_streaming.py --parts grid --accelerator gpu --grid-rows 50000 --out results/gpu-streaming
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from nmf_lightning.train import config_dir, train

ARCHIVE = os.environ.get(
    "NMF_NEWSGROUPS_ARCHIVE", str(Path(__file__).resolve().parents[2] / "shared/data/newsgroups/20news-bydate.tar.gz")
)


#: the trainer's accelerator for every run (``--accelerator``; ``gpu`` measures the host-to-device copies too)
ACCELERATOR = ["cpu"]


def _cfg(out: Path, *overrides: str):
    out.mkdir(parents=True, exist_ok=True)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"paths.output_dir={out}",
                "logger=none",
                "callbacks=none",
                f"trainer.accelerator={ACCELERATOR[0]}",
                "overwrite=true",  # a re-run of the benchmark replaces its runs
                *overrides,
            ],
        )
    with open_dict(cfg):
        cfg.trainer.enable_progress_bar = False
        cfg.trainer.enable_checkpointing = False
    return cfg


def overhead(args, work: Path) -> list[dict]:
    """Whole X against streamed X, same matrix and process, back to back."""
    rng = np.random.default_rng(0)
    n, m, k = args.rows, args.cols, args.rank
    X = (rng.random((n, k)) @ rng.random((k, m))).astype(np.float32)
    on_disk, in_memory = work / "overhead.npy", work / "overhead.npz"
    np.save(on_disk, X)
    np.savez(in_memory, X=X)  # a dense .npz is loaded whole: its blocks are views, not reads
    streamed = f"streamed, {args.batch_rows} rows/block"
    runs = (
        ("whole", (f"data.path={on_disk}",)),
        (f"{streamed}, X in host memory (.npz)", (f"data.path={in_memory}", f"data.batch_rows={args.batch_rows}")),
        (
            f"{streamed}, X read from disk every pass (.npy)",
            (f"data.path={on_disk}", f"data.batch_rows={args.batch_rows}"),
        ),
    )
    rows = []
    for optimizer in args.optimizers.split(","):
        extra_opt = ("optimizer.lr=0.01",) if optimizer == "adam" else ()
        for label, extra in runs:
            out = work / f"overhead-{optimizer}-{len(rows)}"
            cfg = _cfg(
                out,
                "data=file",
                f"threads={args.threads}",  # whole and streamed on the same threads: their ratio is the blocks' cost
                f"model.rank={k}",
                f"optimizer={optimizer}",
                f"trainer.max_steps={args.steps}",
                *extra_opt,
                *extra,
            )
            metrics = train(cfg)
            rows.append(
                {
                    "part": "overhead",
                    "problem": f"dense {n}x{m} float32, k={k}",
                    "method": f"{optimizer} {label}",
                    "updates": metrics["steps"],
                    "updates_per_sec": metrics["updates_per_sec"],
                    "relative_error": metrics["relative_error"],
                }
            )
        for row in rows[-2:]:
            row["cost_vs_whole"] = rows[-3]["updates_per_sec"] / row["updates_per_sec"]
    return rows


def _counts(n: int, m: int, k: int, seed: int = 0) -> np.ndarray:
    """Poisson counts of a rank-k rate, about a tenth of them non-zero (cells by genes, words by documents)."""
    rng = np.random.default_rng(seed)
    rate = rng.gamma(0.3, 1.0, (n, k)) @ rng.gamma(0.3, 1.0, (k, m))
    rate *= 0.12 / float(rate.mean())
    return rng.poisson(rate).astype(np.float32)


def _write_h5ad(path: Path, X) -> None:
    """X as AnnData writes a CSR ``X``: a group with data, indices, indptr and a shape attribute."""
    import h5py

    with h5py.File(path, "w") as f:
        g = f.create_group("X")
        g.attrs["encoding-type"], g.attrs["encoding-version"], g.attrs["shape"] = "csr_matrix", "0.1.0", X.shape
        for name in ("data", "indices", "indptr"):
            g.create_dataset(name, data=getattr(X, name))


def grid(args, work: Path) -> list[dict]:
    """Whole against streamed, per file layout, rank and blocks per pass: one process, back to back.

    Dense ``.npy`` (read from disk every pass), CSR ``.npz`` (held in host memory, blocks
    sliced from it) and AnnData ``.h5ad`` (CSR read from disk every pass), of the same
    Poisson counts; each streamed run against the whole run of the same file and rank.
    """
    import scipy.sparse as sp

    n, m = args.grid_rows, args.grid_cols
    X = _counts(n, m, 20)
    S = sp.csr_matrix(X)
    files = {"dense .npy": work / "grid.npy", "CSR .npz": work / "grid.npz", "CSR .h5ad": work / "grid.h5ad"}
    files = {k: v for k, v in files.items() if any(word in k for word in args.grid_layouts.split(","))}
    writers = {".npy": lambda p: np.save(p, X), ".npz": lambda p: sp.save_npz(p, S, compressed=False)}
    for path in files.values():
        writers.get(path.suffix, lambda p: _write_h5ad(p, S))(path)
    problem = f"Poisson counts {n}x{m} ({S.nnz / X.size:.0%} non-zero)"
    rows = []
    for layout, path in files.items():
        for k in (int(r) for r in args.grid_ranks.split(",")):
            common = ("data=file", f"data.path={path}", f"threads={args.threads}", f"model.rank={k}", "optimizer=hals")
            runs = [("whole", ())] + [
                (f"{b} blocks/pass", (f"data.batch_rows={-(-n // b)}", f"data.num_workers={args.grid_workers}"))
                for b in map(int, args.grid_blocks.split(","))
            ]
            whole = None
            for label, extra in runs:
                out = work / f"grid-{len(rows)}"
                cfg = _cfg(out, *common, f"trainer.max_steps={args.grid_steps}", *extra)
                tries = [train(cfg) for _ in range(args.grid_repeats)]  # the best: a busy moment slows one run
                metrics = max(tries, key=lambda m: m["updates_per_sec"])
                row = {
                    "part": "grid",
                    "problem": f"{problem}, {layout}, k={k}",
                    "method": f"hals {label}"
                    + (f", {args.grid_workers} workers" if "blocks" in label and args.grid_workers != "auto" else ""),
                    "updates": metrics["steps"],
                    "updates_per_sec": metrics["updates_per_sec"],
                    "relative_error": metrics["relative_error"],
                }
                if whole is None:
                    whole = row
                else:
                    row["cost_vs_whole"] = whole["updates_per_sec"] / row["updates_per_sec"]
                rows.append(row)
                print(row, flush=True)
    return rows


def _time_v(cmd: list[str], cwd: Path) -> tuple[float, float, str]:
    """Peak RSS (MB) and wall seconds of a command under /usr/bin/time -v."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1024
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", proc.stderr).group(1)
    secs = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
    return rss, secs, proc.stderr


def memory(args, work: Path) -> list[dict]:
    """A memory-mapped file of --gb GB, streamed; peak RSS against a tiny run."""
    m = args.cols
    n = int(args.gb * 2**30 / (4 * m))
    path = Path(args.dir) / f"big_{n}x{m}.npy"
    if not path.is_file() or path.stat().st_size < n * m * 4:
        path.parent.mkdir(parents=True, exist_ok=True)
        X = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, m))
        rng = np.random.default_rng(0)
        W0, H0 = rng.random((n, 10), dtype=np.float32), rng.random((10, m), dtype=np.float32)
        for start in range(0, n, 50_000):
            X[start : start + 50_000] = W0[start : start + 50_000] @ H0
        X.flush()
        del X
    size_mb = path.stat().st_size / 2**20
    common = ["logger=none", "callbacks=none", "trainer.accelerator=cpu", "overwrite=true"]
    common += [f"model.rank={args.rank}", "optimizer=hals"]
    cli = [sys.executable, "-m", "nmf_lightning.train"]
    tiny_rss, tiny_wall, _ = _time_v(
        [*cli, "data=toy", "model.rank=2", *common[:4], "optimizer=hals", "trainer.max_steps=2", "hydra.run.dir=tiny"],
        work,
    )
    run = work / "big"
    rss, wall, _ = _time_v(
        [
            *cli,
            "data=file",
            f"data.path={path}",
            f"data.batch_rows={args.big_batch_rows}",
            f"trainer.max_steps={args.big_steps}",
            *common,
            f"hydra.run.dir={run}",
        ],
        work,
    )
    metrics = json.loads((run / "metrics.json").read_text())
    return [
        {
            "part": "memory",
            "problem": f"dense .npy {n}x{m} float32 ({size_mb / 1024:.2f} GiB), k={args.rank}",
            "method": f"hals streamed ({args.big_batch_rows} rows/block)",
            "updates": metrics["steps"],
            "updates_per_sec": metrics["updates_per_sec"],
            "relative_error": metrics["relative_error"],
            "peak_rss_mb": rss,
            "tiny_run_rss_mb": tiny_rss,
            "bound_mb": tiny_rss + 0.25 * size_mb,
            "wall_s": wall,
        }
    ]


class _ExactCurve(L.Callback):
    """Exact relative error after every pass, its evaluation left out of the clock.

    The clock starts before train() is called: loading, checking and initialising count.
    """

    def __init__(self):
        self.points, self.paused, self.last_step = [], 0.0, 0
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, *_):
        if trainer.global_step == self.last_step:
            return
        self.last_step = trainer.global_step
        t0 = time.perf_counter()
        rel = float(module.recorder.metrics(module.W, module.H)["train/relative_error"])
        self.points.append((t0 - self.start - self.paused, trainer.global_step, rel))
        self.paused += time.perf_counter() - t0


def online(args, work: Path) -> list[dict]:
    """MiniBatchNMF against model.online=true on all 20 newsgroups TF-IDF."""
    if not Path(ARCHIVE).is_file():
        print(f"online: skipped, no archive at {ARCHIVE} (set NMF_NEWSGROUPS_ARCHIVE)")
        return []
    from sklearn.decomposition import MiniBatchNMF

    from nmf_lightning.data import newsgroups

    X = newsgroups(categories=None, archive=ARCHIVE).X.astype(np.float32)
    k = args.online_rank
    norm = np.sqrt((X.data.astype(np.float64) ** 2).sum())

    def rel(W, H):
        sq = norm**2 - 2 * float((X @ H.T * W).sum()) + float(((W.T @ W) * (H @ H.T)).sum())
        return np.sqrt(max(sq, 0.0)) / norm

    t0 = time.perf_counter()
    est = MiniBatchNMF(k, batch_size=args.online_batch_rows, random_state=0)
    W = est.fit_transform(X)
    sk_time, sk_err = time.perf_counter() - t0, rel(W, est.components_)
    rows = [
        {
            "part": "online",
            "problem": f"20 newsgroups TF-IDF {X.shape[0]}x{X.shape[1]} ({X.nnz} non-zeros), k={k}",
            "method": f"sklearn MiniBatchNMF (batch_size={args.online_batch_rows})",
            "updates": int(est.n_steps_),
            "relative_error": sk_err,
            "wall_s": sk_time,
            "time_to_target_s": sk_time,
        }
    ]
    path = work / "news20.npz"
    import scipy.sparse as sp

    sp.save_npz(path, X)
    for method, extra in (
        ("hals online", ("model.online=true",)),
        ("mu online", ("model.online=true",)),  # MiniBatchNMF's own rule
        ("hals exact passes", ()),
    ):
        curve = _ExactCurve()
        cfg = _cfg(
            work / method.replace(" ", "_"),
            "data=file",
            f"data.path={path}",
            f"data.batch_rows={args.online_batch_rows}",
            f"model.rank={k}",
            f"optimizer={method.split()[0]}",
            f"trainer.max_steps={args.online_passes}",
            "model.inner_steps=1",  # a point per pass: the time to the target is read to the pass
            *extra,
        )
        curve.start = t0 = time.perf_counter()
        _train_with(cfg, curve)
        wall = time.perf_counter() - t0
        hit = next((t for t, _, e in curve.points if e <= sk_err), None)
        rows.append(
            {
                "part": "online",
                "problem": rows[0]["problem"],
                "method": f"nmf-lightning {method} ({args.online_batch_rows} rows/block)",
                "updates": curve.points[-1][1],
                "relative_error": curve.points[-1][2],
                "wall_s": wall,
                "time_to_target_s": hit,
                "curve": curve.points,
            }
        )
    # as a user runs it: the default stop (model.tol=null) ends it, not a count of passes
    cfg = _cfg(
        work / "hals_online_default",
        "data=file",
        f"data.path={path}",
        f"data.batch_rows={args.online_batch_rows}",
        f"model.rank={k}",
        "optimizer=hals",
        "model.online=true",
    )
    t0 = time.perf_counter()
    metrics = train(cfg)
    rows.append(
        {
            "part": "online",
            "problem": rows[0]["problem"],
            "method": f"nmf-lightning hals online, stopped by its default tol ({args.online_batch_rows} rows/block)",
            "updates": metrics["steps"],
            "relative_error": metrics["relative_error"],
            "wall_s": time.perf_counter() - t0,
        }
    )
    return rows + partial_fits(X, args, rows[0]["problem"], rel)


def partial_fits(X, args, problem: str, rel) -> list[dict]:
    """The estimators' ``partial_fit`` over the same batches, ``--online-partial-passes`` times: defaults otherwise."""
    from sklearn.decomposition import MiniBatchNMF

    from nmf_lightning import NMF

    k, size = args.online_rank, args.online_batch_rows
    batches = [X[i : i + size] for i in range(0, X.shape[0], size)]
    rows = []
    for name, est in (
        (f"sklearn MiniBatchNMF(batch_size={size}).partial_fit", MiniBatchNMF(k, batch_size=size, random_state=0)),
        ("nmf-lightning NMF(solver='cd').partial_fit", NMF(k, solver="cd", random_state=0)),
        ("nmf-lightning NMF(solver='mu').partial_fit", NMF(k, solver="mu", random_state=0)),
    ):
        t0 = time.perf_counter()
        for _ in range(args.online_partial_passes):
            for batch in batches:
                est.partial_fit(batch)
        wall = time.perf_counter() - t0
        rows.append(
            {
                "part": "online",
                "problem": problem,
                "method": f"{name}, {args.online_partial_passes} passes of {len(batches)} batches",
                "updates": args.online_partial_passes,
                "relative_error": rel(est.transform(X), est.components_),  # (the transform is not timed)
                "wall_s": wall,
            }
        )
    return rows


def _train_with(cfg, callback):
    """train() with one more Lightning callback (Hydra instantiates it from this module)."""
    with open_dict(cfg):
        cfg.callbacks = {"curve": {"_target_": f"{__name__}._holder"}}
    _holder.callback = callback
    return train(cfg)


def _holder():
    return _holder.callback


def _device() -> str:
    if ACCELERATOR[0] == "gpu" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return f"CPU ({torch.get_num_threads()} threads)"


def _md(rows: list[dict], command: str) -> str:
    head = "| part | problem | method | updates | updates/s | cost vs whole | rel. error | time to target (s) | wall (s) | peak RSS MB | bound MB |"
    lines = [
        f"Command: `{command}`  ",
        f"Device: {_device()}, torch {torch.__version__}, {platform.machine()}, {date.today()}.",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in rows:
        lines.append(
            f"| {r['part']} | {r['problem']} | {r['method']} | {r.get('updates', '-')} | {f(r.get('updates_per_sec'), '.2f')} "
            f"| {f(r.get('cost_vs_whole'), '.2f')} | {f(r.get('relative_error'), '.4f')} | {f(r.get('time_to_target_s'), '.2f')} "
            f"| {f(r.get('wall_s'), '.1f')} | {f(r.get('peak_rss_mb'), '.0f')} | {f(r.get('bound_mb'), '.0f')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="overhead,memory,online")
    ap.add_argument("--out", default="results/cpu-streaming")
    ap.add_argument("--dir", default="/tmp/nmf-streaming", help="where the large .npy is generated")
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--cols", type=int, default=1000)
    ap.add_argument("--rank", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-rows", type=int, default=10_000)
    ap.add_argument("--optimizers", default="hals,mu,adam")
    ap.add_argument("--threads", default="auto", help="nmf-train's threads for the overhead runs (auto, or a number)")
    ap.add_argument("--gb", type=float, default=4.0)
    ap.add_argument("--big-batch-rows", type=int, default=25_000)
    ap.add_argument("--big-steps", type=int, default=3)
    ap.add_argument("--grid-rows", type=int, default=30_000)
    ap.add_argument("--grid-cols", type=int, default=2000)
    ap.add_argument("--grid-ranks", default="10,50")
    ap.add_argument("--grid-blocks", default="6,50", help="row blocks per pass")
    ap.add_argument("--grid-steps", type=int, default=20)
    ap.add_argument("--grid-layouts", default="npy,npz,h5ad", help="which files of the grid to run")
    ap.add_argument("--grid-repeats", type=int, default=2, help="runs of each cell; its best updates/s is kept")
    ap.add_argument("--grid-workers", default="auto", help="data.num_workers of the streamed runs")
    ap.add_argument("--accelerator", default="cpu", help="trainer.accelerator of the runs (gpu: blocks are copied)")
    ap.add_argument("--online-rank", type=int, default=20)
    ap.add_argument("--online-batch-rows", type=int, default=1024)
    ap.add_argument("--online-passes", type=int, default=10)
    ap.add_argument("--online-partial-passes", type=int, default=3, help="passes of the estimators' partial_fit")
    args = ap.parse_args()
    ACCELERATOR[0] = args.accelerator
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    parts = {"overhead": overhead, "grid": grid, "memory": memory, "online": online}
    rows = []
    for part in args.parts.split(","):
        rows += parts[part](args, work)
    command = "python scripts/benchmark_streaming.py " + " ".join(sys.argv[1:])
    (out / "streaming.json").write_text(
        json.dumps({"command": command, "date": str(date.today()), "rows": rows}, indent=2)
    )
    md = _md(rows, command)
    (out / "streaming.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
