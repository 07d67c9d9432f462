"""One run per folder: a finished run is not overwritten by accident, and two runs never share a folder."""

from __future__ import annotations

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


@contextmanager
def claim_run_dir(out: Path, overwrite: bool = False, resume: bool = False) -> Iterator[Path]:
    """Hold ``out`` for this run, refusing a folder with a finished run or a live one.

    A finished run's folder is taken only with ``overwrite`` or to continue it
    (``resume``: ``ckpt_path`` given); the lock file names the live run's PID.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    status = _status(out / "metrics.json")
    if status in FINISHED and not (overwrite or resume):
        raise NMFInputError(
            f"{out} holds a finished run (status {status}); pick another hydra.run.dir, continue it with "
            "ckpt_path=last, or replace its results with overwrite=true."
        )
    lock = out / LOCK
    _take(lock)
    if status in FINISHED and overwrite and not resume:  # the old results must not outlive a failed re-run
        for name in RESULTS:
            (out / name).unlink(missing_ok=True)
    try:
        yield out
    finally:
        lock.unlink(missing_ok=True)


def _status(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def _take(lock: Path) -> None:
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid = _pid(lock)
            if pid is not None and _alive(pid):
                raise NMFInputError(
                    f"{lock.parent} is in use by a run (PID {pid}); wait for it, stop it, or pick another "
                    "hydra.run.dir."
                ) from None
            lock.unlink(missing_ok=True)  # left by a run that died: take it over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return
    raise NMFInputError(f"could not lock {lock.parent}: another run keeps taking it.")


def _pid(lock: Path) -> int | None:
    try:
        return int(lock.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
