"""One run per folder: a finished run is not overwritten by accident, and two runs never share a folder."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nmf_lightning.validation import NMFInputError

#: statuses of a run whose results are in its folder
FINISHED = ("completed", "degenerate", "interrupted")
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
