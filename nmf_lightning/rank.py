"""Automatic rank: the rank whose factors best predict entries they never saw (speckled cross-validation).

A larger rank always fits the training entries better; past the data's own rank it
fits their noise, and predicts held-out entries worse. So, as RcppML's ``k = "auto"``
does, a random share of the observed entries is hidden (:func:`~nmf_lightning.data.holdout.split_holdout`,
the machinery of ``data.holdout``), candidate ranks are fit on the rest (a coarse grid
over the range, then halving the gaps beside the best), and the rank of lowest held-out
error is chosen (``rule="1se"``: the smallest rank within one standard error of it).
The caller then refits at that rank on all of its entries. ``nmf-train model.rank=auto``
and ``NMF(n_components="auto")`` both run :func:`search`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from nmf_lightning.data.holdout import Holdout, split_holdout
from nmf_lightning.data.sources import Matrix
from nmf_lightning.engine.problem import Problem, Source, Spec
from nmf_lightning.objective import relative_error
from nmf_lightning.params import Words
from nmf_lightning.validation import NMFInputError

log = logging.getLogger(__name__)

#: candidate ranks on the first, coarse grid over the range
COARSE_POINTS = 6
#: a candidate's fit stops once its objective changes by less than this (relative) over the spec's window
CANDIDATE_TOL = 1e-4
RULES = ("min", "1se")


@dataclass(frozen=True)
class RankSearch:
    """Where to look for the rank and how to choose it: ``low``..``high``, ``holdout`` of the entries hidden."""

    low: int = 2
    high: int = 20
    holdout: float = 0.1
    rule: str = "min"
    seed: int = 0

    def check(self, shape: tuple[int, int], words: Words) -> RankSearch:
        """The range within what X allows (at most min(n, m)); raises on an empty one."""
        high = min(self.high, *shape)
        if self.low > high:
            raise NMFInputError(
                f"{words.name('rank_min')}={self.low} is above {words.name('rank_max')}={self.high} or X's "
                f"min(n, m) = {min(shape)}: the range of ranks to search is empty."
            )
        return dataclasses.replace(self, high=high)


@dataclass
class RankRow:
    """One candidate rank: its held-out RMSE (and the standard error of its mean square), training fit, time."""

    rank: int
    heldout_rmse: float
    heldout_se: float
    relative_error: float
    seconds: float
    stability: float | None = None

    @property
    def mse(self) -> float:
        """The held-out mean squared error."""
        return self.heldout_rmse**2

    def as_dict(self) -> dict[str, float]:
        """The row as metrics.json writes it."""
        row = dataclasses.asdict(self)
        return row if self.stability is not None else {k: v for k, v in row.items() if k != "stability"}


@dataclass
class RankResult:
    """The rank chosen, and every candidate's row in rank order."""

    rank: int
    rows: list[RankRow]

    def table(self) -> str:
        """The rows as aligned text, the chosen rank marked."""
        lines = ["rank  held-out RMSE  (SE of MSE)  train rel. error  stability  seconds"]
        for r in self.rows:
            stability = "" if r.stability is None else f"{r.stability:.3f}"
            mark = "  <- chosen" if r.rank == self.rank else ""
            lines.append(
                f"{r.rank:>4}  {r.heldout_rmse:>13.6g}  {r.heldout_se:>11.3g}  {r.relative_error:>15.6g}  "
                f"{stability:>9}  {r.seconds:>7.2f}{mark}"
            )
        return "\n".join(lines)


def coarse(low: int, high: int, points: int = COARSE_POINTS) -> list[int]:
    """Up to ``points`` ranks spread evenly over ``low``..``high``, both ends included."""
    return sorted({int(round(r)) for r in np.linspace(low, high, min(points, high - low + 1))})


