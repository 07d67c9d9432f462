"""Results written whole or not at all: into a hidden temporary file beside the target, then renamed.

A run killed while writing leaves the previous file (or none), never a truncated one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write`` on a temporary file in ``path``'s folder, then rename it to ``path``."""
    path = Path(path)
    part = path.with_name(f".{path.name}.part")
    try:
        with open(part, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    return path


def save_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    """``np.savez`` to ``path``, atomically."""
    return write_atomic(path, lambda f: np.savez(f, **arrays))


def save_npy(path: str | Path, array: np.ndarray) -> Path:
    """``np.save`` to ``path``, atomically."""
    return write_atomic(path, lambda f: np.save(f, array))


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path``, atomically."""
    return write_atomic(path, lambda f: f.write(text.encode()))
