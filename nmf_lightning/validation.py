"""Input checks shared by the CLI, the module and the data loaders.

Every check runs before training starts and raises with a message that names the
problem, the value found and the way out.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch

from nmf_lightning.console import NMFWarning


class NMFInputError(ValueError):
    """Bad data or configuration, detected before any training work (``nmf-train`` exits with code 2)."""


class MissingFileError(NMFInputError, FileNotFoundError):
    """A file the configuration names is not there."""


def check_matrix(X: np.ndarray | sp.spmatrix | sp.sparray, name: str = "X", totals: bool = True) -> None:
    """Check that X is a 2-D, non-empty, finite, non-negative matrix with observed entries.

    NaN marks a missing entry in a dense X; sparse X must not hold NaN (its implicit
    zeros are observed values, so a missing entry cannot be told apart). ``totals=False``
    skips the checks that only training needs (something observed, something positive):
    new rows to transform may well be all zero.
    """
    sparse = sp.issparse(X)
    if not sparse and not isinstance(X, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or a scipy sparse matrix, got {type(X)}.")
    if X.shape[0] == 0 or (X.ndim == 2 and X.shape[1] == 0):
        raise NMFInputError(f"{name} is empty (shape {X.shape}); NMF needs at least one row and column.")
    if sparse or X.ndim != 2:
        missing, positive = check_values(X, name)
    else:  # in row chunks: no float64 copy of a large X
        step = max(1, 2**22 // max(1, X.shape[1]))
        missing, positive = 0, False
        try:
            for start in range(0, X.shape[0], step):
                block_missing, block_positive = check_values(X[start : start + step], name)
                missing, positive = missing + block_missing, positive or block_positive
        except NMFInputError:
            check_values(X, name)  # the message counts over all of X
            raise
    if totals:
        check_totals(missing < X.size if not sparse else True, positive, X.size, name)


def check_indptr(
    indptr: np.ndarray, major: int, stored: int, damaged: str, fix: str, unit: str = "row", offset: int = 0
) -> None:
    """A compressed matrix's index pointer must be whole: a bad one makes every later read go astray.

    One entry per row (``unit``) and one more, from 0, never decreasing, ending within the
    ``stored`` entries. ``damaged`` opens the message, ``fix`` ends it; ``offset`` numbers rows.
    """
    if indptr.ndim != 1 or len(indptr) != major + 1:
        raise NMFInputError(f"{damaged}: its index pointer has {len(indptr)} entries for {major} {unit}s; {fix}.")
    if indptr[0] != 0 or indptr[-1] > stored:
        raise NMFInputError(
            f"{damaged}: its index pointer runs from {indptr[0]} to {indptr[-1]} over {stored} stored entries; {fix}."
        )
    falls = np.flatnonzero(np.diff(indptr) < 0)
    if falls.size:
        raise NMFInputError(f"{damaged}: its index pointer decreases at {unit} {offset + int(falls[0])}; {fix}.")


def check_sparse(X: sp.spmatrix | sp.sparray, name: str = "X", first_row: int = 0) -> None:
    """A sparse matrix's structure must hold together before anything reads it (a damaged one corrupts memory).

    CSR and CSC: the index pointer has one entry per row (column) and one more, starts at 0,
    never decreases and ends within the stored entries; every index lies within the shape.
    COO: every row and column index lies within the shape. Other formats are Python objects,
    checked as they are converted. The error names the first bad row (column); ``first_row``
    is a block's first row in the whole X.
    """
    n, m = X.shape
    damaged = f"{name} is not a well-formed sparse matrix"
    fix = "the file is damaged, or was written with another shape: write it again"
    if X.format in ("csr", "csc"):
        major, minor, unit, other = (n, m, "row", "column") if X.format == "csr" else (m, n, "column", "row")
        offset = first_row if X.format == "csr" else 0
        indptr, indices = np.asarray(X.indptr).astype(np.int64, copy=False), np.asarray(X.indices)
        check_indptr(indptr, major, min(len(indices), len(X.data)), damaged, fix, unit, offset)
        stored = indices[: indptr[-1]]
        inside = not stored.size or (stored.min() >= 0 and stored.max() < minor)  # (no temporaries: every block read)
        bad = np.array([]) if inside else np.flatnonzero((stored < 0) | (stored >= minor))
        if bad.size:
            where = offset + int(np.searchsorted(indptr, bad[0], side="right")) - 1
            raise NMFInputError(
                f"{damaged}: {unit} {where} has {other} index {int(stored[bad[0]])}, outside its {minor} "
                f"{other}s; {fix}."
            )
    elif X.format == "coo":
        for index, size, unit in ((X.row, n, "row"), (X.col, m, "column")):
            bad = np.flatnonzero((np.asarray(index) < 0) | (np.asarray(index) >= size))
            if bad.size:
                raise NMFInputError(
                    f"{damaged}: stored entry {int(bad[0])} has {unit} index {int(index[bad[0]])}, outside its "
                    f"{size} {unit}s; {fix}."
                )


def check_checkpoint_factors(W: object, H: object, rank: int, restarts: int, projected: bool, name: str) -> None:
    """A checkpoint's factors before a run resumes from them: tensors of this run's rank and restarts, finite,
    and >= 0 where the run keeps them so (``projected``); one line naming the checkpoint otherwise.
    """  # noqa: D205
    if not isinstance(W, torch.Tensor) or not isinstance(H, torch.Tensor):
        raise NMFInputError(f"{name} holds no factors W and H: it is not a checkpoint of an nmf-train run.")
    batch = () if restarts == 1 else (restarts,)
    if W.dim() != len(batch) + 2 or W.shape[:-2] != batch or W.shape[-1] != rank or H.shape[:-1] != (*batch, rank):
        raise NMFInputError(
            f"{name} holds W of shape {tuple(W.shape)} and H of shape {tuple(H.shape)} but this run has "
            f"model.rank={rank} and model.restarts={restarts}; resume with the data, model.rank and model.restarts "
            "it was trained with."
        )
    for label, A in (("W", W), ("H", H)):
        if not bool(torch.isfinite(A).all()):
            raise NMFInputError(
                f"{name} holds {label} with NaN or infinite entries: it is damaged; resume from another."
            )
        if projected and bool((A < 0).any()):
            raise NMFInputError(
                f"{name} holds {label} with negative entries, which this run keeps >= 0: it is damaged, or of "
                "another run; resume from its own checkpoint."
            )


def has_zeros(X: np.ndarray | sp.spmatrix, unstored_missing: bool = False) -> bool:
    """Whether an observed entry of X is 0.

    NaN is missing in a dense X; a sparse X's unstored entries are zeros unless ``unstored_missing`` (ratings).
    """
    if sp.issparse(X):
        unstored = not unstored_missing and X.nnz < X.shape[0] * X.shape[1]
        return unstored or bool((X.data == 0).any())
    return bool((np.asarray(X) == 0).any())


def check_values(X: np.ndarray | sp.spmatrix, name: str = "X", first_row: int = 0) -> tuple[int, bool]:
    """The checks one block of rows can make alone; returns (missing entries, any positive entry).

    ``first_row``: the block's first row in the whole X, for the positions the errors name.
    """
    sparse = sp.issparse(X)
    if X.ndim != 2:
        raise NMFInputError(
            f"{name} must be a 2-D matrix, got {X.ndim}-D with shape {X.shape}; reshape it to (rows, columns) first."
        )
    if sparse:
        check_sparse(X, name)
    values = X.data if sparse else np.asarray(X)
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
        raise NMFInputError(f"{name} must hold real numbers, got dtype {values.dtype}.")
    values = values.astype(np.float64, copy=False)
    nan = np.isnan(values)
    if sparse and nan.any():
        raise NMFInputError(
            f"{name} is sparse and holds {int(nan.sum())} NaN entries; missing entries are only "
            "supported in a dense matrix (store X dense with NaN where a value is missing)."
        )
    n_inf = int(np.isinf(values).sum())
    if n_inf:
        raise NMFInputError(
            f"{name} has {n_inf} infinite entries; NMF needs finite values: replace them "
            "(or mark them missing with NaN)."
        )
    observed = values[~nan]
    n_neg = int((observed < 0).sum())
    if n_neg:
        where = _first_negative(X, first_row)
        raise NMFInputError(
            f"{name} has {n_neg} negative entries (min {observed.min():.4g}, the first at {where}); "
            f"NMF needs {name} >= 0: clip or shift the data first."
        )
    return int(nan.sum()), bool((observed > 0).any())


def _first_negative(X: np.ndarray | sp.spmatrix, first_row: int = 0) -> str:
    """Where X's first negative entry is, as "row i, column j" counted from 0."""
    if sp.issparse(X):
        coo = sp.coo_matrix(X)
        k = int(np.argmax(coo.data < 0))
        i, j = coo.row[k], coo.col[k]
    else:
        i, j = np.argwhere(np.asarray(X) < 0)[0]
    return f"row {first_row + int(i)}, column {int(j)}"


