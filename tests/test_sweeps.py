import csv
import json
import shutil
import subprocess

import pytest
from conftest import run_cli

from nmf_lightning.report import main as report_main
from nmf_lightning.report import report

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A real 4-job multirun on the toy matrix with held-out entries; rank=0 fails."""
    root = tmp_path_factory.mktemp("sweep")
    proc = run_cli(
        "-m",
        "data=toy",
        "data.holdout=0.2",
        "model.rank=0,1,2,3",
        "trainer.max_steps=200",
        "optimizer.lr=0.05",
        "model.inner_steps=50",
        "optimized_metric=val_relative_error",
        "callbacks.progress_bar.refresh_rate=0",
        "trainer.accelerator=cpu",
        f"hydra.sweep.dir={root / 'multirun'}",
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr
    assert "1 of 4 jobs failed" in proc.stderr + proc.stdout
    return root / "multirun"


def test_a_failing_job_records_why_and_the_others_finish(sweep):
    records = {p.parent.name.split("_")[0]: json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}
    assert len(records) == 4
    assert records["0"]["status"] == "failed" and "model.rank must be >= 1" in records["0"]["error"]
    assert not (next(sweep.glob("0_*")) / "factors.npz").exists()
    for job in "123":
        assert records[job]["status"] == "completed"
        assert (next(sweep.glob(f"{job}_*")) / "factors.npz").exists()


def test_report_has_one_row_per_job_sorted_with_failures_last_and_plots(sweep, tmp_path):
    out = tmp_path / "report"
    result = report(sweep, out=out)
    assert result["metric"] == "val_relative_error"  # the sweep's optimized_metric
    assert result["jobs"] == 4 and result["failed"] == 1
    with (out / "report.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows][-1] == "0" and len(rows) == 4
    assert rows[-1]["status"] == "failed" and "model.rank must be >= 1" in rows[-1]["stop_reason / error"]
    values = [float(r["val_relative_error"]) for r in rows[:3]]
    assert values == sorted(values)
    assert {r["model.rank"] for r in rows} == {"0", "1", "2", "3"}
    assert result["best"]["model.rank"] == int(rows[0]["model.rank"])
    md = (out / "report.md").read_text()
    assert md.count("\n| ") == 5 and "failed" in md  # header + 4 jobs
    for name in ("val_relative_error_vs_params.png", "curves.png"):
        assert (out / name).read_bytes().startswith(PNG), name


def test_report_console_script_and_its_errors(sweep, tmp_path, capsys):
    exe = shutil.which("nmf-sweep-report")
    assert exe, "the nmf-sweep-report console script is not installed"
    proc = subprocess.run(
        [exe, str(sweep), "--metric", "relative_error", "--out", str(tmp_path / "r")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "best: job=" in proc.stdout and (tmp_path / "r" / "relative_error_vs_params.png").exists()
    assert report_main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert report_main([str(sweep), "--metric", "accuracy", "--out", str(tmp_path / "x")]) == 2
    assert "choose one of" in capsys.readouterr().err
