"""Sweep report: one table row per job of a multirun, plots of metric vs parameter and curves.

``nmf-sweep-report multirun/2026-01-01/12-00-00`` reads every job's overrides,
metrics.json and TensorBoard events and writes ``report.csv``, ``report.md``,
``<metric>_vs_params.png``, ``curves.png`` and, for a rank sweep of consensus runs,
``k_selection.png`` into ``<sweep dir>/report``. Failed jobs
stay in the table with their error.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback

from nmf_lightning.atomic import finish_pending, write_atomic, write_text
from nmf_lightning.status import SUCCEEDED

#: metrics.json columns shown after the chosen metric, when present
SHOWN_METRICS = (
    "relative_error",
    "consensus_relative_error",
    "stability",
    "val_relative_error",
    "rmse",
    "val_rmse",
    "divergence",
    "val_divergence",
    "loss",
    "steps",
    "updates_per_sec",
)
#: ... and these when some job's factors kept negative entries (model.project=false)
NEGATIVITY_METRICS = ("trained_relative_error", "W_neg_mass", "H_neg_mass")
#: the error of a consensus run's factors (model.consensus=true)
CONSENSUS_ERROR = "consensus_relative_error"
#: TensorBoard tags drawn in curves.png, one panel each when logged
CURVE_TAGS = ("train/relative_error", "val/relative_error")


def find_jobs(sweep_dir: Path) -> list[Path]:
    """Job directories (those holding ``.hydra/``) under a sweep, in job-number order."""
    jobs = [p.parent for p in sweep_dir.rglob(".hydra") if p.is_dir()]
    return sorted(jobs, key=lambda p: (_job_number(p), str(p)))


def _job_number(job: Path) -> float:
    head = job.name.split("_", 1)[0]
    return int(head) if head.isdigit() else math.inf


def read_job(job: Path) -> dict[str, Any]:
    """One job's overrides, status and final metrics (or its error)."""
    finish_pending(job)  # a job killed as it renamed its results: they are whole, finish it
    overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
    params = {}
    for item in overrides:
        key, _, value = str(item).partition("=")
        params[key.lstrip("+~")] = _parse(value)
    number = job.name.split("_", 1)[0]
    row: dict[str, Any] = {"job": number if number.isdigit() else job.name, "params": params, "dir": job}
    path = job / "metrics.json"
    if not path.is_file():
        log = job / "train.log"
        row.update(status="failed", error=f"no metrics.json: the job did not finish (see {log})", metrics={})
        return row
    metrics = json.loads(path.read_text())
    row["status"] = metrics.pop("status", "completed")
    row["error"] = metrics.pop("error", "")
    row["metrics"] = metrics
    return row


def fill_defaults(rows: Sequence[dict[str, Any]]) -> None:
    """Give every job a value for every key some job overrode: its own run's, where its command line set none.

    A job that kept a default (``optimizer``, ``model.rank``) has no override for it; its
    ``.hydra`` record says what it ran with (a group's choice, or the config's value).
    """
    keys = list(dict.fromkeys(k for row in rows for k in row["params"]))
    for row in rows:
        missing = [k for k in keys if k not in row["params"]]
        if missing:
            row["params"].update(_ran_with(row["dir"], missing))


def _ran_with(job: Path, keys: Sequence[str]) -> dict[str, Any]:
    """The values ``job`` ran with for ``keys`` (config groups by their choice), from its ``.hydra`` files."""

    def load(name: str) -> dict:
        try:
            return yaml.safe_load((job / ".hydra" / name).read_text()) or {}
        except (OSError, yaml.YAMLError):
            return {}

    choices = (load("hydra.yaml").get("hydra") or {}).get("runtime", {}).get("choices") or {}
    config = load("config.yaml")
    found = {}
    for key in keys:
        if key in choices:
            found[key] = choices[key]
            continue
        node: Any = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and not (isinstance(node, str) and "${" in node):  # (an interpolation says nothing)
            found[key] = node
    return found


def _parse(value: str) -> Any:
    """An override value as YAML reads it (``8`` -> 8, ``1e-3`` -> 0.001, ``adam`` -> 'adam')."""
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if isinstance(parsed, str):
        try:
            return float(parsed)
        except ValueError:
            return parsed
    return parsed