def check_totals(any_observed: bool, any_positive: bool, size: int, name: str = "X") -> None:
    """The checks that need all of X: something observed, something positive."""
    if not any_observed:
        raise NMFInputError(f"{name} has no observed entries: all {size} are missing (NaN).")
    if not any_positive:
        raise NMFInputError(
            f"{name} has no positive entry (all observed entries are 0); there is nothing to factorize."
        )


def check_rank(rank: int, shape: tuple[int, int] | None = None) -> None:
    """Reject rank < 1; warn when the rank exceeds min(n, m), which is legal but redundant."""
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise NMFInputError(f"model.rank must be an integer >= 1, got {rank!r}.")
    if rank < 1:
        raise NMFInputError(f"model.rank must be >= 1, got {rank}; set model.rank=1 or more.")
    if shape is not None and rank > min(shape):
        warnings.warn(
            f"model.rank={rank} exceeds min(n, m) = {min(shape)} for X of shape "
            f"{shape[0]}x{shape[1]}; the factorization is over-complete (allowed, as in the "
            "masked notebook), and a lower rank fits as well.",
            NMFWarning,
            stacklevel=2,
        )


def available_memory() -> int | None:
    """Bytes of host memory free for new allocations (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def require_memory(need: int, what: str, fix: str | Callable[[int], str], device: torch.device | None = None) -> None:
    """Refuse work that needs more memory than is free, before anything is allocated.

    Host memory, or a CUDA ``device``'s. The message reads ``<what> but <free> GiB of
    memory is free; <fix>``, where ``what`` says ``{need}`` for the GiB needed and ``fix``
    may be worked out from the free bytes.
    """
    cuda = device is not None and torch.device(device).type == "cuda"
    free = torch.cuda.mem_get_info(device)[0] if cuda else available_memory()
    if free is None or need <= free:
        return
    advice = fix(free) if callable(fix) else fix
    where = f" on {device}" if cuda else ""
    raise NMFInputError(
        f"{what.format(need=f'{need / 2**30:.3g}')} but {free / 2**30:.3g} GiB of memory{where} is free; {advice}"
    )


def check_factor_memory(
    shape: tuple[int, int],
    rank: int,
    restarts: int,
    itemsize: int,
    names: tuple[str, str] = ("model.rank", "model.restarts"),
) -> None:
    """Refuse a rank whose W and H alone cannot fit in memory, before they are allocated.

    ``names`` spell the rank and the restarts as the user's front end does.
    """
    n, m = shape
    require_memory(
        restarts * (n + m) * rank * itemsize,
        f"{names[0]}={rank} needs {{need}} GiB for W and H alone ({restarts} x ({n} + {m}) x {rank} values)",
        f"lower {names[0]} (X is {n} x {m}, so rank {min(n, m)} already fits it exactly) or {names[1]}.",
    )


#: root-mean-square values of X a precision trains on: squares and products stay normal numbers
SAFE_SCALE = {torch.float16: (1e-2, 1e2), torch.float64: (1e-120, 1e120)}
FLOAT32_SCALE = (1e-15, 1e15)  # float32 and bfloat16 share an exponent range


def check_scale(x_sq: float, n_obs: int, dtype: torch.dtype) -> None:
    """Refuse X whose values are too tiny or huge for the training precision, before training on noise."""
    rms = math.sqrt(x_sq / max(n_obs, 1))
    low, high = SAFE_SCALE.get(dtype, FLOAT32_SCALE)
    if low <= rms <= high:
        return
    name = str(dtype).removeprefix("torch.")
    small = rms < low
    factor = f"{1 / rms:.3g}" if 0 < rms < math.inf else ("a large number" if small else "a small number")
    raise NMFInputError(
        f"X's values are at scale {rms:.3g} (root mean square), too {'small' if small else 'large'} to train "
        f"in {name} (squares and products would {'underflow' if small else 'overflow'}); multiply X by "
        f"{factor} first (the factors scale back by its square root), or use trainer.precision=64-true."
    )


#: the factors' dtype of each training precision Lightning and the estimator read ("-mixed": float32
#: factors under autocast; the float16 ones are refused with their reason, see check_precision)
PRECISIONS = {
    "64": torch.float64,
    "64-true": torch.float64,
    "32": torch.float32,
    "32-true": torch.float32,
    "bf16-mixed": torch.float32,
    "bf16": torch.bfloat16,
    "bf16-true": torch.bfloat16,
    "16-mixed": torch.float32,
    "16": torch.float16,
    "16-true": torch.float16,
}
PRECISION_NAMES = frozenset(PRECISIONS)


def check_precision(
    precision: str | int | None,
    name: str = "trainer.precision",
    fix: str = "bf16-mixed or bf16-true (float32's range in 16 bits), or 32-true",
    known: frozenset[str] | None = PRECISION_NAMES,
) -> None:
    """Refuse a precision not in ``known``, and float16 (``16-true``, ``16-mixed``): NMF's sums outgrow its range.

    float16's largest value is 65504; W^T X adds n products and ||X||^2 n m squares, so
    digits (1797 x 64) already overflows and the run would fail at its first update.
    bfloat16 has float32's range in the same 16 bits.
    """
    if precision is None:
        return
    if known is not None and str(precision) not in known:
        shown = ", ".join(sorted(p for p in known if not p.startswith("16")))
        raise NMFInputError(f"{name}={precision} is not one of {shown}.")
    if str(precision).startswith("16"):
        raise NMFInputError(
            f"{name}={precision} computes in float16, whose largest value (65504) the sums over X's "
            f"rows (W^T X, ||X||^2) exceed; use {fix}."
        )


def _devices_ok(devices: object) -> bool:
    """Whether ``trainer.devices`` is a value Lightning reads: auto, N >= 1 or -1, "0,1", or a list of indices."""
    if devices is None:
        return True
    if isinstance(devices, bool):
        return False
    if isinstance(devices, int):
        return devices >= 1 or devices == -1
    if isinstance(devices, str):
        text = devices.strip()
        return text == "auto" or text == "-1" or all(d.strip().isdigit() for d in text.split(",") if d.strip())
    try:
        return all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices) and len(devices) > 0
    except TypeError:
        return False


def _several_devices(devices: object, gpus: bool = True) -> bool:
    """Whether ``trainer.devices`` asks for more than one device: N > 1, a list of several, -1 or "auto" (all).

    -1 and "auto" mean every GPU when the accelerator may be one (``gpus``) and more than
    one is visible; on a CPU Lightning reads them as one process.
    """
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, bool) or devices is None:
        return False
    if isinstance(devices, int):
        return devices > 1 or devices == -1 and gpus and torch.cuda.device_count() > 1
    if isinstance(devices, str):  # "auto", or "0,1" as a list of GPU indices
        if devices.strip() == "auto":
            return gpus and torch.cuda.device_count() > 1
        return len([d for d in devices.split(",") if d.strip()]) > 1
    try:
        return len(devices) > 1  # a list or ListConfig of device indices
    except TypeError:
        return False


def check_accelerator(accelerator: str | None, devices: int | str | list | None = None, sharded: bool = False) -> None:
    """Fail at once when a GPU is requested but CUDA cannot see one, or several devices without ``trainer=ddp``.

    ``sharded``: the trainer runs the row-sharded DDP strategy, which takes several devices.
    """
    if not _devices_ok(devices):
        raise NMFInputError(
            f"trainer.devices must be auto, an integer >= 1 (-1: every GPU) or a list of GPU indices such as [0,1], "
            f"got {devices!r}."
        )
    acc = str(accelerator or "auto").lower()
    several = _several_devices(devices, gpus=acc in ("auto", "gpu", "cuda"))
    if several and not sharded:
        raise NMFInputError(
            f"trainer.devices={devices}: one run on several devices shards X's rows over them with "
            f"trainer=ddp (trainer=ddp trainer.devices={devices}); a multirun sweep with trainer.devices=1 "
            "runs separate jobs instead."
        )
    if acc not in ("gpu", "cuda"):
        return
    if not torch.cuda.is_available():
        raise NMFInputError(
            f"trainer.accelerator={accelerator} but no CUDA device is visible "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
            "use trainer.accelerator=cpu or trainer.accelerator=auto."
        )
    if isinstance(devices, int) and devices > torch.cuda.device_count():
        raise NMFInputError(
            f"trainer.devices={devices} but only {torch.cuda.device_count()} CUDA device(s) are "
            "visible; lower trainer.devices."
        )
