"""A user's matrix from disk: .npy, .npz (dense or scipy sparse), .csv/.tsv, .mtx, .pt, .h5ad/.h5.

``.npy`` and HDF5 files are opened lazily (:class:`~nmf_lightning.data.rows.OnDisk`), so a
streamed run (``data.batch_rows``) reads them a block of rows at a time, never whole;
other runs read them whole.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.io
import scipy.sparse as sp

from nmf_lightning.data.rows import H5Matrix, NpyFile, OnDisk
from nmf_lightning.data.sources import Matrix
from nmf_lightning.linalg import scipy_csr
from nmf_lightning.validation import MissingFileError, NMFInputError, check_sparse

#: text files are read as UTF-8, a leading byte-order mark (Excel's "CSV UTF-8") skipped
TEXT = "utf-8-sig"
SUFFIXES = (".npy", ".npz", ".csv", ".tsv", ".txt", ".mtx", ".pt", ".pth", ".h5ad", ".h5", ".hdf5")
#: text cells that mean "missing" unless data.na_values says otherwise (compared case-insensitively)
NA_VALUES = ("", "nan", "na", "n/a", "null")


def from_file(
    path: str,
    key: str | None = None,
    skip_header: int = 0,
    delimiter: str | None = None,
    unstored: str = "zero",
    col_names: str | None = None,
    image_shape: list[int] | tuple[int, int] | None = None,
    na_values: Sequence[str] = NA_VALUES,
    layout: str = "matrix",
) -> Matrix:
    """Load X from ``path``; the format is chosen by the file extension.

    ``key`` picks an array in a multi-array .npz, a dict saved in .pt or the matrix of an
    HDF5 file (default ``X``, AnnData's cells x genes); ``skip_header``
    and ``delimiter`` apply to text files, where cells in ``na_values`` (empty, ``nan``,
    ``NA``, ``N/A``, ``null``) are missing and any other non-number is an error.
    ``unstored='missing'`` reads a sparse matrix as ratings: only stored entries are
    observed (the default, ``'zero'``, treats unstored entries as observed zeros).
    ``col_names`` is a text file with one name per column (e.g. the vocabulary of a
    document-term matrix: topics are then shown as words); ``image_shape`` (h, w) folds
    each row of H into an image (rows of X are images of h x w pixels).
    """
    if unstored not in ("zero", "missing"):
        raise NMFInputError(f"data.unstored={unstored!r} must be 'zero' or 'missing'.")
    if layout not in ("matrix", "triplets"):
        raise NMFInputError(f"data.layout={layout!r} must be 'matrix' or 'triplets'.")
    if path is None or str(path) == "":
        raise NMFInputError("data=file needs data.path=PATH to a matrix file.")
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if p.is_dir():
        raise NMFInputError(f"data.path={str(path)!r} is a folder; give the matrix file in it ({', '.join(SUFFIXES)}).")
    if suffix not in SUFFIXES and layout != "triplets":
        raise NMFInputError(
            f"data.path={str(path)!r} has an unknown extension {suffix or '(none)'!r}; "
            f"supported: {', '.join(SUFFIXES)}."
        )
    if layout == "triplets" and suffix in SUFFIXES and suffix not in (".csv", ".tsv", ".txt"):
        raise NMFInputError(f"data.layout=triplets reads a text file, and data.path is a {suffix} file.")
    if not p.is_file():
        raise MissingFileError(f"data.path={str(path)!r} does not exist or is not a file.")
    if p.stat().st_size == 0:
        raise NMFInputError(f"data.path={str(path)!r} is empty (0 bytes): it holds no matrix; write it again.")
    if suffix == ".npz" and layout != "triplets" and not zipfile.is_zipfile(p):
        raise NMFInputError(
            f"data.path={str(path)!r} is not a whole .npz archive (numpy's zip of arrays, from np.savez or "
            "scipy.sparse.save_npz): it is cut short or holds other bytes; write it again."
        )
    reader = _triplets if layout == "triplets" else _READERS[suffix]
    try:
        X = reader(p, key=key, skip_header=skip_header, delimiter=delimiter, na_values=na_values)
    except ImportError as err:
        raise NMFInputError(f"reading data.path={str(path)!r} needs h5py: pip install h5py ({err})") from err
    except (ValueError, OSError, KeyError, EOFError, RuntimeError, TypeError, OverflowError, zipfile.BadZipFile) as err:
        raise NMFInputError(f"could not read data.path={str(path)!r} as {suffix}: {err}") from err
    except pickle.UnpicklingError:  # torch.load(weights_only=True) refuses what is not tensors
        raise NMFInputError(
            f"could not read data.path={str(path)!r} as {suffix}: it must hold a tensor (dense or sparse) or a "
            "dict of tensors saved with torch.save, and it holds other Python objects, which are not loaded "
            "(loading them could run code); save the matrix with torch.save(torch.as_tensor(X), path)"
        ) from None
    labels = None
    if isinstance(X, tuple):  # triplets: the matrix and its column labels (the items' ids)
        X, labels = X
    if isinstance(X, OnDisk):  # read in row slices when used
        dtype = getattr(X, "dtype", np.dtype(np.float64))
        if not np.issubdtype(dtype, np.number):
            raise NMFInputError(f"data.path={str(path)!r} does not hold numbers (dtype {dtype}).")
    elif sp.issparse(X):
        check_sparse(X, f"data.path={str(path)!r}")  # before any conversion reads its indices
        X = sp.csr_matrix(X)
        if unstored == "missing" and X.nnz == 0:
            raise NMFInputError(
                f"data.path={str(path)!r} stores no entries, so with data.unstored=missing none is observed."
            )
    else:
        X = np.asarray(X)
        if X.dtype == object or not np.issubdtype(X.dtype, np.number):
            raise NMFInputError(f"data.path={str(path)!r} does not hold numbers (dtype {X.dtype}).")
    names = _column_names(col_names, X.shape) if col_names else labels
    shape = _image_shape(image_shape, X.shape) if image_shape else None
    return Matrix(
        X,
        name=p.stem,
        unstored_missing=unstored == "missing" and (sp.issparse(X) or getattr(X, "sparse", False)),
        col_names=names,
        image_shape=shape,
    )


def _triplets(p: Path, skip_header: int = 0, delimiter: str | None = None, **_) -> tuple[sp.csr_matrix, list[str]]:
    """A text file of (row id, column id, value) lines, more columns ignored, as a sparse matrix.

    Ids are any labels (MovieLens's user and item numbers, names): each distinct one is a
    row or column, in sorted order (numerically when all are integers). The column ids
    come back as the column names. A pair given twice is an error, not a sum. A first
    line whose value is not a number is a header (RecBole's ``user_id:token item_id:token
    rating:float``), read past without ``data.skip_header``.
    """
    delimiter = _delimiter(p, delimiter)
    first = _first_line(p, skip_header)  # a text file with data rows
    cells = first.split(delimiter)
    if skip_header == 0 and len(cells) >= 3 and not _is_number(cells[2]):
        skip_header = _header_lines(p)
        _first_line(p, skip_header)  # rows after the header, too
    cells = np.genfromtxt(
        p, delimiter=delimiter, skip_header=skip_header, dtype=str, usecols=(0, 1, 2), ndmin=2, encoding=TEXT
    )
    cells = np.char.strip(cells)
    try:
        values = cells[:, 2].astype(np.float64)
    except ValueError:
        bad = next(i for i, c in enumerate(cells[:, 2]) if not _is_number(c) or not c)
        raise NMFInputError(
            f"data row {bad + 1} holds the value {str(cells[bad, 2])!r} in its third column, which is not a number"
        ) from None
    index = []
    for column in (cells[:, 0], cells[:, 1]):
        labels, inverse = np.unique(column, return_inverse=True)  # distinct spellings: "007" is not "7"
        if all(_plain_int(c) for c in labels):  # integer ids in numeric order, long ones too
            order = sorted(range(len(labels)), key=lambda i: int(labels[i]))
            rank = np.empty(len(order), dtype=np.int64)
            rank[order] = np.arange(len(order))
            labels, inverse = labels[order], rank[inverse.ravel()]
        index.append((labels, inverse.ravel()))
    (users, rows), (items, cols) = index
    pairs = rows.astype(np.int64) * len(items) + cols
    unique, counts = np.unique(pairs, return_counts=True)
    if (counts > 1).any():
        first, second = np.nonzero(pairs == unique[counts > 1][0])[0][:2] + 1
        raise NMFInputError(f"data rows {first} and {second} give the same (row, column) pair; keep one of them")
    X = sp.csr_matrix((values, (rows, cols)), shape=(len(users), len(items)))
    return X, [str(label) for label in items]


def _header_lines(p: Path) -> int:
    """The lines up to and including the first that holds data: a header after blank or comment lines."""
    with open(p, encoding=TEXT) as f:
        for number, line in enumerate(f, start=1):
            if line.split("#", 1)[0].strip():
                return number
    return 0


def _delimiter(p: Path, delimiter: str | None) -> str | None:
    """The given delimiter, else the extension's: tab for .tsv, comma for .csv, whitespace otherwise (None)."""
    if delimiter is not None:
        return delimiter
    return {".tsv": "\t", ".csv": ","}.get(p.suffix.lower())


def _plain_int(cell: str) -> bool:
    """An integer written plainly ("42", "-3"; not "007" or "+5"), so its number and its text agree."""
    return cell.lstrip("-").isdigit() and str(int(cell)) == cell


def _column_names(path: str, shape: tuple[int, ...]) -> list[str]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingFileError(f"data.col_names={path!r} does not exist or is not a file.")
    names = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    m = shape[-1] if len(shape) == 2 else None
    if m is not None and len(names) != m:
        raise NMFInputError(
            f"data.col_names={path!r} lists {len(names)} names but X has {m} columns; one name per line."
        )
    return names


def _image_shape(image_shape: list[int] | tuple[int, int], shape: tuple[int, ...]) -> tuple[int, int]:
    if len(image_shape) != 2 or any(int(s) < 1 for s in image_shape):
        raise NMFInputError(f"data.image_shape={list(image_shape)} must be [height, width] of positive integers.")
    h, w = (int(s) for s in image_shape)
    if len(shape) == 2 and h * w != shape[1]:
        raise NMFInputError(
            f"data.image_shape=[{h}, {w}] holds {h * w} pixels but X has {shape[1]} columns; they must match."
        )
    return h, w


def _npy(p: Path, **_) -> NpyFile:
    return NpyFile(p)  # rows are read when used


def _h5(p: Path, key: str | None = None, **_) -> H5Matrix:
    return H5Matrix(p, key or "X")


def _npz(p: Path, key: str | None = None, **_) -> np.ndarray | sp.csr_matrix:
    with np.load(p, allow_pickle=False) as z:
        if {"format", "shape", "data"} <= set(z.files):  # written by scipy.sparse.save_npz
            return sp.load_npz(p)
        if key is None:
            if len(z.files) != 1:
                raise NMFInputError(f"it holds arrays {z.files}; pick one with data.key=NAME")
            key = z.files[0]
        return z[key]


def _text(
    p: Path, skip_header: int = 0, delimiter: str | None = None, na_values: Sequence[str] = NA_VALUES, **_
) -> np.ndarray:
    delimiter = _delimiter(p, delimiter)
    header = _first_line(p, skip_header).split(delimiter)
    if skip_header == 0 and not all(_is_number(c) for c in header):
        hint = _delimiter_hint(header, delimiter) or "if it is a header, set data.skip_header=1"
        raise NMFInputError(f"its first line {header[:5]} is not numbers; {hint}")
    try:
        X = np.genfromtxt(
            p, delimiter=delimiter, skip_header=skip_header, dtype=np.float64, filling_values=np.nan, encoding=TEXT
        )
    except ValueError as err:  # numpy lists every ragged line, over several lines of text: say the first
        ragged = re.search(r"Line #(\d+) \(got (\d+) columns instead of (\d+)\)", str(err))
        if ragged is None:
            raise
        line, got, want = ragged.groups()
        raise NMFInputError(
            f"line {line} has {got} cells where the lines before it have {want}; give every row the same "
            "cells (an empty one, between two separators, reads as a missing entry)"
        ) from None
    if X.ndim == 1 and X.size:  # a single row or column is still a (1, m) or (n, 1) matrix
        X = X[None, :] if len(header) > 1 else X[:, None]
    if np.isnan(X).any():
        _check_missing_cells(p, X, skip_header, delimiter, na_values)
    return X


def _check_missing_cells(
    p: Path, X: np.ndarray, skip_header: int, delimiter: str | None, na_values: Sequence[str]
) -> None:
    """A cell that read as NaN must be one of ``na_values``: a typo is not a missing entry."""
    missing = {str(v).strip().lower() for v in na_values}
    rows = set(np.nonzero(np.isnan(X).any(axis=1))[0].tolist())
    with open(p, encoding=TEXT) as f:  # the rows genfromtxt read: past the header, without comments and blank lines
        lines = ((i, line.split("#", 1)[0]) for i, line in enumerate(f, start=1) if i > skip_header)
        numbered = [(i, line) for i, line in lines if line.strip()]
    for row, (number, line) in enumerate(numbered):
        if row not in rows:
            continue
        for col, cell in enumerate(line.rstrip("\n").split(delimiter)):
            if cell.strip().lower() not in missing and not _is_number(cell):
                hint = _delimiter_hint(line.rstrip("\n").split(delimiter), delimiter)
                if hint:
                    raise NMFInputError(f"line {number} reads as one cell, {cell.strip()[:40]!r}...; {hint}")
                raise NMFInputError(
                    f"line {number}, column {col + 1} holds {cell.strip()!r}, which is not a number; fix the "
                    f"cell, or add it to data.na_values (now {list(na_values)}) to read it as a missing entry"
                )


def _delimiter_hint(cells: list[str], delimiter: str | None) -> str | None:
    """When a line reads as one cell of numbers joined by another separator, name that separator."""
    if len(cells) != 1:
        return None
    for sep in (",", ";"):
        parts = cells[0].strip().split(sep)
        if sep != delimiter and len(parts) > 1 and all(_is_number(c) for c in parts):
            return f"its cells are separated by '{sep}': set \"data.delimiter='{sep}'\" (quoted, as Hydra reads it)"
    return None


def _first_line(p: Path, skip_header: int) -> str:
    try:
        with open(p, encoding=TEXT) as f:
            lines = [line for line in f if line.strip()]
    except UnicodeDecodeError:
        raise NMFInputError(
            "it is not UTF-8 text (a binary file, or text in another encoding: save it as UTF-8)"
        ) from None
    if len(lines) <= skip_header:
        raise NMFInputError("it has no data rows")
    rows = [line.split("#", 1)[0].strip() for line in lines[skip_header:]]
    rows = [row for row in rows if row]  # comment lines are skipped, as genfromtxt skips them
    if not rows:
        raise NMFInputError("it has no data rows")
    return rows[0]


def _is_number(cell: str) -> bool:
    cell = cell.strip()
    if cell == "":
        return True  # an empty cell is a missing entry
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _mtx(p: Path, **_) -> np.ndarray | sp.csr_matrix:
    return scipy.io.mmread(str(p))


def _pt(p: Path, key: str | None = None, **_) -> np.ndarray | sp.csr_matrix:
    import torch

    with torch.sparse.check_sparse_tensor_invariants():  # a sparse tensor's indices are checked as it loads
        obj = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        if key is None:
            raise NMFInputError(f"it holds a dict with keys {list(obj)}; pick one with data.key=NAME")
        obj = obj[key]
    if not isinstance(obj, torch.Tensor):
        raise TypeError(f"expected a tensor, found {type(obj).__name__}")
    if obj.layout != torch.strided:
        return scipy_csr(obj.to_sparse_csr().to(torch.float64))
    return obj.detach().to(torch.float64).numpy()


_READERS = {
    ".npy": _npy,
    ".npz": _npz,
    ".csv": _text,
    ".tsv": _text,
    ".txt": _text,
    ".mtx": _mtx,
    ".pt": _pt,
    ".pth": _pt,
    ".h5ad": _h5,
    ".h5": _h5,
    ".hdf5": _h5,
}