def refine(tried: dict[int, RankRow], low: int, high: int) -> list[int]:
    """The midpoints of the gaps beside the best rank tried so far ([] once its neighbours are tried)."""
    best = min(tried.values(), key=lambda r: r.mse).rank
    below = max((r for r in tried if r < best), default=None)
    above = min((r for r in tried if r > best), default=None)
    picks = []
    if below is not None and best - below > 1:
        picks.append((below + best) // 2)
    if above is not None and above - best > 1:
        picks.append((best + above + 1) // 2)
    return [r for r in picks if low <= r <= high and r not in tried]


def choose(rows: list[RankRow], rule: str) -> int:
    """The rank of lowest held-out error, or (``1se``) the smallest within one standard error of it."""
    best = min(rows, key=lambda r: r.mse)
    if rule == "min":
        return best.rank
    return min(r.rank for r in rows if r.mse <= best.mse + best.heldout_se)


def heldout_error(W: Tensor, H: Tensor, held: Holdout) -> tuple[float, float]:
    """RMSE of W H at the held-out entries, and the standard error of their mean square."""
    rows = torch.as_tensor(held.rows, device=W.device)
    cols = torch.as_tensor(held.cols, device=W.device)
    predicted = (W[rows].double() * H[:, cols].mT.double()).sum(1)
    sq = (predicted - torch.as_tensor(held.values, device=W.device)).pow(2)
    mse = float(sq.mean())
    se = float(sq.std() / math.sqrt(len(sq))) if len(sq) > 1 else 0.0
    return math.sqrt(mse), se


def fit_candidate(problem: Problem, steps: int) -> tuple[Tensor, Tensor, Tensor]:
    """Train the problem from its initial factors; the best restart's W, H and every restart's H."""
    W, H = problem.initial_factors()
    if not problem.info.closed_form:
        W.requires_grad_(True)
        H.requires_grad_(True)
    problem.fit(W, H, problem.update(problem.stepper(W, H)), steps)
    W, H = problem.spec.reported(W.detach(), H.detach())
    best = problem.best(problem.loss(W, H))
    return (W, H, H[None]) if best is None else (W[best], H[best], H)


def search(
    matrix: Matrix,
    spec: Spec,
    steps: int,
    options: RankSearch,
    words: Words,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    batch_rows: int | None = None,
) -> RankResult:
    """Choose the rank of ``matrix`` by held-out error (see the module); ``spec`` is the fit's at every rank.

    The training entries are read as the fit reads X held in host memory: whole on
    ``device``, or in blocks of ``batch_rows`` rows. Each candidate runs ``steps`` updates
    at most, stopping once its objective settles (``spec.tol``, else :data:`CANDIDATE_TOL`).
    """
    options = options.check(matrix.shape, words)
    train, held = split_holdout(matrix, options.holdout, options.seed)
    observed, missing = spec.info.observed, train.unstored_missing
    X = Source.host(train.X, dtype, device, batch_rows, observed=observed, unstored_missing=missing)
    candidate = dataclasses.replace(spec, tol=spec.tol or CANDIDATE_TOL)
    tried: dict[int, RankRow] = {}
    todo = coarse(options.low, options.high)
    log.info("rank=auto: fitting ranks %s with %g of the entries held out", todo, options.holdout)
    while todo:
        for rank in todo:
            tried[rank] = _row(dataclasses.replace(candidate, rank=rank), X, held, steps, dtype, device, words)
            r = tried[rank]
            log.info("rank %d: held-out RMSE %.6g, %.1f s", rank, r.heldout_rmse, r.seconds)
        todo = refine(tried, options.low, options.high)
    rows = [tried[r] for r in sorted(tried)]
    result = RankResult(choose(rows, options.rule), rows)
    log.info("rank=auto chose %d (rule %s):\n%s", result.rank, options.rule, result.table())
    return result


def _row(
    spec: Spec, X: Source, held: Holdout, steps: int, dtype: torch.dtype, device: torch.device | str, words: Words
) -> RankRow:
    start = time.perf_counter()
    problem = Problem(spec, X, dtype, device)
    problem.check(words)
    W, H, all_H = fit_candidate(problem, steps)
    rmse, se = heldout_error(W, H, held)
    error = float(relative_error(problem.sq_error(W, H).double(), X.x_sq))
    stability = problem.consensus(all_H)[2].stability if spec.consensus else None
    return RankRow(spec.rank, rmse, se, error, time.perf_counter() - start, stability)
