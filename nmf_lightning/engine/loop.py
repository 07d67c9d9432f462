"""The fit loop: updates over row blocks until ``steps`` are done or the objective settles."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from nmf_lightning.engine.blocks import Block
from nmf_lightning.engine.updates import PassResult, SumRanks, Update

#: X as the engine reads it: one block in memory, or a callable giving one pass of blocks
Blocks = Block | Callable[[], Iterable[Block]]


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
    """The ``tol`` test, the same wherever a fit runs (in memory, streamed, in the estimator).

    Every ``window`` updates, counted from the start of training so that where a run stops
    does not depend on how its updates were grouped, the objective is measured; a relative
    change of at most ``tol`` since the last measurement ends the fit, once ``ready`` (when
    given) also says so: a penalty schedule's constraint must hold too. ``tol`` 0 is off.
    """

    tol: float = 0.0
    window: int = 10
    previous: Tensor | None = None
    ready: Callable[[], bool] | None = None

    def due(self, done: int) -> bool:
        """Whether update ``done`` (from the start of training) is measured."""
        return bool(self.tol) and done % self.window == 0

    def settled(self, current: Tensor) -> bool:
        """Record ``current`` (the objective now); whether it moved by at most ``tol`` (relative) since the last."""
        previous, self.previous = self.previous, current
        return previous is not None and bool((previous - current).abs() <= self.tol * previous.abs())  # one sync

    def check(self, done: int, measure: Callable[[], Tensor]) -> bool:
        """At a due update, measure the objective (its best restart) and say whether the fit has settled."""
        if not self.due(done):
            return False
        with torch.no_grad():
            settled = self.settled(measure().detach().min())
        return settled and (self.ready is None or self.ready())


def passes(blocks: Blocks) -> Iterable[Block]:
    """One pass over the row blocks of X."""
    return (blocks,) if isinstance(blocks, Block) else blocks()


def update(blocks: Blocks, W: Tensor, H: Tensor, step: Update) -> PassResult:
    """One alternating update of W and H (in place) over every row block of X."""
    step.begin(W, H)
    for t in passes(blocks):
        step.block(t, W, H)
        if not isinstance(blocks, Block):  # a block held between passes keeps no scratch space
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


def fit(
    blocks: Blocks,
    W: Tensor,
    H: Tensor,
    step: Update,
    steps: int,
    *,
    measure: Callable[[PassResult], Tensor] | None = None,
    convergence: Convergence | None = None,
    done: int = 0,
    on_update: Callable[[int, PassResult], bool | None] | None = None,
) -> FitResult:
    """Run up to ``steps`` updates of W and H (in place) over the row blocks of X.

    ``convergence`` (with ``measure``, the objective after an update, given its result) is the
    ``tol`` test, run at its due updates counted from ``done``, the updates before this
    call. Per-update losses stay on the device: no host sync but the test.
    ``on_update(i, result)`` is called after the i-th update (from 1) of this call, while
    its lazily formed error can still be read (curves on a grid of updates); a true return
    stops the fit there (a signal to stop).
    """
    losses: list[Tensor] = []
    last = PassResult()
    for i in range(steps):
        last = update(blocks, W, H, step)
        if last.loss is not None:
            losses.append(last.loss)
        if on_update is not None and on_update(i + 1, last):
            return FitResult(i + 1, _stack(losses), False, last, stopped=True)
        if convergence is not None and measure is not None and convergence.check(done + i + 1, partial(measure, last)):
            return FitResult(i + 1, _stack(losses), True, last)
    return FitResult(steps, _stack(losses), False, last)


def _stack(losses: list[Tensor]) -> Tensor | None:
    return torch.stack(losses) if losses else None
