"""One run per folder: a finished run is not overwritten by accident, and two runs never share a folder."""

from __future__ import annotations

import fcntl
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from nmf_lightning.atomic import finish_pending
from nmf_lightning.distributed import is_main_process
from nmf_lightning.status import FINISHED
from nmf_lightning.validation import NMFInputError

LOCK = ".nmf-lightning.lock"
#: a run's results, removed when ``overwrite`` replaces it
RESULTS = ("metrics.json", "factors.npz", "factors_last_finite.npz", "topics.md", "checkpoints/last.ckpt")


class RunDirError(NMFInputError):
    """The run folder belongs to another run (finished or live); nothing in it is touched."""


@contextmanager
def claim_run_dir(out: Path, overwrite: bool = False, resume: bool = False) -> Iterator[Path]:
    """Hold ``out`` for this run, refusing a folder with a live run or (unless asked) a finished one.

    The lock is the kernel's (``flock``), released when the process ends however it ends;
    the file names the holder's PID. A finished run's folder is taken only with
    ``overwrite`` (its results are removed first) or to continue it (``resume``).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            raise RunDirError(
                f"{out} is in use by a run (PID {holder}); wait for it, stop it, or pick another hydra.run.dir."
            ) from None
        finish_pending(out)  # a run killed while writing its results: they are whole, finish renaming them
        status = check_finished(out, overwrite, resume)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        if status in FINISHED and overwrite and not resume:  # old results must not outlive a failed re-run
            for name in RESULTS:
                (out / name).unlink(missing_ok=True)
        try:
            yield out
        finally:
            (out / LOCK).unlink(missing_ok=True)
    finally:
        os.close(fd)  # releases the lock


def check_finished(out: Path, overwrite: bool = False, resume: bool = False) -> str | None:
    """Refuse a folder that holds a finished run unless asked to replace or continue it; its status otherwise.

    Every DDP rank asks this (rank 0 also holds the folder), so all refuse together.
    """
    status = _status(Path(out) / "metrics.json")
    if status in FINISHED and not (overwrite or resume):
        raise RunDirError(
            f"{out} holds a finished run (status {status}); pick another hydra.run.dir, continue it with "
            "ckpt_path=last, or replace its results with overwrite=true."
        )
    return status


def _status(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def continues(ckpt_path: str | None, out: Path) -> bool:
    """Whether ``ckpt_path`` continues the run in ``out`` (not a checkpoint of another run's)."""
    if ckpt_path is None:
        return False
    return ckpt_path == "last" or Path(str(ckpt_path)).expanduser().resolve().is_relative_to(Path(out).resolve())


def in_use(out: Path) -> str | None:
    """The PID of a live run holding ``out`` (its lock), or None; takes nothing."""
    path = Path(out) / LOCK
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.read(fd, 32).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)  # (a shared lock taken is released with the descriptor)
    return None


class RunFolderGuard(Callback):
    """Hydra callback: refuse a run folder that is another run's before Hydra writes into it.

    Hydra saves the config to ``.hydra/`` and opens ``train.log`` before the run starts;
    in a folder another run is using, or that holds a finished run (without ``overwrite``
    or ``ckpt_path``), that would rewrite the other run's record (``nmf-transform`` reads
    its loss from there). The run ends with one line and exit code 2 instead.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Check ``hydra.run.dir`` as :func:`claim_run_dir` will, before anything is written."""
        if not is_main_process():  # a DDP rank of rank 0's run, which holds the folder
            return
        out = Path(str(config.hydra.run.dir))
        resume = continues(config.get("ckpt_path"), out)
        try:
            holder = in_use(out)
            if holder is not None:
                raise RunDirError(
                    f"{out} is in use by a run (PID {holder}); wait for it, stop it, or pick another hydra.run.dir."
                )
            finish_pending(out)
            check_finished(out, bool(config.get("overwrite")), resume)
        except RunDirError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
