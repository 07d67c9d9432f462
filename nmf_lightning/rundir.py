"""One run per folder: a finished run is not overwritten by accident, and two runs never share a folder."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
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


#: run folders this process holds already (the Hydra callback takes one before Hydra writes into it)
_HELD: dict[str, int] = {}
#: run folders this process made (none was there), with the folders made to hold them: a refused run takes
#: its own away
_MADE: dict[str, list[Path]] = {}
#: what a run folder holds before its run trains: Hydra's record of the run, its log and the lock
_BEFORE_TRAINING = {".hydra", "train.log", LOCK}


def _key(out: Path) -> str:
    return os.path.realpath(out)


def _take(out: Path, overwrite: bool, resume: bool) -> tuple[int, str | None]:
    """Lock ``out`` for this process (``flock``, PID written) after checking it is free; the descriptor and status.

    Refused, nothing in the folder is changed but a lock file this process made.
    """
    if not out.exists():
        _MADE[_key(out)] = [p for p in (out, *out.parents) if not p.exists()]  # the folder, then its new parents
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunDirError(
            f"{out} is in use by a run (PID {holder}); wait for it, stop it, or pick another hydra.run.dir."
        ) from None
    try:
        finish_pending(out)  # a run killed while writing its results: they are whole, finish renaming them
        status = check_finished(out, overwrite, resume)
    except BaseException:
        _release(out, fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd, status


def _release(out: Path, fd: int) -> None:
    (out / LOCK).unlink(missing_ok=True)
    os.close(fd)  # releases the lock


def hold_run_dir(out: Path, overwrite: bool = False, resume: bool = False) -> None:
    """Take ``out`` for this process until :func:`claim_run_dir` (or :func:`let_go`) is done with it.

    Hydra writes ``.hydra/`` and ``train.log`` before the run starts: held first, of two
    runs started at once into one folder the second is refused before it writes a byte.
    """
    out = Path(out)
    if _key(out) not in _HELD:
        _HELD[_key(out)] = _take(out, overwrite, resume)[0]


def discard_refused(out: Path) -> bool:
    """Remove the folder a run refused before training made for itself: outputs/ keeps no empty runs.

    Only a folder this process made, holding nothing but Hydra's record and the log (the
    error was said on the console); whether it was removed.
    """
    out = Path(out)
    if _key(out) not in _MADE or not out.is_dir() or any(p.name not in _BEFORE_TRAINING for p in out.iterdir()):
        return False
    let_go(out)
    shutil.rmtree(out, ignore_errors=True)
    for parent in _MADE.pop(_key(out))[1:]:  # outputs/<date>/ made for it, unless another run's folder is in it
        try:
            parent.rmdir()
        except OSError:
            break
    return True


def let_go(out: Path) -> None:
    """Release a folder :func:`hold_run_dir` took, if the run never claimed it."""
    fd = _HELD.pop(_key(Path(out)), None)
    if fd is not None:
        _release(Path(out), fd)


@contextmanager
def claim_run_dir(out: Path, overwrite: bool = False, resume: bool = False) -> Iterator[Path]:
    """Hold ``out`` for this run, refusing a folder with a live run or (unless asked) a finished one.

    The lock is the kernel's (``flock``), released when the process ends however it ends;
    the file names the holder's PID. A finished run's folder is taken only with
    ``overwrite`` (its results are removed first) or to continue it (``resume``). A folder
    this process holds already (:func:`hold_run_dir`) is checked again and kept.
    """
    out = Path(out)
    fd = _HELD.pop(_key(out), None)
    if fd is None:
        fd, status = _take(out, overwrite, resume)
    else:
        try:
            status = check_finished(out, overwrite, resume)
        except BaseException:
            _release(out, fd)
            raise
    try:
        if status in FINISHED and overwrite and not resume:  # old results must not outlive a failed re-run
            for name in RESULTS:
                (out / name).unlink(missing_ok=True)
        yield out
    finally:
        _release(out, fd)


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


class RunFolderGuard(Callback):
    """Hydra callback: refuse a run folder that is another run's before Hydra writes into it.

    Hydra saves the config to ``.hydra/`` and opens ``train.log`` before the run starts;
    in a folder another run is using, or that holds a finished run (without ``overwrite``
    or ``ckpt_path``), that would rewrite the other run's record (``nmf-transform`` reads
    its loss from there). The run ends with one line and exit code 2 instead.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Take ``hydra.run.dir`` as :func:`claim_run_dir` will, before anything is written."""
        if not is_main_process():  # a DDP rank of rank 0's run, which holds the folder
            return
        hydra, before = HydraConfig.instance(), HydraConfig.instance().cfg
        hydra.set_config(config)  # the folder's name reads ${hydra:runtime.choices...}
        try:
            out = Path(str(config.hydra.run.dir))
        finally:
            hydra.cfg = before  # (Hydra sets it for the run itself, and puts this back after it)
        try:
            hold_run_dir(out, bool(config.get("overwrite")), continues(config.get("ckpt_path"), out))
        except RunDirError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        self._held = out

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Let go of the folder if the run never claimed it (it failed first, or wrote its results elsewhere)."""
        held, self._held = getattr(self, "_held", None), None
        if held is not None:
            let_go(held)
