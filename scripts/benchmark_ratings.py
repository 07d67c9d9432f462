"""MovieLens-style ratings: ``nmf-train experiment=ratings`` beside Surprise's SVD and NMF on the same split.

The rating list is read as a user would read it (``data=file data.layout=triplets``, which
``experiment=ratings`` sets; a header line is skipped), and every method is scored on
the same 10% of the ratings held out (``data.holdout=0.1``, ``data.holdout_seed=0``: this
script draws them with the same function). Our runs are the real command line, in a
subprocess, on one CPU thread; Surprise (Cython, one thread) fits in this process. Time
per update (ours) and per epoch (Surprise) are taken back to back in one run. Without
scikit-surprise (it needs a compiler where no wheel fits) a plain torch biased-MF loop
stands in for SVD, and the results say so. Writes <out>/ratings.md and <out>/ratings.json.

    python scripts/benchmark_ratings.py --inter ml-100k.inter --out results/cpu-ratings
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from nmf_lightning.data.files import from_file
from nmf_lightning.data.holdout import split_holdout

#: (what it shows, the command's overrides besides data.path)
RUNS = [
    ("experiment=ratings: ALS, biases, ridge per rating", ("experiment=ratings",)),
    ("the same by MU", ("experiment=ratings", "optimizer=mu", "trainer.max_steps=100")),
    ("the same by Adam", ("experiment=ratings", "optimizer=adam", "optimizer.lr=0.01", "trainer.max_steps=300")),
    ("without biases", ("experiment=ratings", "model.biases=false")),
    (
        "biases without the ridge (MU: ALS diverges without one)",
        ("experiment=ratings", "optimizer=mu", "trainer.max_steps=100", "model.l2_W=0", "model.l2_H=0"),
    ),
    (
        "neither: MU, rank 15, as before",
        (
            "data=file",
            "data.layout=triplets",
            "data.unstored=missing",
            "data.holdout=0.1",
            "data.rating_range=[1,5]",
            "optimizer=mu",
            "model.rank=15",
            "trainer.max_steps=200",
        ),
    ),  # fmt: skip
]
#: Surprise's README, MovieLens 100k, 5-fold cross-validation (RMSE)
PUBLISHED = {"SVD": 0.934, "SVD++": 0.919, "NMF": 0.963}


def ours(inter: Path, overrides: tuple[str, ...], folder: Path) -> dict:
    """One nmf-train run as a user types it, on one thread; its metrics.json and the command's wall time."""
    command = ["nmf-train", *overrides, f"data.path={inter}", "threads=1", "logger=none"]
    command += ["callbacks.progress_bar.refresh_rate=0", f"hydra.run.dir={folder}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    metrics = json.loads((folder / "metrics.json").read_text())
    shown = shlex.join(["nmf-train", *overrides[:1], f"data.path={inter.name}", *overrides[1:]])
    return {
        "command": shown,
        "val_rmse": metrics["val_rmse"],
        "train_rmse": metrics["rmse"],
        "updates": metrics["steps"],
        "seconds_per_update": 1.0 / metrics["updates_per_sec"],
        "fit_seconds": metrics["steps"] / metrics["updates_per_sec"],
        "command_seconds": wall,
    }


def split(inter: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float], dict]:
    """The training and held-out (row, column, rating) triplets nmf-train's data.holdout=0.1 draws."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (items whose only ratings are held out: said in the table)
        matrix = from_file(str(inter), layout="triplets", unstored="missing")
        train, held = split_holdout(matrix, 0.1, seed=0)
    X = train.X.tocoo()
    train_t = np.stack([X.row, X.col, X.data], axis=1)
    held_t = np.stack([held.rows, held.cols, held.values], axis=1)
    n, m = matrix.shape
    unseen = len(set(held.cols.tolist()) - set(X.col.tolist()))
    info = {"users": n, "items": m, "ratings": int(matrix.X.nnz), "held_out": len(held), "unseen_items": unseen}
    return train_t, held_t, (float(matrix.X.data.min()), float(matrix.X.data.max())), info


def surprise_fits(train_t: np.ndarray, held_t: np.ndarray, scale: tuple[float, float], svdpp: bool) -> list[dict]:
    """Surprise's SVD and NMF (and SVD++) with their defaults, on the same split: RMSE and seconds per epoch."""
    from surprise import NMF, SVD, Dataset, Reader, SVDpp, accuracy
    from surprise.model_selection import PredefinedKFold

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, triplets in (("train", train_t), ("test", held_t)):
            path = Path(tmp) / name
            path.write_text("".join(f"{int(i)}\t{int(j)}\t{r:g}\n" for i, j, r in triplets))
            paths.append(str(path))
        reader = Reader(line_format="user item rating", sep="\t", rating_scale=scale)
        trainset, testset = next(PredefinedKFold().split(Dataset.load_from_folds([tuple(paths)], reader=reader)))
    rows = []
    for name, algo in (("SVD", SVD(random_state=0)), ("NMF", NMF(random_state=0)), ("SVD++", SVDpp(random_state=0))):
        if name == "SVD++" and not svdpp:
            continue
        start = time.perf_counter()
        algo.fit(trainset)
        seconds = time.perf_counter() - start
        rmse = accuracy.rmse(algo.test(testset), verbose=False)  # Surprise clips to the rating scale
        rows.append({"method": f"Surprise {name}", "val_rmse": rmse, "epochs": algo.n_epochs,
                     "seconds_per_epoch": seconds / algo.n_epochs, "fit_seconds": seconds})  # fmt: skip
    return rows


