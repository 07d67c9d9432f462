"""The scripts behind the documentation's tables run as the documentation writes them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a subprocess or a multirun: -m slow (and CI) runs it
def test_the_penalty_schedule_script_runs_the_readmes_digits_commands(tmp_path):
    out, runs = tmp_path / "results", tmp_path / "runs"
    command = [sys.executable, str(ROOT / "scripts/penalty_schedule.py"), "--out", str(out), "--runs", str(runs)]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "NMF_NEWSGROUPS_ARCHIVE": ""},
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads((out / "penalty_schedule.json").read_text())
    assert [(r["command"], r["exit_code"], r["status"]) for r in rows] == [
        ("nmf-train", 0, "completed"),
        ("nmf-train model.project=false model.lam=10", 0, "not_nonnegative"),
        ("nmf-train model.project=false model.lam=10 model.lam_growth=10", 0, "completed"),
    ]
    grown = rows[2]
    assert max(grown["W_neg_mass"], grown["H_neg_mass"]) <= 1e-3
    assert grown["relative_error"] <= 1.01 * grown["trained_relative_error"]
    assert "| digits | penalty grown from 10 | 0 | completed |" in (out / "penalty_schedule.md").read_text()


@pytest.mark.slow  # a subprocess or a multirun: -m slow (and CI) runs it
def test_the_gpu_proof_dry_run_runs_every_step_and_writes_its_ten_files(tmp_path):
    out = tmp_path / "proof"
    command = [sys.executable, str(ROOT / "scripts/gpu_proof.py"), "--dry-run", "--out", str(out), "--budget", "240"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    names = {"env.json", "log.txt", "junit.xml", "benchmark.md", "benchmark.json", "profile.md", "profile.json"}
    names |= {"streaming.md", "streaming.json"}
    assert {p.name for p in out.iterdir()} == names | {"summary.md"}
    summary = (out / "summary.md").read_text()
    for name in ("tests", "benchmark", "streaming", "profile"):
        assert f"| {name} | 0 |" in summary, name
    assert "'skipped': " in summary and "dry_run True" in summary
    assert "| digits | nmf-lightning hals (tol 1e-4) |" in summary
    assert "CSR .npz, k=10 | hals 50 blocks/pass |" in summary  # streamed passes against whole updates
    assert done.stdout.rstrip().splitlines()[-1].startswith("total ")  # the table comes last, then the time


def test_the_choosing_k_commands_are_the_docs():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import choosing_k
    finally:
        sys.path.pop(0)
    page = (ROOT / "docs/sweeps.md").read_text()
    for command in choosing_k.COMMANDS:
        assert command in page, command


@pytest.mark.slow  # a subprocess or a multirun: -m slow (and CI) runs it
def test_the_choosing_k_script_runs_its_commands(tmp_path):
    command = [sys.executable, str(ROOT / "scripts/choosing_k.py"), "--quick", "--cwd", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "outputs/digits_auto/metrics.json").read_text())
    assert 2 <= metrics["rank"] <= 8 and metrics["rank_search"]
    assert (tmp_path / "docs/consensus_digits/k_selection.png").is_file()
    jobs = sorted((tmp_path / "multirun/digits_consensus").glob("*/metrics.json"))
    assert len(jobs) == 2 and all("stability" in json.loads(p.read_text()) for p in jobs)


@pytest.mark.slow  # a subprocess or a multirun: -m slow (and CI) runs it
def test_the_ratings_benchmark_runs_its_commands_and_writes_its_table(tmp_path):
    """On a small u.data-like list (a header line, 1-5 stars), with the torch stand-in for Surprise."""
    rng = np.random.default_rng(0)
    n, m = 200, 120
    X = np.clip(np.rint(3 + rng.normal(0, 0.6, (n, 1)) + rng.normal(0, 0.6, (1, m)) + rng.normal(0, 0.5, (n, m))), 1, 5)
    rows, cols = np.nonzero(rng.random((n, m)) < 0.2)
    lines = [f"{i}\t{j}\t{int(X[i, j])}\t0" for i, j in zip(rows, cols, strict=True)]
    (tmp_path / "u.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "\n".join(lines)
    )
    out = tmp_path / "results"
    command = [sys.executable, str(ROOT / "scripts/benchmark_ratings.py"), "--inter", str(tmp_path / "u.inter")]
    done = subprocess.run([*command, "--out", str(out), "--reference", "torch"], capture_output=True, text=True,
                          cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "ratings.json").read_text())
    assert [r["command"].split()[1] for r in result["ours"]] == ["experiment=ratings"] * 5 + ["data=file"]
    assert all(0.3 < r["val_rmse"] < 1.5 for r in result["ours"] + result["references"])
    assert result["references"][0]["method"].startswith("plain torch biased MF")
    text = (out / "ratings.md").read_text()
    assert "| experiment=ratings: ALS, biases, ridge per rating |" in text and "a plain torch biased-MF loop" in text
