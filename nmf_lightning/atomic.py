"""Results written whole or not at all: into a hidden temporary file beside the target, then renamed.

A run killed while writing leaves the previous file (or none), never a truncated one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path in ``path``'s folder to write to, renamed to ``path`` when the block ends well.

    Removed otherwise; a block may write nothing (a checkpoint on a rank that does not save).
    """
    path = Path(path)
    part = path.with_name(f".{path.name}.part")
    try:
        yield part
        if part.exists():
            os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write`` on a temporary file in ``path``'s folder, then rename it to ``path``."""
    with atomic_path(path) as part, open(part, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def save_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    """``np.savez`` to ``path``, atomically."""
    return write_atomic(path, lambda f: np.savez(f, **arrays))


def save_npy(path: str | Path, array: np.ndarray) -> Path:
    """``np.save`` to ``path``, atomically."""
    return write_atomic(path, lambda f: np.save(f, array))


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path``, atomically."""
    return write_atomic(path, lambda f: f.write(text.encode()))