def torch_loop(train_t: np.ndarray, held_t: np.ndarray, scale: tuple[float, float], epochs: int = 200) -> dict:
    """A plain torch biased MF (mu + b + c + p q, Adam on all of them, full batch): the stand-in for SVD.

    Its ridge, 0.1 per rating, and lr were the best of a few on MovieLens 100k (0.02 overfits: 1.04).
    """
    torch.manual_seed(0)
    rows, cols = (torch.from_numpy(train_t[:, i].astype(np.int64)) for i in (0, 1))
    vals = torch.from_numpy(train_t[:, 2]).float()
    n, m, k = (
        int(max(train_t[:, 0].max(), held_t[:, 0].max())) + 1,
        int(max(train_t[:, 1].max(), held_t[:, 1].max())) + 1,
        20,
    )
    P, Q = (torch.nn.Parameter(0.1 * torch.randn(size, k)) for size in (n, m))
    b, c = torch.nn.Parameter(torch.zeros(n)), torch.nn.Parameter(torch.zeros(m))
    mu = vals.mean()
    optimizer = torch.optim.Adam([P, Q, b, c], lr=0.01)
    start = time.perf_counter()
    for _ in range(epochs):
        optimizer.zero_grad()
        pred = mu + b[rows] + c[cols] + (P[rows] * Q[cols]).sum(-1)
        reg = 0.1 * (P[rows].pow(2).sum() + Q[cols].pow(2).sum() + b[rows].pow(2).sum() + c[cols].pow(2).sum())
        ((pred - vals).pow(2).sum() + reg).backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    hr, hc = (torch.from_numpy(held_t[:, i].astype(np.int64)) for i in (0, 1))
    with torch.no_grad():
        pred = (mu + b[hr] + c[hc] + (P[hr] * Q[hc]).sum(-1)).clamp(*scale)
    rmse = float((pred - torch.from_numpy(held_t[:, 2]).float()).pow(2).mean().sqrt())
    return {"method": "plain torch biased MF (Adam, full batch)", "val_rmse": rmse, "epochs": epochs,
            "seconds_per_epoch": seconds / epochs, "fit_seconds": seconds}  # fmt: skip


