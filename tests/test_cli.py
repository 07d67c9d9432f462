import json
import os
import shutil
import subprocess
import sys
import zipfile
from itertools import product
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, run_sweep
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

REPO = Path(__file__).resolve().parents[1]
QUIET = ("callbacks.progress_bar.refresh_rate=0",)


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _curve(run: Path, tag: str = "train/loss") -> list[float]:
    ea = EventAccumulator(str(run), size_guidance={"scalars": 0})
    ea.Reload()
    return [e.value for e in ea.Scalars(tag)]


@pytest.mark.parametrize("data", ["toy", pytest.param("synthetic", marks=pytest.mark.slow)])
def test_cli_trains_end_to_end(tmp_path, data):
    run = tmp_path / "run"
    proc = run_cli(
        f"data={data}",
        "model.rank=3",
        "trainer.max_steps=300",
        "optimizer.lr=0.02",
        "trainer.accelerator=cpu",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    # one progress bar, counted in updates; no Lightning chatter
    assert "updates:" in proc.stdout and "300/300" in proc.stdout
    assert proc.stdout.count("updates/s") <= 3  # not a terminal: the bar is written every few seconds, not per block
    for noise in ("Epoch 0", "Training:", "GPU available", "Tip:", "LeafSpec"):
        assert noise not in proc.stdout + proc.stderr, noise
    log = (run / "train.log").read_text()
    ending = ("after 300 updates (max_steps, completed): ", f"; curves: tensorboard --logdir {run}")
    for line in ("config: ", "overrides: ", "device: cpu", *ending):
        assert line in log, line
    for name in ("factors.npz", "metrics.json", ".hydra/config.yaml", "checkpoints/last.ckpt"):
        assert (run / name).exists(), name
    assert list(run.glob("events.out.tfevents.*"))
    metrics = _metrics(run)
    assert metrics["steps"] == 300 and 0 <= metrics["relative_error"] < 0.3
    loss = _curve(run)
    assert loss[-1] < loss[0]


@pytest.mark.slow  # a subprocess or a multirun: -m slow (and CI) runs it
def test_toy_masked_l21_predicts_the_notebook_matrix(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("experiment=toy_masked_l21", f"hydra.run.dir={run}", *QUIET, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with np.load(run / "factors.npz") as f:
        pred = f["W"] @ f["H"]
    assert pred.shape == (4, 3)
    observed = np.array([[np.nan, 4, 5], [4, 4, 5], [5, 3, 4], [2, 3, 3]])
    mask = ~np.isnan(observed)
    assert np.abs(pred - np.nan_to_num(observed))[mask].max() < 0.5
    # the notebook's rounded prediction, its guess for the missing entry (4) included
    np.testing.assert_array_equal(np.round(pred), [[4, 4, 5], [4, 4, 5], [5, 3, 4], [2, 3, 3]])


@pytest.mark.slow  # a subprocess or a multirun: -m slow (and CI) runs it
def test_synthetic_known_factors_beats_the_notebook_als(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("experiment=synthetic_known_factors", f"hydra.run.dir={run}", *QUIET, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    metrics = _metrics(run)
    assert metrics["relative_error"] < 0.01  # the notebook's ALS stalled at 0.696
    with np.load(run / "factors.npz") as f:
        assert f["W"].dtype == np.float64 and (f["W"] >= 0).all() and (f["H"] >= 0).all()


OPTS = ("adam", "sgd")


@pytest.mark.slow  # a subprocess or a multirun: -m slow (and CI) runs it
def test_multirun_sweep_runs_every_combination_in_its_own_folder(tmp_path):
    sweep = tmp_path / "sweep"
    run_sweep(sweep, "data=toy", "model.rank=1,2", "optimizer=adam,sgd", "trainer.max_steps=20")
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "metrics.json").exists())
    assert len(jobs) == 4
    # job folders (TensorBoard's run names) say what the job changed, in short
    names = [f"{i}_rank={r},optimizer={o}" for i, (r, o) in enumerate(product((1, 2), OPTS))]  # the swept keys
    assert [job.name for job in jobs] == names
    for job in jobs:
        assert list(job.glob("events.out.tfevents.*"))
        # HPARAMS opens on the changed keys: TensorBoard shows the five marked as differing first
        ea = EventAccumulator(str(job))
        ea.Reload()
        content = ea.summary_metadata["_hparams_/experiment"].plugin_data.content
        experiment = plugin_data_pb2.HParamsPluginData.FromString(content).experiment
        shown = {info.name for info in experiment.hparam_infos if info.differs}
        assert shown == {"rank", "optimizer"}  # the table opens on what the sweep varies, then the metrics
        # HPARAMS reads the curve: its last point is the final value
        assert experiment.metric_infos[0].name.tag == "train/relative_error"
        with np.load(job / "factors.npz") as f:
            assert f["W"].shape[1] == int(job.name.split("rank=")[1][0])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("data=file", "data.path=NEG"), "X has 1 negative entries"),
        *(  # each a subprocess of seconds: the same path as the first, other messages
            pytest.param(args, message, marks=pytest.mark.slow)
            for args, message in [
                (("data=file", "data.path=INF"), "X has 1 infinite entries"),
                (("data=file", "data.path=EMPTY"), "X is empty"),
                (("data=file", "data.path=ONED"), "X must be a 2-D matrix"),
                (("data=file", "data.path=ALLNAN"), "X has no observed entries"),
                (("data=file", "data.path=BAD.xyz"), "unknown extension '.xyz'"),
                (("data=file", "data.path=GARBAGE"), "could not read data.path="),
                (("data=toy", "model.rank=0"), "model.rank must be 'auto' or an integer >= 1"),
                (("optimizer=nope",), "optimizer=nope is not one of the optimizer configs"),
            ]
        ),
        (("data=nope",), "data=nope is not one of the data configs"),
    ],
)
def test_bad_input_fails_with_a_clear_message_and_no_results(tmp_path, args, message):
    files = {
        "NEG": np.array([[1.0, -1.0], [2.0, 3.0]]),
        "INF": np.array([[1.0, np.inf], [2.0, 3.0]]),
        "EMPTY": np.zeros((0, 4)),
        "ONED": np.ones(4),
        "ALLNAN": np.full((3, 3), np.nan),
    }
    resolved = []
    for arg in args:
        key = arg.split("=", 1)[1]
        if key in files:
            np.save(tmp_path / f"{key}.npy", files[key])
            arg = f"data.path={tmp_path / key}.npy"
        elif key == "GARBAGE":
            (tmp_path / "garbage.npy").write_bytes(b"\x00not an array")
            arg = f"data.path={tmp_path / 'garbage.npy'}"
        resolved.append(arg)
    run = tmp_path / "run"
    proc = run_cli(*resolved, f"hydra.run.dir={run}", "trainer.accelerator=cpu", cwd=tmp_path)
    assert proc.returncode == 2  # the configuration or input
    assert message in proc.stderr + proc.stdout
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: "), proc.stderr  # one line
    assert not (run / "factors.npz").exists() and not (run / "metrics.json").exists()