def swept_parameters(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Override keys whose value differs between jobs, in first-seen order."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row["params"] if k not in keys and not k.startswith("hydra.")]
    return [k for k in keys if len({repr(r["params"].get(k)) for r in rows}) > 1]


def default_metric(rows: Sequence[dict[str, Any]]) -> str:
    """The sweep's ``optimized_metric`` (from the first job's config), else relative_error."""
    for row in rows:
        config = row["dir"] / ".hydra" / "config.yaml"
        if config.is_file():
            key = (yaml.safe_load(config.read_text()) or {}).get("optimized_metric")
            if key:
                return str(key)
    return "relative_error"


def sort_rows(rows: list[dict[str, Any]], metric: str, mode: str = "min") -> list[dict[str, Any]]:
    """Completed jobs best first by ``metric``; jobs without a finite value (failed) last."""

    def key(row: dict[str, Any]) -> tuple[int, float]:
        value = row["metrics"].get(metric)
        if not _finite(value):
            return (1, 0.0)
        return (0, value if mode == "min" else -value)

    return sorted(rows, key=key)


def table(rows: Sequence[dict[str, Any]], metric: str, swept: list[str]) -> tuple[list[str], list[list[Any]]]:
    """Header and cells: job, status, swept parameters, the metric, other metrics, stop/error.

    With nothing swept (one job), every override gets a column instead.
    """
    params = swept or sorted({k for r in rows for k in r["params"] if not k.startswith("hydra.")})
    shown = [m for m in SHOWN_METRICS if m != metric and any(m in r["metrics"] for r in rows)]
    # negative entries only arise with model.project=false: show them when some job has any
    shown += [m for m in NEGATIVITY_METRICS if m != metric and any(r["metrics"].get(m, 0) > 0 for r in rows)]
    header = ["job", "status", *params, metric, *shown, "stop_reason / error"]
    cells = []
    for r in rows:
        note = r["error"] or str(r["metrics"].get("stop_reason", "")).split(":")[0]  # metrics.json has the rest
        values = [r["metrics"].get(m, "") for m in (metric, *shown)]
        cells.append([r["job"], r["status"], *(r["params"].get(p, "") for p in params), *values, note])
    return header, cells


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_tables(
    rows: Sequence[dict[str, Any]], header: list[str], cells: list[list[Any]], out: Path, preamble: str
) -> tuple[Path, Path]:
    """``report.csv`` (full precision, plus each job's folder) and ``report.md`` (4 significant digits)."""
    csv_path, md_path = out / "report.csv", out / "report.md"
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow([*header, "dir"])
    writer.writerows([*row, str(r["dir"])] for r, row in zip(rows, cells, strict=True))
    write_text(csv_path, table.getvalue())
    lines = [preamble, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in cells]
    write_text(md_path, "\n".join(lines) + "\n")
    return csv_path, md_path


def plot_metric(rows: Sequence[dict[str, Any]], metric: str, params: list[str], out: Path, mode: str = "min") -> Path:
    """``<metric>_vs_params.png``: the final metric of every job against each swept parameter.

    Dots are jobs; the line joins the best job at each value of the parameter (best over
    the other parameters), which for a rank sweep is the curve to pick the rank from.
    """
    plt = _pyplot()
    done = [r for r in rows if _finite(r["metrics"].get(metric))]
    fig, axes = plt.subplots(1, len(params), figsize=(4.5 * len(params), 3.6), squeeze=False)
    for ax, param in zip(axes[0], params, strict=True):
        values = [r["params"].get(param) for r in done]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        labels = sorted({repr(v) for v in values}) if not numeric else None
        xs = [v if numeric else labels.index(repr(v)) for v in values]
        ys = [r["metrics"][metric] for r in done]
        ax.scatter(xs, ys, s=18, alpha=0.6, color="tab:blue", label="job")
        best: dict[Any, float] = {}
        for x, y in zip(xs, ys, strict=True):
            best[x] = min(best.get(x, math.inf), y) if mode == "min" else max(best.get(x, -math.inf), y)
        bx = sorted(best)
        ax.plot(bx, [best[x] for x in bx], "-o", color="tab:orange", ms=4, label="best at this value")
        if numeric and bx and min(bx) > 0 and max(bx) / min(bx) >= 20:
            ax.set_xscale("log")
        if numeric and len(bx) <= 12:  # label the swept values themselves
            ax.minorticks_off()
            ax.set_xticks(bx, [_fmt(x) for x in bx])
        if ys and min(ys) > 0 and max(ys) / min(ys) >= 20:
            ax.set_yscale("log")
        if not numeric:
            ax.set_xticks(range(len(labels)), [lb.strip("'") for lb in labels], rotation=30, ha="right")
        ax.set_xlabel(param)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    failed = len(rows) - len(done)
    title = f"{metric} by swept parameter ({len(done)} jobs" + (f", {failed} failed not shown)" if failed else ")")
    fig.suptitle(title, fontsize=10)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = out / f"{metric}_vs_params.png"
    write_atomic(path, lambda f: fig.savefig(f, dpi=120, format="png"))
    plt.close(fig)
    return path


def plot_k_selection(rows: Sequence[dict[str, Any]], out: Path) -> Path | None:
    """``k_selection.png``, cNMF's plot for choosing k: stability and error of the consensus against the rank.

    Drawn for a sweep over ``model.rank`` whose jobs ran ``model.consensus=true``; at each
    rank, the job of highest stability.
    """
    best: dict[int, dict[str, Any]] = {}
    for r in rows:
        rank, metrics = r["params"].get("model.rank"), r["metrics"]
        measured = _finite(metrics.get("stability")) and _finite(metrics.get(CONSENSUS_ERROR))
        if isinstance(rank, int) and measured and (rank not in best or metrics["stability"] > best[rank]["stability"]):
            best[rank] = metrics
    if len(best) < 2:
        return None
    plt = _pyplot()
    ranks = sorted(best)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(ranks, [best[k]["stability"] for k in ranks], "-o", color="tab:blue", ms=4)
    ax.set_xlabel("model.rank (k)")
    ax.set_ylabel("stability (silhouette)", color="tab:blue")
    other = ax.twinx()
    other.plot(ranks, [best[k][CONSENSUS_ERROR] for k in ranks], "-s", color="tab:red", ms=4)
    other.set_ylabel("consensus relative error", color="tab:red")
    if len(ranks) <= 20:
        ax.set_xticks(ranks)
    ax.grid(alpha=0.3)
    fig.suptitle("Choosing k: stable components (high) and error (low)", fontsize=10)
    fig.tight_layout()
    path = out / "k_selection.png"
    write_atomic(path, lambda f: fig.savefig(f, dpi=120, format="png"))
    plt.close(fig)
    return path


def read_curves(job: Path, tags: Sequence[str] = CURVE_TAGS) -> dict[str, tuple[list[int], list[float]]]:
    """(steps, values) of each tag in a job's TensorBoard event files.

    Every event file counts (a resumed run appends a new one); where two files hold the
    same step, the later file wins.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[str, dict[int, float]] = {}
    files = sorted(job.rglob("events.out.tfevents.*"), key=lambda p: (p.stat().st_mtime, p.name))
    for path in files:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in tags:
            if tag in acc.Tags().get("scalars", []):
                points.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return {tag: (sorted(pts), [pts[s] for s in sorted(pts)]) for tag, pts in points.items()}


def plot_curves(rows: Sequence[dict[str, Any]], params: list[str], out: Path) -> Path | None:
    """``curves.png``: every job's training (and held-out) error against updates, overlaid."""
    plt = _pyplot()
    curves = {r["job"]: read_curves(r["dir"]) for r in rows}
    tags = [t for t in CURVE_TAGS if any(t in c for c in curves.values())]
    if not tags:
        return None
    fig, axes = plt.subplots(1, len(tags), figsize=(6 * len(tags), 4), squeeze=False)
    ordered = sorted(rows, key=lambda r: [_sort_key(r["params"].get(p)) for p in params])
    for ax, tag in zip(axes[0], tags, strict=True):
        for r in ordered:
            if tag in curves[r["job"]]:
                steps, values = curves[r["job"]][tag]
                label = ", ".join(f"{p}={_fmt(r['params'].get(p))}" for p in params) or r["job"]
                ax.plot(steps, values, lw=1.2, label=label + _status_note(r["status"]))
        ax.set_xlabel("update")
        ax.set_ylabel(tag)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = out / "curves.png"
    write_atomic(path, lambda f: fig.savefig(f, dpi=120, format="png"))
    plt.close(fig)
    return path


def _status_note(status: str) -> str:
    """What a curve's label adds for a job that did not complete cleanly."""
    if status == "completed":
        return ""
    return " (not non-negative)" if status in SUCCEEDED else " (failed)"


def _sort_key(value: Any) -> tuple[int, float, str]:
    """Numbers in order, then everything else by its text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def _pyplot() -> Any:
    """matplotlib.pyplot drawing to files only (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def report(sweep_dir: str | Path, metric: str | None = None, mode: str = "min", out: str | Path | None = None) -> dict:
    """Write the sweep's table and plots; return what was written and the best job."""
    sweep = Path(sweep_dir)
    if not sweep.is_dir():
        raise FileNotFoundError(f"sweep directory {sweep} does not exist; pass the multirun/<date>/<time> folder.")
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be min or max, got {mode!r}.")
    jobs = find_jobs(sweep)
    if not jobs:
        raise FileNotFoundError(f"{sweep} holds no job directories (folders with .hydra/); is it a multirun folder?")
    rows = [read_job(job) for job in jobs]
    fill_defaults(rows)
    metric = metric or default_metric(rows)
    if not any(metric in r["metrics"] for r in rows) and any(r["status"] == "completed" for r in rows):
        known = sorted({k for r in rows for k, v in r["metrics"].items() if isinstance(v, (int, float))})
        raise ValueError(f"metric {metric!r} is in no job's metrics.json; choose one of {known}.")
    rows = sort_rows(rows, metric, mode)
    target = Path(out) if out is not None else sweep / "report"
    target.mkdir(parents=True, exist_ok=True)
    params = swept_parameters(rows)
    header, cells = table(rows, metric, params)
    fixed = {k: v for k, v in rows[0]["params"].items() if k not in params and not k.startswith("hydra.")}
    preamble = f"Sweep `{sweep}`: {len(rows)} jobs, ranked by `{metric}` ({mode} is best)."
    if fixed:
        preamble += " Same in every job: " + ", ".join(f"`{k}={_fmt(v)}`" for k, v in fixed.items()) + "."
    csv_path, md_path = write_tables(rows, header, cells, target, preamble)
    written = {"csv": csv_path, "markdown": md_path}
    if params and any(_finite(r["metrics"].get(metric)) for r in rows):
        written["metric_plot"] = plot_metric(rows, metric, params, target, mode)
    k_selection = plot_k_selection(rows, target)
    if k_selection is not None:
        written["k_selection"] = k_selection
    curves = plot_curves(rows, params, target)
    if curves is not None:
        written["curves"] = curves
    best = rows[0] if _finite(rows[0]["metrics"].get(metric)) else None
    return {
        "written": written,
        "metric": metric,
        "jobs": len(rows),
        "failed": sum(r["status"] not in SUCCEEDED for r in rows),
        "best": None
        if best is None
        else {"job": best["job"], **{p: best["params"].get(p) for p in params}, metric: best["metrics"][metric]},
    }


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, say how many jobs failed and how to see the table.

    A multirun with failed (or degenerate) jobs exits with code 1 once all have run, so a
    script or scheduler does not read it as a success.
    """

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        """Count the jobs' statuses from their metrics.json."""
        import logging

        sweep = Path(config.hydra.sweep.dir)
        rows = [read_job(job) for job in find_jobs(sweep)] if sweep.is_dir() else []
        failed = [r["job"] for r in rows if r["status"] not in SUCCEEDED]
        log = logging.getLogger(__name__)
        log.info("sweep done: nmf-sweep-report %s writes its table and plots", sweep)
        if failed:
            log.error("%d of %d jobs failed (jobs %s): exit code 1", len(failed), len(rows), ", ".join(failed))
            sys.exit(1)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: ``nmf-sweep-report <multirun dir> [--metric M] [--mode min|max] [--out DIR]``."""
    parser = argparse.ArgumentParser(prog="nmf-sweep-report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="a multirun folder, e.g. multirun/2026-01-01/12-00-00")
    parser.add_argument("--metric", help="metrics.json key to rank jobs by (default: the sweep's optimized_metric)")
    parser.add_argument("--mode", default="min", choices=("min", "max"), help="lower or higher is better")
    parser.add_argument("--out", help="output folder (default: <sweep_dir>/report)")
    args = parser.parse_args(argv)
    try:
        result = report(args.sweep_dir, args.metric, args.mode, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result["written"]["markdown"].read_text())
    for kind, path in result["written"].items():
        print(f"{kind}: {path}")
    if result["failed"]:
        print(f"{result['failed']} of {result['jobs']} jobs failed (their error is in the table)")
    if result["best"] is not None:
        print("best: " + ", ".join(f"{k}={_fmt(v)}" for k, v in result["best"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
