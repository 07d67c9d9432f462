"""The public fit loop: updates over row blocks until ``steps`` are done or the objective settles."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from nmf_lightning.engine.target import Target
from nmf_lightning.engine.updates import PassResult, SumRanks, Update

#: X as the engine reads it: one block in memory, or a callable giving one pass of blocks
Blocks = Target | Callable[[], Iterable[Target]]


@dataclass
class FitResult:
    """What :func:`fit` did.

    The updates run, per-update losses (gradient updates, on the device), whether ``tol``
    stopped it, the last pass's measurement, and whether ``on_update`` asked it to stop.
    """

    steps: int
    losses: Tensor | None
    converged: bool
    last: PassResult
    stopped: bool = False


@dataclass
class Convergence:
    """The ``tol`` test's memory across calls: the objective at the last check."""

    previous: Tensor | None = None

    def settled(self, current: Tensor, tol: float) -> bool:
        """Record ``current`` (the objective now); whether it moved by at most ``tol`` (relative) since the last."""
        previous, self.previous = self.previous, current
        return previous is not None and bool((previous - current).abs() <= tol * previous.abs())  # one sync


def passes(blocks: Blocks) -> Iterable[Target]:
    """One pass over the row blocks of X."""
    return (blocks,) if isinstance(blocks, Target) else blocks()


def update(blocks: Blocks, W: Tensor, H: Tensor, step: Update) -> PassResult:
    """One alternating update of W and H (in place) over every row block of X."""
    step.begin(W, H)
    for t in passes(blocks):
        step.block(t, W, H)
        if not isinstance(blocks, Target):  # a block held between passes keeps no scratch space
            t.release()
    return step.end(W, H)


@torch.no_grad()
def sq_error(
    blocks: Blocks, W: Tensor, H: Tensor, gram_form: bool = False, sum_ranks: SumRanks | None = None
) -> Tensor:
    """``||M * (X - W H)||^2`` over every row block (and, with ``sum_ranks``, every rank's rows), (...,)."""
    total = None
    for t in passes(blocks):
        sq = t.sq_error(W[..., t.start : t.stop, :], H, gram_form)
        total = sq if total is None else total + sq
    return total if sum_ranks is None else sum_ranks({"sq": total})["sq"]


@torch.no_grad()
def divergence(blocks: Blocks, W: Tensor, H: Tensor, beta: float, sum_ranks: SumRanks | None = None) -> Tensor:
    """``D_beta(M * X | M * W H)`` over every row block (and, with ``sum_ranks``, every rank's rows), (...,)."""
    total = None
    for t in passes(blocks):
        d = t.divergence(W[..., t.start : t.stop, :], H, beta)
        total = d if total is None else total + d
    return total if sum_ranks is None else sum_ranks({"d": total})["d"]


def data_term(
    blocks: Blocks,
    W: Tensor,
    H: Tensor,
    beta: float | None = None,
    gram_form: bool = False,
    sum_ranks: SumRanks | None = None,
) -> Tensor:
    """What the objective's reconstruction term reads: the squared error, or the beta-divergence for a beta."""
    if beta is None:
        return sq_error(blocks, W, H, gram_form, sum_ranks)
    return divergence(blocks, W, H, beta, sum_ranks)


def fit(
    blocks: Blocks,
    W: Tensor,
    H: Tensor,
    step: Update,
    steps: int,
    *,
    objective: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
    tol: float = 0.0,
    tol_window: int = 10,
    done: int = 0,
    convergence: Convergence | None = None,
    on_update: Callable[[int, PassResult], bool | None] | None = None,
    sum_ranks: SumRanks | None = None,
) -> FitResult:
    """Run up to ``steps`` updates of W and H (in place) over the row blocks of X.

    With ``tol`` > 0, every ``tol_window`` updates (counted from the start of training,
    ``done`` updates ago, so where a run stops does not depend on how it is called) the
    ``objective(data_term, W, H)`` is computed (its ``beta``, when it has one, picks the
    data term: see :func:`data_term`); a relative change below ``tol`` since the last
    check stops the fit. Per-update losses stay on the device: no host sync but the test.
    ``on_update(i, result)`` is called after the i-th update (from 1) of this call, while
    its lazily formed error can still be read (curves on a grid of updates); a true return
    stops the fit there (a signal to stop). ``sum_ranks`` completes the measured objective
    over the ranks holding X's other rows (the updates sum their statistics themselves).
    """
    convergence = convergence or Convergence()
    losses: list[Tensor] = []
    last = PassResult()
    for i in range(steps):
        last = update(blocks, W, H, step)
        if last.loss is not None:
            losses.append(last.loss)
        if on_update is not None and on_update(i + 1, last):
            return FitResult(i + 1, _stack(losses), False, last, stopped=True)
        if not tol or (done + i + 1) % tol_window:
            continue
        with torch.no_grad():
            measured = data_term(blocks, W, H, getattr(objective, "beta", None), sum_ranks=sum_ranks)
            current = objective(measured, W, H).detach().min()
        if convergence.settled(current, tol):
            return FitResult(i + 1, _stack(losses), True, last)
    return FitResult(steps, _stack(losses), False, last)


def _stack(losses: list[Tensor]) -> Tensor | None:
    return torch.stack(losses) if losses else None
