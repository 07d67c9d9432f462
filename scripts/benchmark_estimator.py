"""The estimator beside scikit-learn's NMF: start-up, first fit, and fits on the same X.

Start-up runs in fresh processes (import, then the first fit of digits, as a notebook
does). Fits run in this process, ours and scikit-learn's alternately, each timed as the
best of ``--repeats``, with the same X, n_components, init and seed and each one's
default stopping rule. Writes <out>/estimator.json and <out>/estimator.md.

    python scripts/benchmark_estimator.py --out results/cpu-estimator
    python scripts/benchmark_estimator.py --device cuda --out results/gpu-estimator
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from sklearn.decomposition import NMF as SKNMF
from sklearn.exceptions import ConvergenceWarning

from nmf_lightning import NMF
from nmf_lightning.data import newsgroups

ARCHIVE = Path(
    os.environ.get(
        "NMF_NEWSGROUPS_ARCHIVE",
        Path(__file__).resolve().parents[1].parent / "shared/data/newsgroups/20news-bydate.tar.gz",
    )
)
STARTUP = {
    "import torch": "import torch",
    "import sklearn NMF": "from sklearn.decomposition import NMF",
    "import nmf_lightning NMF": "from nmf_lightning import NMF",
}
FIRST_FIT = """
import time, warnings
t0 = time.perf_counter()
from {module} import NMF
from sklearn.datasets import load_digits
X = load_digits().data
t1 = time.perf_counter()
warnings.simplefilter("ignore")
NMF(16, random_state=0{extra}).fit(X)
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def fresh(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def startup(repeats: int, device: str) -> list[dict]:
    rows = []
    for name, code in STARTUP.items():
        times = [
            float(fresh(f"import time; t=time.perf_counter(); {code}; print(time.perf_counter()-t)"))
            for _ in range(repeats)
        ]
        rows.append({"what": name, "seconds": min(times)})
    for name, module, extra in (
        ("scikit-learn", "sklearn.decomposition", ""),
        ("nmf-lightning", "nmf_lightning", f", device={device!r}"),
    ):
        pairs = [tuple(map(float, fresh(FIRST_FIT.format(module=module, extra=extra)).split())) for _ in range(repeats)]
        best = min(pairs, key=sum)
        rows.append({"what": f"{name}: import + digits, then first fit", "seconds": best[0], "first_fit": best[1]})
    return rows


def problems() -> dict[str, tuple[object, int]]:
    out = {"digits (1797 x 64, dense)": (load_digits().data, 16)}
    if ARCHIVE.exists():
        X4 = newsgroups(archive=str(ARCHIVE)).X
        out[f"newsgroups4 TF-IDF ({X4.shape[0]} x {X4.shape[1]}, sparse)"] = (X4, 10)
        X20 = newsgroups(categories=None, archive=str(ARCHIVE)).X
        out[f"newsgroups20 TF-IDF ({X20.shape[0]} x {X20.shape[1]}, sparse)"] = (X20, 20)
    else:
        print(f"skipping the 20 newsgroups problems: {ARCHIVE} not found", file=sys.stderr)
    return out


def fits(repeats: int, device: str, solvers: list[str]) -> list[dict]:
    rows = []
    for name, (X, k) in problems().items():
        for solver in solvers:
            results = {"ours": [], "sklearn": []}
            for _ in range(repeats if X.shape[0] < 5000 else 1):
                for who, est in (
                    ("sklearn", SKNMF(k, solver=solver, random_state=0)),
                    ("ours", NMF(k, solver=solver, random_state=0, device=device)),
                ):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", ConvergenceWarning)
                        t = time.perf_counter()
                        est.fit(X)
                        if device == "cuda":
                            torch.cuda.synchronize()
                        results[who].append((time.perf_counter() - t, est.n_iter_, est.reconstruction_err_))
            ours, ref = min(results["ours"]), min(results["sklearn"])
            rows.append(
                {
                    "problem": name,
                    "solver": solver,
                    "k": k,
                    "sklearn_seconds": ref[0],
                    "sklearn_iters": ref[1],
                    "sklearn_error": ref[2],
                    "ours_seconds": ours[0],
                    "ours_iters": ours[1],
                    "ours_error": ours[2],
                    "time_ratio": ours[0] / ref[0],
                    "error_ratio": ours[2] / ref[2],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(startup_rows: list[dict], fit_rows: list[dict], meta: dict) -> str:
    lines = [
        "# The estimator beside scikit-learn's NMF",
        "",
        f"`{meta['command']}` on {meta['machine']}, torch {meta['torch']}, scikit-learn {meta['sklearn']}, "
        f"device {meta['device']}, torch threads {meta['threads']}.",
        "",
        "## Start-up (fresh processes, best of several)",
        "",
        "| what | seconds | first fit (s) |",
        "| --- | ---: | ---: |",
    ]
    for r in startup_rows:
        first = f"{r['first_fit']:.3f}" if "first_fit" in r else ""
        lines.append(f"| {r['what']} | {r['seconds']:.2f} | {first} |")
    lines += [
        "",
        "## Fits on the same X (same k, init nndsvda, seed 0, each one's default max_iter=200 and tol=1e-4)",
        "",
        "| problem | solver | k | scikit-learn s | iters | error | ours s | iters | error | time ratio | error ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in fit_rows:
        lines.append(
            f"| {r['problem']} | {r['solver']} | {r['k']} | {r['sklearn_seconds']:.3f} | {r['sklearn_iters']} | "
            f"{r['sklearn_error']:.6g} | {r['ours_seconds']:.3f} | {r['ours_iters']} | {r['ours_error']:.6g} | "
            f"{r['time_ratio']:.2f} | {r['error_ratio']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/cpu-estimator")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--solvers", default="cd,mu")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()} {os.cpu_count()} cores"
        + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""),
        "torch": torch.__version__,
        "sklearn": __import__("sklearn").__version__,
        "device": args.device,
        "threads": torch.get_num_threads(),
    }
    startup_rows = startup(args.repeats, args.device)
    fit_rows = fits(args.repeats, args.device, args.solvers.split(","))
    (out / "estimator.json").write_text(json.dumps({"meta": meta, "startup": startup_rows, "fits": fit_rows}, indent=2))
    (out / "estimator.md").write_text(markdown(startup_rows, fit_rows, meta))
    print(markdown(startup_rows, fit_rows, meta))


if __name__ == "__main__":
    main()
