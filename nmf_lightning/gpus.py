"""Share one machine's GPUs among the parallel jobs of a sweep (launcher=joblib_gpus).

A job holds an exclusive file lock on one GPU slot while it trains, so a job never
lands on a GPU that another job still uses, whichever worker process runs it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nmf_lightning.validation import NMFInputError


@contextmanager
def claimed_gpu(lock_dir: str | Path, n_gpus: int, poll_seconds: float = 1.0) -> Iterator[int]:
    """Wait for a free GPU index in ``range(n_gpus)`` and hold it for the ``with`` block."""
    import fcntl  # POSIX: GPU sweeps run on Linux

    if n_gpus < 1:
        raise NMFInputError(
            "spread_gpus=true (launcher=joblib_gpus) but no CUDA device is visible; use launcher=joblib."
        )
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        for index in range(n_gpus):
            handle = (lock_dir / f"gpu{index}.lock").open("w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                yield index
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        time.sleep(poll_seconds)
