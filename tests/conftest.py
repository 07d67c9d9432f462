import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from nmf_lightning.train import config_dir

# keep CPU tests quiet and small on 2-core machines
os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")


def make_config(tmp_path: Path, *overrides: str) -> DictConfig:
    """The real train.yaml with overrides, shrunk for a fast CPU run into tmp_path."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                f"paths.output_dir={tmp_path}",
                "trainer.accelerator=cpu",
                "++trainer.enable_progress_bar=false",
                "++callbacks.progress_bar=null",
                "overwrite=true",  # tests train into one tmp_path again and again
                *overrides,
            ],
        )
    with open_dict(cfg):
        cfg.trainer.enable_checkpointing = True
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    """``make_config`` into this test's tmp_path."""
    yield lambda *overrides: make_config(tmp_path, *overrides)
    GlobalHydra.instance().clear()


def run_cli(*args: str, cwd: Path, timeout: int = 300, warnings: bool = False) -> subprocess.CompletedProcess:
    """Run the real entry point in a subprocess, as a user would (``warnings``: Python's shown, as a user sees them)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "default" if warnings else "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "nmf_lightning.train", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def run_sweep(sweep_dir: Path, *overrides: str, failures: bool = False) -> subprocess.CompletedProcess:
    """A quiet CPU multirun of the real entry point into ``sweep_dir``.

    It must exit 0, or 1 when ``failures`` (some jobs are meant to fail: the others still run).
    """
    proc = run_cli(
        "-m",
        *overrides,
        "callbacks.progress_bar.refresh_rate=0",
        "trainer.accelerator=cpu",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=sweep_dir.parent,
    )
    assert proc.returncode == (1 if failures else 0), proc.stderr
    return proc


#: ``pytest -m smoke``: a minute that passes through every entry point and the core once
SMOKE = (
    "test_cli.py::test_cli_trains_end_to_end[toy]",
    "test_train.py::test_run_writes_factors_metrics_checkpoint_and_events",
    "test_estimator.py::test_matches_scikit_learn",
    "test_estimator.py::test_pipeline_with_tfidf_and_grid_search",
    "test_front_ends.py::test_the_cli_and_the_estimator_give_the_same_factors",
    "test_front_ends.py::test_transform_is_the_estimators_transform_and_nmf_transforms",
    "test_streaming.py::test_missing_entries_stream_too",
    "test_holdout.py::test_validation_metrics_match_a_direct_computation",
    "test_data.py::test_file_formats_load_with_the_right_shape_and_values",
    "test_hostile.py::test_valid_matrices_train_and_invalid_ones_fail_in_one_line",
    "test_solvers.py::test_updates_never_increase_the_objective_and_stay_non_negative",
    "test_consensus.py::test_consensus_finds_the_components_and_drops_outliers",
    "test_docs.py::test_the_checker_refuses_what_drifted",
    "test_docs.py::test_the_documentation_site_builds_without_a_warning",
)


def pytest_collection_modifyitems(config, items):
    """Mark the smoke subset; GPU tests skip themselves where CUDA sees no device."""
    import torch

    for item in items:
        if item.nodeid.removeprefix("tests/").startswith(SMOKE):
            item.add_marker(pytest.mark.smoke)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
