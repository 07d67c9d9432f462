"""Results written whole or not at all: into a hidden temporary file beside the target, then renamed.

A run killed while writing leaves the previous file (or none), never a truncated one; and
files that describe one state (factors.npz and metrics.json) are replaced together
(:func:`write_together`).
"""

from __future__ import annotations

import json
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


#: the files :func:`write_together` has written whole and is renaming into place, listed until all are
PENDING = ".results-pending.json"


def write_together(folder: str | Path, writers: dict[str, Callable[[IO[bytes]], None]]) -> None:
    """Write files into ``folder`` that must be replaced together: both or neither, however the process ends.

    Each is written whole to a hidden temporary file first; then a list of them is written
    (atomically) and they are renamed into place, the list removed last. A process killed
    before the list leaves every old file; one killed after it leaves the list, and
    :func:`finish_pending` (run before anything reads the folder again) renames the rest.
    """
    folder = Path(folder)
    for name, write in writers.items():
        with open(folder / f".{name}.part", "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    write_atomic(folder / PENDING, lambda f: f.write(json.dumps(sorted(writers)).encode()))
    finish_pending(folder)


def finish_pending(folder: str | Path) -> None:
    """Complete what :func:`write_together` left half renamed in ``folder`` (a killed run), if anything."""
    folder = Path(folder)
    pending = folder / PENDING
    try:
        names = json.loads(pending.read_text())
    except (OSError, ValueError):
        return
    for name in names:
        part = folder / f".{name}.part"
        if part.exists():
            os.replace(part, folder / name)
    pending.unlink(missing_ok=True)


def save_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    """``np.savez`` to ``path``, atomically."""
    return write_atomic(path, lambda f: np.savez(f, **arrays))


def save_npy(path: str | Path, array: np.ndarray) -> Path:
    """``np.save`` to ``path``, atomically."""
    return write_atomic(path, lambda f: np.save(f, array))


#: what :func:`save_matrix` writes, by the path's extension: numpy's binary, or text with this delimiter
MATRIX_SUFFIXES = {".npy": None, ".csv": ",", ".tsv": "\t", ".txt": " "}


def save_matrix(path: str | Path, array: np.ndarray) -> Path:
    """``array`` to ``path`` as its extension says (:data:`MATRIX_SUFFIXES`), atomically; text rounds trip exactly."""
    suffix = Path(path).suffix.lower()
    if suffix not in MATRIX_SUFFIXES:
        raise ValueError(f"{path}: a matrix is written as {', '.join(MATRIX_SUFFIXES)}, not {suffix or 'no extension'}")
    delimiter = MATRIX_SUFFIXES[suffix]
    if delimiter is None:
        return save_npy(path, array)
    digits = 9 if array.dtype == np.float32 else 17  # (enough to read back the same float)
    return write_atomic(path, lambda f: np.savetxt(f, array, fmt=f"%.{digits}g", delimiter=delimiter))


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path``, atomically."""
    return write_atomic(path, lambda f: f.write(text.encode()))