def test_console_scripts_are_installed():
    assert shutil.which("nmf-train") and shutil.which("nmf-transform"), "pip install -e . first"


def test_installed_console_script_finds_its_configs(tmp_path):
    exe = shutil.which("nmf-train")
    assert exe is not None, "nmf-train is not installed: pip install -e ."
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            exe,
            "data=toy",
            "model.rank=2",
            "trainer.max_steps=10",
            "trainer.accelerator=cpu",
            f"hydra.run.dir={run}",
            *QUIET,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert _metrics(run)["steps"] == 10


@pytest.mark.slow  # a subprocess or a multirun: -m slow (and CI) runs it
def test_wheel_ships_the_config_tree(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0 and "No module named" in proc.stderr:
        pytest.skip(f"cannot build a wheel here: {proc.stderr[-200:]}")
    assert proc.returncode == 0, proc.stderr
    wheel = next(tmp_path.glob("nmf_lightning-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n.split("nmf_lightning/configs/", 1)[1] for n in names if n.startswith("nmf_lightning/configs/")}
    expected = {str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*.yaml")}
    assert expected <= shipped
    # installed from the wheel (not the source tree), the entry point resolves its configs
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    code = (
        "import nmf_lightning.transform, nmf_lightning.solvers.hals, nmf_lightning.data.newsgroups; "
        "from nmf_lightning.train import config_dir; print(config_dir())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(target)},
    )
    assert out.stdout.strip() == str(target / "nmf_lightning" / "configs"), out.stderr


@pytest.mark.slow  # a subprocess or a multirun: -m slow (and CI) runs it
def test_unknown_experiment_name_is_an_error(tmp_path):
    proc = run_cli("experiment=bogus", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2 and "experiment=bogus is not one of the experiment configs: newsgroups" in proc.stderr


@pytest.mark.slow  # a subprocess or a multirun: -m slow (and CI) runs it
def test_sigterm_stops_the_run_saved_with_exit_code_143(tmp_path):
    import signal
    import time

    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "nmf_lightning.train", "data=toy", "model.rank=2", "trainer.max_steps=100000000",
         "trainer.accelerator=cpu", f"hydra.run.dir={run}", *QUIET],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    log = run / "train.log"
    deadline = time.monotonic() + 120
    while not (log.is_file() and "device:" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # training under way
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    metrics = _metrics(run)
    assert metrics["status"] == "interrupted" and metrics["stop_reason"] == "interrupted by SIGTERM"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "factors.npz").is_file()
    resume = "continue with: nmf-train data=toy model.rank=2 trainer.max_steps=100000000 trainer.accelerator=cpu"
    assert resume in log.read_text() and f"hydra.run.dir={run} ckpt_path=last" in log.read_text()


@pytest.mark.slow  # a subprocess or a multirun: -m slow (and CI) runs it
def test_a_run_killed_outright_resumes_from_its_last_checkpoint_exactly(tmp_path):
    """SIGKILL leaves no chance to save: the periodic checkpoint is what a resumed run continues from."""
    import signal
    import time

    from conftest import make_config

    from nmf_lightning.train import train

    run = tmp_path / "run"
    common = ["data=synthetic", "data.n_rows=40", "data.n_cols=30", "data.true_rank=3", "model.rank=3",
              "optimizer.lr=0.05", "trainer.max_steps=4000", "model.inner_steps=10", "threads=1",
              "callbacks.model_checkpoint.every_n_updates=50",
              "callbacks.model_checkpoint.every_n_minutes=0"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "nmf_lightning.train", *common, "trainer.accelerator=cpu", f"hydra.run.dir={run}",
         *QUIET],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "last.ckpt").is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (run / "metrics.json").exists(), "the run finished before it was killed"
    proc = run_cli(*common, "trainer.accelerator=cpu", f"hydra.run.dir={run}", "ckpt_path=last", *QUIET, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert _metrics(run)["steps"] == 4000
    straight = tmp_path / "straight"
    train(make_config(tmp_path, *common, f"paths.output_dir={straight}"))
    for name in ("W", "H"):
        np.testing.assert_array_equal(np.load(run / "factors.npz")[name], np.load(straight / "factors.npz")[name])
    ea = EventAccumulator(str(run), size_guidance={"scalars": 0})
    ea.Reload()
    assert [e.step for e in ea.Scalars("train/loss")] == list(range(10, 4001, 10))  # no step twice, none missing


@pytest.mark.slow  # a subprocess or a multirun: -m slow (and CI) runs it
def test_a_run_without_a_folder_gets_one_named_after_its_file(tmp_path):
    np.save(tmp_path / "cells.npy", np.random.default_rng(0).random((30, 10)))
    proc = run_cli("data=file", "data.path=cells.npy", "model.rank=2", "trainer.max_steps=2", *QUIET, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    runs = list((tmp_path / "outputs").glob("*/*_cells-adam-k2"))
    assert len(runs) == 1 and (runs[0] / "factors.npz").is_file()
