"""X as row blocks: the samples a streamed run's DataLoader yields (``data.batch_rows``).

A block of rows is to NMF what a batch of images is to a CNN: W's rows for it are
updated from it alone, and H from sums over all blocks. Sources are read a block at a
time and never whole: a dense ``.npy`` memory-mapped from disk, a sparse CSR matrix in
host memory, or the CSR (or dense) ``X`` of an HDF5 / AnnData ``.h5ad`` file read in row
slices with h5py.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import Dataset

from nmf_lightning.validation import NMFInputError, check_indptr, check_sparse, check_totals, check_values, has_zeros

#: the scan reads X in pieces of at most this many entries
_SCAN_ENTRIES = 2**22
#: a scan that takes longer than this logs how far it has come, every so often
PROGRESS_SECONDS = 10.0
log = logging.getLogger(__name__)


@dataclass
class RowSummary:
    """What a streamed run needs of X before training: its sums, read in one pass."""

    x_sq: float  # ||X||^2 over observed entries
    total: float  # sum of the observed entries (the random init's scale)
    n_obs: int  # number of observed entries
    masked: bool  # whether some entries are missing
    block_sq: list[float] = field(default_factory=list)  # ||X||^2 of each block of batch_rows rows
    block_missing: list[bool] = field(default_factory=list)  # whether each block has missing entries
    zeros: bool = False  # whether some observed entry is 0 (the Itakura-Saito loss needs X > 0)


class OnDisk:
    """A matrix left on disk: its rows are read when asked for, never all at once."""

    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        """Number of dimensions (2 for a matrix)."""
        return len(self.shape)

    def rows(self, start: int, stop: int) -> np.ndarray | sp.csr_matrix:
        """Rows ``start .. stop - 1``, read now."""
        raise NotImplementedError

    def read(self) -> np.ndarray | sp.csr_matrix:
        """The whole matrix in memory (for runs that do not stream)."""
        return self.rows(0, self.shape[0])


class NpyFile(OnDisk):
    """A ``.npy`` array whose rows are read with plain file reads.

    A memory map would do too, but every page it touches stays mapped and counts in the
    process's resident memory; reads into a fresh array leave only the OS page cache.
    """

    def __init__(self, path: str | Path):
        _check_npy_size(Path(path))
        mm = np.load(path, mmap_mode="r", allow_pickle=False)  # header only: no page is read
        self.path, self.shape, self.dtype, self.offset = str(path), mm.shape, mm.dtype, mm.offset
        self.fortran = mm.ndim > 1 and mm.flags.f_contiguous and not mm.flags.c_contiguous
        del mm

    def rows(self, start: int, stop: int) -> np.ndarray:  # noqa: D102
        if self.fortran or len(self.shape) != 2:  # rows are not contiguous on disk
            return np.array(np.load(self.path, mmap_mode="r")[start:stop])
        m = self.shape[1]
        count = (stop - start) * m
        block = np.fromfile(self.path, self.dtype, count=count, offset=self.offset + start * m * self.dtype.itemsize)
        return block.reshape(stop - start, m)

    def read(self) -> np.ndarray:  # noqa: D102
        return np.load(self.path, allow_pickle=False)


def _check_npy_size(path: Path) -> None:
    """A ``.npy`` file must hold as many bytes as its header says (a cut-short copy, a damaged header)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
        offset = f.tell()
    if dtype.hasobject:
        raise NMFInputError("it holds Python objects, not numbers (they are not loaded: that could run code)")
    need, held = math.prod(shape) * dtype.itemsize, path.stat().st_size - offset
    if held < need:
        raise NMFInputError(
            f"it is cut short: its header says {'x'.join(map(str, shape))} {dtype} values, {need:,} bytes, and "
            f"{held:,} follow it; the file was truncated (or its header damaged): write or copy it again"
        )


