"""NMF without projection: the clamp penalty at a fixed weight, grown by a schedule, and projection.

Runs the commands of docs/solvers.md as a user types them (``nmf-train ...``, one process each, back
to back) on digits and on the 20 newsgroups notebook's matrix, and tables what each run
delivers: its status, the relative error of the factors as trained and clamped at 0 (the
factors written), their negative mass, the penalty weight reached and the wall time.

    python scripts/penalty_schedule.py --out results/cpu-penalty-schedule
    python scripts/penalty_schedule.py --archive ../shared/data/newsgroups/20news-bydate.tar.gz \\
        --out results/cpu-penalty-schedule

Without ``--archive`` (or ``NMF_NEWSGROUPS_ARCHIVE``) only the digits runs are made. The
runs' folders go to ``--runs`` (``outputs/penalty_schedule``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import time
from datetime import date
from pathlib import Path

import torch

#: (data set, label, overrides): the commands of docs/solvers.md, without their run folders
DIGITS = [
    ("digits", "projected (default)", ()),
    ("digits", "penalty, lam = 10", ("model.project=false", "model.lam=10")),
    ("digits", "penalty grown from 10", ("model.project=false", "model.lam=10", "model.lam_growth=10")),
]
NEWSGROUPS = [
    ("newsgroups", "the notebook's recipe", ("experiment=newsgroups_adam",)),
    ("newsgroups", "projected", ("experiment=newsgroups_adam", "model.project=true")),
    ("newsgroups", "penalty grown from 10", ("experiment=newsgroups_adam", "model.lam_growth=10")),
]
COLUMNS = ("status", "trained_relative_error", "relative_error", "W_neg_mass", "H_neg_mass", "lam", "steps")


def run(overrides: tuple[str, ...], folder: Path) -> dict:
    """One ``nmf-train`` run into ``folder``: its exit code, wall time and metrics.json."""
    shutil.rmtree(folder, ignore_errors=True)
    command = ["nmf-train", *overrides, f"hydra.run.dir={folder}", "callbacks.progress_bar=null"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    path = folder / "metrics.json"
    metrics = json.loads(path.read_text()) if path.is_file() else {"status": "failed", "error": done.stderr[-500:]}
    return {"exit_code": done.returncode, "seconds": seconds, **metrics}


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archive", default=os.environ.get("NMF_NEWSGROUPS_ARCHIVE"), help="20news-bydate.tar.gz")
    ap.add_argument("--out", type=Path, default=Path("results/cpu-penalty-schedule"))
    ap.add_argument("--runs", type=Path, default=Path("outputs/penalty_schedule"), help="the runs' folders")
    args = ap.parse_args()
    cases = list(DIGITS)
    if args.archive:
        archive = f"data.archive={args.archive}"  # as given: the runs start here
        cases += [(data, label, (*overrides, archive)) for data, label, overrides in NEWSGROUPS]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (data, label, overrides) in enumerate(cases):
        result = run(overrides, args.runs / f"{i}")
        rows.append({"data": data, "run": label, "command": shlex.join(["nmf-train", *overrides]), **result})
        print(json.dumps({k: rows[-1].get(k) for k in ("data", "run", "exit_code", "seconds", *COLUMNS)}), flush=True)
    header = ["data", "run", "exit code", *COLUMNS, "wall s"]
    lines = [
        f"Commands run back to back, {date.today()}, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {os.cpu_count()} cores: `python scripts/penalty_schedule.py"
        f"{' --archive ' + args.archive if args.archive else ''} --out {args.out}`",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    for r in rows:
        cells = [r["data"], r["run"], r["exit_code"], *(r.get(c) for c in COLUMNS), r["seconds"]]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += ["", "Commands:", "", *(f"- {r['run']} ({r['data']}): `{r['command']}`" for r in rows)]
    (args.out / "penalty_schedule.md").write_text("\n".join(lines) + "\n")
    (args.out / "penalty_schedule.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.out / 'penalty_schedule.md'}")


if __name__ == "__main__":
    main()