def markdown(result: dict) -> str:
    meta, data = result["meta"], result["data"]
    lines = [
        "# Ratings: biased NMF beside the recommender libraries",
        "",
        f"`{meta['command']}` on {meta['machine']}, torch {meta['torch']}, {meta['surprise']}; ours on one CPU "
        "thread (`threads=1`, `OMP_NUM_THREADS=1`), in one run with the references.",
        "",
        f"Data: `{meta['inter']}`, {data['users']} users x {data['items']} items, {data['ratings']:,} ratings, read "
        f"with `data.layout=triplets` (its header line skipped). Held out: the same {data['held_out']:,} ratings (10%, "
        f"`data.holdout=0.1`, seed 0) for every method; {data['unseen_items']} items have all their ratings held out.",
        "",
        "| method | held-out RMSE | updates / epochs | s per update / epoch | fit s | command |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in result["ours"]:
        lines.append(
            f"| {r['what']} | {r['val_rmse']:.4f} | {r['updates']} | {r['seconds_per_update']:.4f} | {r['fit_seconds']:.2f} "
            f"(command {r['command_seconds']:.1f}) | `{r['command']}` |"
        )
    for r in result["references"]:
        lines.append(
            f"| {r['method']} | {r['val_rmse']:.4f} | {r['epochs']} | {r['seconds_per_epoch']:.4f} | "
            f"{r['fit_seconds']:.2f} | this script |"
        )
    best, ref, ratios = result["ours"][0], result["references"][0], result["ratios"]
    lines += [
        "",
        f"Time per update of `experiment=ratings` against {ref['method']}'s per epoch: "
        f"{ratios['per_update_over_per_epoch']:.2f}x; to a fitted model "
        f"({best['updates']} updates against {ref['epochs']} epochs): "
        f"{ratios['fit_over_fit']:.2f}x. Held-out RMSE "
        f"{best['val_rmse']:.4f} against {ref['val_rmse']:.4f}. The command's wall time adds start-up "
        "(imports, reading the file, Lightning), once per run.",
        "",
        "Published in Surprise's README for MovieLens 100k (5-fold cross-validation, not this split): "
        + ", ".join(f"{k} {v}" for k, v in PUBLISHED.items())
        + ".",
    ]
    if result.get("note"):
        lines += ["", result["note"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inter", type=Path, required=True, help="a rating list: user, item, rating per line (u.data)")
    ap.add_argument("--out", type=Path, default=Path("results/cpu-ratings"))
    ap.add_argument("--svdpp", action="store_true", help="also fit Surprise's SVD++ (minutes)")
    ap.add_argument(
        "--reference",
        choices=("auto", "torch"),
        default="auto",
        help="auto: Surprise when it imports, else the torch stand-in; torch: the stand-in",
    )
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    inter = args.inter.resolve()
    try:
        version = f"scikit-surprise {importlib.metadata.version('scikit-surprise')}"
        import surprise  # noqa: F401  (a wheel may install and still fail to import)
    except (ImportError, importlib.metadata.PackageNotFoundError):
        version = None
    version = version if args.reference == "auto" else None
    meta = {
        "command": shlex.join(["python", *sys.argv]),
        "machine": f"{platform.machine()} {os.cpu_count()} cores ({platform.processor() or 'cpu'})",
        "torch": torch.__version__,
        "surprise": version or "scikit-surprise not available",
        "inter": inter.name,
    }
    train_t, held_t, scale, data = split(inter)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (what, overrides) in enumerate(RUNS):
            runs.append({"what": what, **ours(inter, overrides, Path(tmp) / str(i))})
            print(json.dumps(runs[-1]), flush=True)
    torch.set_num_threads(1)  # the stand-in, like Surprise, on one thread
    note = None
    if version is not None:
        references = surprise_fits(train_t, held_t, scale, args.svdpp)
    else:
        note = (
            "scikit-surprise could not be installed or imported here (pip builds it from source with Cython and "
            "a C compiler where no wheel fits), so a plain torch biased-MF loop stands in for its SVD."
        )
        references = [torch_loop(train_t, held_t, scale)]
    best, ref = runs[0], references[0]
    ratios = {
        "per_update_over_per_epoch": best["seconds_per_update"] / ref["seconds_per_epoch"],
        "fit_over_fit": best["fit_seconds"] / ref["fit_seconds"],
    }
    result = {"meta": meta, "data": data, "ours": runs, "references": references, "ratios": ratios, "note": note}
    (args.out / "ratings.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "ratings.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