class H5Matrix(OnDisk):
    """A matrix inside an HDF5 file (AnnData's ``.h5ad`` among them), read in row slices.

    ``key`` names a dense 2-D dataset or a CSR group (``data``, ``indices``, ``indptr`` and
    a ``shape`` attribute, as AnnData writes ``X``). Only the rows asked for are read.
    """

    def __init__(self, path: str | Path, key: str = "X"):
        self.path, self.key = str(path), key
        self._file: Any = None
        self._pid = os.getpid()
        self.sparse, self.indptr = False, None
        self._csr: tuple[Any, Any] | None = None  # the open CSR group's data and indices datasets
        try:
            self._read_header(self._node())
        finally:
            self.close()  # opened again, by each process, when rows are read

    def _read_header(self, node: Any) -> None:
        if hasattr(node, "shape") and not hasattr(node, "keys"):
            if len(node.shape) != 2:
                raise NMFInputError(f"its dataset {self.key!r} has shape {node.shape}, not a 2-D matrix")
            self.shape = tuple(int(s) for s in node.shape)
            return
        encoding = _text(node.attrs.get("encoding-type", "csr_matrix"))
        if encoding != "csr_matrix" or not {"data", "indices", "indptr"} <= set(node.keys()):
            raise NMFInputError(
                f"its {self.key!r} is {encoding!r} with members {sorted(node.keys())}; rows stream from a CSR "
                "matrix (data, indices, indptr) or a dense dataset: write X as CSR (e.g. adata.X = adata.X.tocsr())"
            )
        shape = node.attrs.get("shape", node.attrs.get("h5sparse_shape"))
        if shape is None:
            raise NMFInputError(f"its CSR group {self.key!r} has no 'shape' attribute")
        self.sparse, self.shape = True, tuple(int(s) for s in shape)
        self.indptr = node["indptr"][:].astype(np.int64)  # n + 1 offsets: small next to the data
        stored = min(len(node["indices"]), len(node["data"]))
        damaged = f"its CSR group {self.key!r} is not a well-formed sparse matrix"
        check_indptr(self.indptr, self.shape[0], stored, damaged, "the file is damaged: write it again")

    def _node(self) -> Any:
        if self._file is None or self._pid != os.getpid():  # a worker process opens its own handle
            import h5py

            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        if self.key not in self._file:
            raise KeyError(f"it has no {self.key!r}; it holds {sorted(self._file.keys())} (pick one with data.key)")
        return self._file[self.key]

    @property
    def nnz(self) -> int:
        """Stored entries (n * m when dense)."""
        return int(self.indptr[-1]) if self.sparse else self.shape[0] * self.shape[1]

    def rows(self, start: int, stop: int) -> np.ndarray | sp.csr_matrix:
        """Rows ``start .. stop - 1`` as a dense array or a CSR matrix."""
        if not self.sparse:
            return np.asarray(self._node()[start:stop])
        if self._csr is None or self._pid != os.getpid():  # the group's datasets, looked up once per handle
            node = self._node()
            self._csr = (node["data"], node["indices"])
        data, indices = self._csr
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        indptr = self.indptr[start : stop + 1] - lo
        block = sp.csr_matrix((data[lo:hi], indices[lo:hi], indptr), shape=(stop - start, self.shape[1]))
        check_sparse(block, f"data.path={self.path!r} ({self.key!r})", first_row=start)  # its column indices, as read
        return block

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_csr": None}  # a worker process opens the file again

    def close(self) -> None:
        """Close the file (it is opened again when rows are read)."""
        self._csr = None
        if self._file is not None:
            self._file.close()
            self._file = None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def row_block(X: Any, start: int, stop: int) -> np.ndarray | sp.csr_matrix:
    """Rows ``start .. stop - 1`` of X (array, memory map, CSR matrix or :class:`OnDisk`), read alone.

    Rows of a canonical CSR matrix in memory (sorted, no duplicates) are views of its
    arrays: scipy's slicing copied them (4 ms for a block of 1.07 M entries, every block of
    every pass). Others are copied, as the reader makes a block canonical in place.
    """
    if isinstance(X, OnDisk):
        return X.rows(start, stop)
    if _rows_are_views(X):
        block = sp.csr_matrix(csr_rows(X, start, stop)[::-1], shape=(stop - start, X.shape[1]), copy=False)
        block.has_canonical_format = True  # so are its rows: nothing sorts or sums them in place, in X
        return block
    return X[start:stop]  # a copy: a block's duplicates are summed, its indices sorted, in place


