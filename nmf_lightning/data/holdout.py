"""Hold out a random set of observed entries of X for validation (rank selection by CV).

The held-out entries become missing in the training matrix, so every training term and
metric skips them, and come back as (row, col, value) triplets that the module scores
``val/*`` on.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from nmf_lightning.console import NMFWarning
from nmf_lightning.data.sources import Matrix
from nmf_lightning.validation import NMFInputError

log = logging.getLogger(__name__)

#: a sparse X whose zeros are observed is densified for hold-out only up to this many entries
MAX_DENSE_ENTRIES = 2**28


@dataclass
class Holdout:
    """The held-out entries: X[rows[i], cols[i]] = values[i]."""

    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.values)


def check_resumed(saved: dict[str, Any], now: dict[str, Any]) -> None:
    """A resumed run must hold out what its checkpoint's run did (``{"fraction", "seed"}``), or it trains on them."""
    if float(saved["fraction"]) != float(now["fraction"]) or (now["fraction"] and saved["seed"] != now["seed"]):
        raise NMFInputError(
            f"the checkpoint was trained with data.holdout={saved['fraction']} (holdout_seed={saved['seed']}) "
            f"but this run has data.holdout={now['fraction']} (holdout_seed={now['seed']}); resuming would "
            "train on entries held out before. Resume with the same data.holdout and data.holdout_seed."
        )


def check_holdout(fraction: Any, allow_zero: bool = True) -> None:
    """``data.holdout`` must be a fraction in (0, 1) (or 0, none held out, where ``allow_zero``)."""
    number = isinstance(fraction, numbers.Real) and not isinstance(fraction, bool) and math.isfinite(fraction)
    if not number or not (0 < fraction < 1 or allow_zero and fraction == 0):
        raise NMFInputError(f"data.holdout must be a fraction in (0, 1), got {fraction!r}; e.g. data.holdout=0.1.")


def split_holdout(matrix: Matrix, fraction: float, seed: int = 0) -> tuple[Matrix, Holdout]:
    """Hide ``fraction`` of the observed entries of ``matrix.X``, drawn with ``seed``.

    Returns the training matrix (held-out entries missing: NaN when dense, unstored when
    the unstored entries of a sparse X already mean missing) and the held-out triplets.
    A sparse X whose zeros are observed values (TF-IDF) is made dense with NaN, since a
    held-out zero cannot be marked missing in a sparse matrix.
    """
    check_holdout(fraction, allow_zero=False)
    rng = np.random.default_rng(seed)
    X = matrix.X
    if sp.issparse(X) and matrix.unstored_missing:
        X = sp.coo_matrix(X)
        rows, cols, vals = X.row, X.col, X.data
        val = _draw(rng, len(vals), fraction)
        keep = np.ones(len(vals), dtype=bool)
        keep[val] = False
        train = sp.csr_matrix((vals[keep], (rows[keep], cols[keep])), shape=X.shape)
        n, m = X.shape
        _warn_unseen(
            np.bincount(rows, minlength=n) > 0,
            np.bincount(rows[keep], minlength=n) > 0,
            np.bincount(cols, minlength=m) > 0,
            np.bincount(cols[keep], minlength=m) > 0,
            fraction,
        )
        return dataclasses.replace(matrix, X=train), Holdout(rows[val], cols[val], vals[val].astype(np.float64))
    if sp.issparse(X):
        n, m = X.shape
        if n * m > MAX_DENSE_ENTRIES:
            raise NMFInputError(
                f"data.holdout on a sparse X of {n}x{m} would need it dense ({n * m:,} entries): held-out "
                "zeros cannot be marked missing in a sparse matrix. Hold out fewer rows (fit on a subset) "
                "or save X as ratings with data.unstored=missing."
            )
        log.info("data.holdout: X is sparse with observed zeros; training on it dense, held-out entries missing")
        X = X.toarray()
    X = np.array(X, dtype=np.float64)
    before = ~np.isnan(X)
    observed = np.flatnonzero(before)
    val = observed[_draw(rng, len(observed), fraction)]
    rows, cols = np.unravel_index(val, X.shape)
    values = X.flat[val].copy()
    X.flat[val] = np.nan
    after = ~np.isnan(X)
    _warn_unseen(before.any(axis=1), after.any(axis=1), before.any(axis=0), after.any(axis=0), fraction)
    return dataclasses.replace(matrix, X=X), Holdout(rows, cols, values)


def _warn_unseen(
    row_had: np.ndarray, row_has: np.ndarray, col_had: np.ndarray, col_has: np.ndarray, fraction: float
) -> None:
    """Rows or columns the hold-out emptied have factors fixed by nothing but their init."""
    empty_rows = int((row_had & ~row_has).sum())
    empty_cols = int((col_had & ~col_has).sum())
    if empty_rows or empty_cols:
        warnings.warn(
            f"data.holdout={fraction} leaves {empty_rows} rows and {empty_cols} columns of X with no "
            "training entry; their held-out predictions only reflect the initialisation. Lower data.holdout.",
            NMFWarning,
            stacklevel=3,
        )


def _draw(rng: np.random.Generator, n_observed: int, fraction: float) -> np.ndarray:
    """Indices of round(fraction * n_observed) of the observed entries, leaving some to train on."""
    n_val = int(round(fraction * n_observed))
    if n_val < 1:
        raise NMFInputError(
            f"data.holdout={fraction} holds out no entry of the {n_observed} observed ones; raise data.holdout."
        )
    if n_val >= n_observed:
        raise NMFInputError(
            f"data.holdout={fraction} would hold out all {n_observed} observed entries; lower data.holdout."
        )
    return np.sort(rng.choice(n_observed, size=n_val, replace=False))
