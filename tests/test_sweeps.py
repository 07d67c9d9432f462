import csv
import json
import shutil
import subprocess

import pytest
from conftest import run_sweep

from nmf_lightning.report import main as report_main
from nmf_lightning.report import report

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A real 4-job multirun on the toy matrix with held-out entries; rank=0 fails."""
    sweep_dir = tmp_path_factory.mktemp("sweep") / "multirun"
    proc = run_sweep(
        sweep_dir,
        "data=toy",
        "data.holdout=0.2",
        "model.rank=0,1,2,3",
        "trainer.max_steps=200",
        "optimizer.lr=0.05",
        "model.inner_steps=50",
        "optimized_metric=val_relative_error",
        failures=True,
    )
    assert "1 of 4 jobs failed (jobs 0): exit code 1" in proc.stderr + proc.stdout
    return sweep_dir


def test_a_failing_job_records_why_and_the_others_finish(sweep):
    records = {p.parent.name.split("_")[0]: json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}
    assert len(records) == 4
    assert records["0"]["status"] == "failed"
    assert "model.rank must be 'auto' or an integer >= 1" in records["0"]["error"]
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
    assert rows[-1]["status"] == "failed"
    assert "model.rank must be 'auto' or an integer >= 1" in rows[-1]["stop_reason / error"]
    values = [float(r["val_relative_error"]) for r in rows[:3]]
    assert values == sorted(values)
    assert {r["model.rank"] for r in rows} == {"0", "1", "2", "3"}
    assert result["best"]["model.rank"] == int(rows[0]["model.rank"])
    md = (out / "report.md").read_text()
    assert md.count("\n| ") == 5 and "failed" in md  # header + 4 jobs
    for name in ("val_relative_error_vs_params.png", "curves.png"):
        assert (out / name).read_bytes().startswith(PNG), name
    by_divergence = report(sweep, out=tmp_path / "by_divergence", metric="val_divergence")
    with (tmp_path / "by_divergence" / "report.csv").open() as f:
        values = [float(r["val_divergence"]) for r in list(csv.DictReader(f))[:3]]
    assert by_divergence["metric"] == "val_divergence" and values == sorted(values) and values[0] > 0


def test_report_shows_the_value_a_job_kept_by_default(tmp_path):
    """Runs gathered in one folder, one with the defaults: its optimizer and rank come from its .hydra record."""
    for name, overrides, choice, rank, error in (("a", [], "adam", 16, 0.15), ("b", ["optimizer=hals", "model.rank=3"],
                                                  "hals", 3, 0.03)):  # fmt: skip
        hydra = tmp_path / name / ".hydra"
        hydra.mkdir(parents=True)
        (hydra / "overrides.yaml").write_text("".join(f"- {o}\n" for o in ["data=toy", *overrides]))
        (hydra / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    choices:\n      optimizer: {choice}\n")
        (hydra / "config.yaml").write_text(f"model:\n  rank: {rank}\n  seed: ${{seed}}\n")
        (tmp_path / name / "metrics.json").write_text(json.dumps({"relative_error": error, "status": "completed"}))
    with open(report(tmp_path)["written"]["csv"]) as f:
        got = {row["job"]: (row["optimizer"], row["model.rank"]) for row in csv.DictReader(f)}
    assert got == {"a": ("adam", "16"), "b": ("hals", "3")}


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


def _compose_with_hydra(*overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from nmf_lightning.train import config_dir

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.parametrize(
    ("search", "params"),
    [
        ("optuna_rank_lam", {"model.rank", "model.lam", "optimizer.lr"}),
        ("optuna_rank", {"model.rank", "model.l2_W"}),
        ("optuna", {"model.rank"}),
    ],
)
def test_optuna_search_composes_with_its_search_space(search, params):
    cfg = _compose_with_hydra(f"hparams_search={search}", "optimizer=hals" if search == "optuna_rank" else "seed=0")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert set(sweeper.params) == params and sweeper.max_failure_rate == 1.0
    assert cfg.optimized_metric == "val_relative_error" and cfg.data.holdout > 0
    assert cfg.hydra.mode.name == "MULTIRUN"


@pytest.mark.slow  # a subprocess or a multirun: -m slow (and CI) runs it
def test_optuna_study_of_three_trials_runs_on_toy_data(tmp_path):
    out = tmp_path / "optuna"
    run_sweep(out, "hparams_search=optuna_rank_lam", "data=toy", "hydra.sweeper.n_trials=3", "trainer.max_steps=100")
    records = [json.loads(p.read_text()) for p in out.glob("*/metrics.json")]
    # project=false trials whose clamping cost the fit are results too (not_nonnegative), not failures
    assert len(records) == 3 and all(r["status"] in ("completed", "not_nonnegative") for r in records)
    results = (out / "optimization_results.yaml").read_text()
    best = min(r["val_relative_error"] for r in records)
    assert f"best_value: {best}" in results
    assert report(out)["jobs"] == 3


@pytest.mark.slow  # a subprocess or a multirun: -m slow (and CI) runs it
def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path):
    out = tmp_path / "joblib"
    proc = run_sweep(
        out, "launcher=joblib", "hydra.launcher.n_jobs=2", "data=toy", "model.rank=1,2", "trainer.max_steps=50"
    )
    assert "Joblib.Parallel(n_jobs=2" in proc.stderr + proc.stdout
    assert len(list(out.glob("*/metrics.json"))) == 2


@pytest.mark.parametrize(
    ("launcher", "target"),
    [
        ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
        ("joblib_gpus", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
        ("joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
    ],
)
def test_launcher_configs_compose_and_resolve(launcher, target):
    from omegaconf import OmegaConf

    cfg = _compose_with_hydra(f"launcher={launcher}", "hydra.sweep.dir=/tmp/sweep")
    assert cfg.hydra.launcher._target_ == target
    resolved = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    if launcher == "slurm":
        assert resolved["gpus_per_node"] == 1 and resolved["submitit_folder"] == "/tmp/sweep/.submitit/%j"
    else:
        assert isinstance(resolved["n_jobs"], int)


def test_parallel_jobs_claim_distinct_gpus_and_release_them(tmp_path):
    from nmf_lightning.gpus import claimed_gpu

    with claimed_gpu(tmp_path, 2) as first, claimed_gpu(tmp_path, 2) as second:
        assert {first, second} == {0, 1}
    with claimed_gpu(tmp_path, 2) as again:
        assert again == 0  # both were released
    with pytest.raises(ValueError, match="no CUDA device"), claimed_gpu(tmp_path, 0):
        pass


@pytest.mark.slow  # a subprocess or a multirun: -m slow (and CI) runs it
def test_optuna_study_goes_on_past_failing_trials(tmp_path):
    out = tmp_path / "optuna"
    run_sweep(
        out,
        "hparams_search=optuna_rank_lam",
        "data=toy",
        "hydra.sweeper.n_trials=4",
        "model.rank=choice(0, 2)",  # rank 0 is rejected: those trials fail
        "model.lam=0.1",
        "trainer.max_steps=50",
        failures=True,
    )
    records = [json.loads(p.read_text()) for p in out.glob("*/metrics.json")]
    statuses = sorted(r["status"] for r in records)
    assert len(records) == 4 and "failed" in statuses and "completed" in statuses
    assert "best_value" in (out / "optimization_results.yaml").read_text()