def _rows_are_views(X: Any) -> bool:
    """Whether rows of X are read as views of its arrays: a canonical CSR matrix in memory (scipy caches the check)."""
    return sp.issparse(X) and X.format == "csr" and X.has_canonical_format


def csr_rows(X: sp.csr_matrix, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ``start .. stop - 1`` of a CSR X as (indptr, indices, data): views of X's arrays, indptr shifted."""
    lo, hi = int(X.indptr[start]), int(X.indptr[stop])
    return X.indptr[start : stop + 1] - lo, X.indices[lo:hi], X.data[lo:hi]


def in_memory(X: Any) -> bool:
    """Whether X is already held in host memory (not a file or a memory map)."""
    return not isinstance(X, (OnDisk, np.memmap)) and not isinstance(getattr(X, "base", None), np.memmap)


def materialize(X: Any) -> np.ndarray | sp.spmatrix:
    """X whole in memory: a matrix left on disk is read."""
    return X.read() if isinstance(X, OnDisk) else X


def scan(X: Any, batch_rows: int, unstored_missing: bool = False, name: str = "X") -> RowSummary:
    """Check X block by block (as :func:`~nmf_lightning.validation.check_matrix` does whole) and sum it.

    ``unstored_missing``: the unstored entries of a sparse X are missing (ratings), not zeros.
    """
    if len(X.shape) != 2:
        raise NMFInputError(
            f"{name} must be a 2-D matrix, got {len(X.shape)}-D with shape {X.shape}; "
            "reshape it to (rows, columns) first."
        )
    n, m = X.shape
    if n == 0 or m == 0:
        raise NMFInputError(f"{name} is empty (shape {X.shape}); NMF needs at least one row and column.")
    total, n_obs, positive, zeros = 0.0, 0, False, False
    block_sq, block_missing = [], []
    step = max(1, min(batch_rows, _SCAN_ENTRIES // m))  # read in pieces that keep float64 copies small
    clock = time.monotonic()
    for block_start in range(0, n, batch_rows):
        block_stop = min(block_start + batch_rows, n)
        sq, any_missing = [], False
        for start in range(block_start, block_stop, step):
            if time.monotonic() - clock > PROGRESS_SECONDS:  # a large X: say how far the check has come
                log.info("checking %s: %d of %d rows read (%.0f%%)", name, start, n, 100 * start / n)
                clock = time.monotonic()
            stop = min(start + step, block_stop)
            piece = row_block(X, start, stop)
            try:
                missing, has_positive = check_values(piece, name, first_row=start)
            except NMFInputError as err:  # counts are of this piece: say where it is (or count all of X in memory)
                if in_memory(X):
                    check_values(X, name)
                raise NMFInputError(f"{err} (found in rows {start} to {stop - 1})") from None
            positive |= has_positive
            values = (piece.data if sp.issparse(piece) else np.asarray(piece).ravel()).astype(np.float64, copy=False)
            if missing:
                values = values[~np.isnan(values)]
            sq.append(float(np.dot(values, values)))
            zeros = zeros or has_zeros(piece, unstored_missing)
            any_missing |= bool(missing)
            total += float(values.sum())
            n_obs += values.size if not sp.issparse(piece) or unstored_missing else piece.shape[0] * m
        block_sq.append(math.fsum(sq))
        block_missing.append(any_missing)
    check_totals(n_obs > 0, positive, n * m, name)
    return RowSummary(
        x_sq=math.fsum(block_sq),
        total=total,
        n_obs=n_obs,
        masked=n_obs < n * m,
        block_sq=block_sq,
        block_missing=block_missing,
        zeros=zeros,
    )


class RowBlocks(Dataset):
    """Blocks of ``batch_rows`` rows of X, in order: item i holds rows ``i B .. (i + 1) B - 1``.

    Dense blocks come as ``{"start", "X", "missing", "x_sq"}`` (NaN where missing; ``x_sq``
    is the block's ||X||^2 over observed entries, from the :func:`scan` before training);
    CSR blocks as their ``indptr``, ``indices``, ``data`` and, with ``transposes`` and unless
    ``unstored_missing``, the transposed block's (``t_*``), built here (by the loader's
    workers, for a GPU) so the device multiplies both ways row-major.
    ``rows`` = (start, stop) keeps to those rows (a rank's shard under DDP; start a multiple of ``batch_rows``);
    ``length`` pads them with ``{"empty": True}`` items, so every rank's pass has as many batches.
    """

    def __init__(
        self,
        X: Any,
        batch_rows: int,
        summary: RowSummary,
        dtype: torch.dtype = torch.float32,
        unstored_missing: bool = False,
        rows: tuple[int, int] | None = None,
        length: int | None = None,
        transposes: bool = True,
    ):
        self.X, self.batch_rows, self.summary, self.unstored_missing = X, batch_rows, summary, unstored_missing
        self.transposes = transposes
        self.rows = rows or (0, X.shape[0])
        self.blocks = math.ceil((self.rows[1] - self.rows[0]) / batch_rows)
        self.length = max(length or 0, self.blocks)
        self.dtype = np.float64 if dtype == torch.float64 else np.float32

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        if i >= self.blocks:  # padding: this rank's rows are done, the others' are not
            return {"start": self.rows[1], "empty": True}
        start = self.rows[0] + i * self.batch_rows
        stop = min(start + self.batch_rows, self.rows[1])
        item = {"start": start, "x_sq": self.summary.block_sq[start // self.batch_rows]}
        X = self.X
        # int32 indices for a CPU's sparse kernels (ratings' indices are gathered and counted: int64)
        narrow = not self.unstored_missing and not self.transposes
        if _rows_are_views(X) and not self.transposes:  # checked X in memory: its rows as they are, no scipy matrix
            indptr, indices, data = csr_rows(X, start, stop)
            return {**item, "shape": (stop - start, X.shape[1]), **_parts(indptr, indices, data, self.dtype, narrow)}
        block = row_block(X, start, stop)
        if not sp.issparse(block):
            fresh = block.dtype == self.dtype and block.flags.c_contiguous and block.flags.writeable
            if not fresh or isinstance(block, np.memmap):  # a view of X in memory, or a file's new read, is kept
                block = np.array(block, dtype=self.dtype)
            # one layout for every block: when any has missing entries, all are masked
            return {**item, "X": torch.from_numpy(block), "missing": self.summary.masked}
        block = (block if block.format == "csr" else sp.csr_matrix(block)).astype(self.dtype, copy=False)
        block.sum_duplicates()
        item.update(shape=tuple(block.shape), **_csr_parts(block, "", narrow))  # ints: no device copy to read back
        if self.transposes and not self.unstored_missing:
            item.update(_csr_parts(block.T.tocsr(), "t_"))
        return item

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))


def _csr_parts(X: sp.csr_matrix, prefix: str, narrow: bool = False) -> dict[str, torch.Tensor]:
    X.sort_indices()
    return _parts(X.indptr, X.indices, X.data, X.dtype, narrow, prefix)


def _parts(
    indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, dtype: Any, narrow: bool = False, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """A CSR block's arrays as tensors, values in ``dtype``, views where they are already so.

    Indices are int64, or with ``narrow`` (a block a CPU multiplies) int32 where X stores
    them so (AnnData and scipy do, below 2^31 entries): no copy of them per block, and
    torch's sparse product ran 25 % faster on them (1.28 ms against 1.70 for 1.07 M
    entries at k = 10).
    """
    index = np.int32 if narrow and indices.dtype == np.int32 and len(indices) < 2**31 else np.int64
    return {
        f"{prefix}indptr": torch.from_numpy(indptr.astype(index, copy=False)),
        f"{prefix}indices": torch.from_numpy(indices.astype(index, copy=False)),
        f"{prefix}data": torch.from_numpy(data.astype(dtype, copy=False)),
    }
