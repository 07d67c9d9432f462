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


def run_cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the real entry point in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "nmf_lightning.train", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"},
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


def pytest_collection_modifyitems(config, items):
    """GPU tests skip themselves where CUDA sees no device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
