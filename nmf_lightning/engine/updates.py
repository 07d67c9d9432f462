"""One alternating update of W and H as a pass over row blocks of X.

W's rows are local and H is global: a block of X's rows is all its rows of W need, and
H needs only sums over the blocks (``W^T W``, ``W^T X``, or its gradient). So an update
is ``begin``, ``block`` for every row block, ``end``: the same code whether X is one
block in device memory or many streamed from disk. With one block it is the classic
alternating update (W, then H from the new W, as scikit-learn's ``cd`` and ``mu`` do).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import torch
from torch import Tensor

from nmf_lightning.engine.biases import Biases
from nmf_lightning.engine.blocks import Block
from nmf_lightning.linalg import gram, gram_sq, row_major
from nmf_lightning.objective import Objective, negative_mass

#: sums named tensors over the processes that hold the other rows of X (see nmf_lightning.distributed)
SumRanks = Callable[[dict[str, Tensor]], dict[str, Tensor]]


class PassResult:
    """What one update measured on the way.

    ``sq`` is the squared error of the factors before the update (``after`` False) or after
    it (``after`` True); ``running`` marks online mode's estimate, the sum of each block's
    error as it was fit (scikit-learn's ``MiniBatchNMF`` reports the same). ``loss`` is the
    training loss before the update, when a gradient step made one, and ``terms`` its
    unweighted terms when they were asked for (``GradientUpdate.record_terms``); ``divergence``
    the beta-divergence the step was taken on (beta losses). An error that takes
    work to form from the pass's sums is formed when first read, from the factors as they
    are then: read it before the next update.
    """

    def __init__(
        self,
        sq: Tensor | Callable[[], Tensor] | None = None,
        after: bool = False,
        running: bool = False,
        loss: Tensor | None = None,
        terms: dict[str, Tensor] | None = None,
        divergence: Tensor | None = None,
    ):
        self._sq, self.after, self.running, self.loss, self.terms = sq, after, running, loss, terms
        self.divergence = divergence

    @property
    def sq(self) -> Tensor | None:
        """The squared error (``...`` with restarts), or None when the pass could not tell."""
        if callable(self._sq):
            self._sq = self._sq()
        return self._sq


class Update(Protocol):
    """One update over row blocks: ``begin``, ``block`` for each block of rows, ``end``."""

    def begin(self, W: Tensor, H: Tensor) -> None:
        """Start a pass at the current factors."""

    def block(self, t: Block, W: Tensor, H: Tensor) -> None:
        """Take one block of rows (W's rows for it are updated, or their part is recorded)."""

    def end(self, W: Tensor, H: Tensor) -> PassResult:
        """Finish the pass: update H (and W where it waits for the whole pass)."""


class SolverUpdate:
    """A closed-form rule (HALS, MU, ALS, ...) over row blocks.

    Each block's rows of W are updated at once (the rule's ``update_w`` on that block)
    and the block's statistics for H, taken with the new rows, are summed; ``end``
    updates H from the sums. A block holding every row updates H directly when it is
    masked (for HALS faster than from per-column Grams; identical up to rounding) or
    when the rule has no sums (Kaczmarz samples rows of X). ``update_H=False`` keeps H fixed (transform).

    ``online`` updates H after every block from running statistics in which earlier
    blocks fade by ``forget`` per pass over X (Mairal et al. 2010, scikit-learn's
    ``MiniBatchNMF``): good factors after the first passes over a very large X.

    ``stats`` holds the sums of the pass under way; online, the running sums, which a
    caller may save and set again to continue from a later batch of rows (``partial_fit``).

    The pass reports the squared error of the new factors from the sums (unmasked X);
    with ``measure``, masked blocks add their error before the update instead, so a
    streamed X need not be read again to know it.

    ``sum_ranks`` adds the pass's sums over the processes that hold X's other rows (one
    all-reduce) before H is updated, so every rank takes the same H-update; ``x_sq`` is
    then the whole X's ``||X||^2``, for the error from the sums.

    ``l2`` weights may be tensors, one per row of W (n, 1) and per column of H (1, m)
    (``model.l2_scale=count``); a block's rows take theirs.

    ``biases`` (a biased model; its blocks come as ratings less the biases, from
    :meth:`~nmf_lightning.engine.Problem.blocks`) take their exact steps in the pass: b for
    each block's rows before W's, mu and c once H is updated (:mod:`~nmf_lightning.engine.biases`).
    """

    def __init__(
        self,
        rule: Any,
        l1: tuple[float, float] = (0.0, 0.0),
        l2: tuple[float | Tensor, float | Tensor] = (0.0, 0.0),
        update_H: bool = True,
        online: bool = False,
        forget: float = 0.7,
        measure: bool = False,
        sum_ranks: SumRanks | None = None,
        x_sq: Tensor | None = None,
        biases: Biases | None = None,
    ):
        if sum_ranks is not None and online:
            raise ValueError("online updates take H from each block's sums; they do not run over several ranks")
        if biases is not None and online:
            raise ValueError("the biases' column step reads a whole pass's sums; online updates take H per block")
        self.sum_ranks, self.total_x_sq, self.biases = sum_ranks, x_sq, biases
        self.rule, self.l1, self.l2 = rule, l1, l2
        self.update_H, self.online, self.forget, self.measure = update_H, online, forget, measure
        self._stats: dict[str, Tensor] | None = None
        self._owns_stats = False  # whether online mode may add into the running sums in place
        self._H: Tensor | None = None
        self._x_sq: Tensor | None = None
        self._running: Tensor | None = None  # online: the pass's errors, each block's as it was fit
        self._before: Tensor | None = None  # measure: masked blocks' errors before the update
        self._Hv: Tensor | None = None
        self._HHt: Tensor | None = None
        self._sums_of: tuple[Block, dict[str, Tensor]] | None = None  # H fixed: X held in memory's W-sums

    @property
    def stats(self) -> dict[str, Tensor] | None:
        """The sums of the pass under way; online, the running sums (see the class's docstring)."""
        return self._stats

    @stats.setter
    def stats(self, stats: dict[str, Tensor] | None) -> None:
        self._stats, self._owns_stats = stats, False  # a caller's sums are never written into

    def begin(self, W: Tensor, H: Tensor) -> None:  # noqa: D102
        self._H = None
        if self.update_H:  # H's forms the W-updates of this pass share (H held fixed: of every pass)
            self._Hv = self._HHt = self._sums_of = None
        self._x_sq = None
        self._before = None
        if not self.online:
            self.stats = None

    @torch.no_grad()
    def block(self, t: Block, W: Tensor, H: Tensor) -> None:  # noqa: D102
        rows = slice(t.start, t.stop)
        if self.measure and t.masked and not self.online:  # the error before this update, as it passes
            sq = t.sq_error(W[..., rows, :], H)
            self._before = sq if self._before is None else self._before + sq
        if self.biases is not None:  # b first: its step is exact for the rows of W and H as they are
            t = self.biases.fit_rows(t, W[..., rows, :], H)
        l2_W = self.l2[0][..., rows, :].mT if isinstance(self.l2[0], Tensor) else self.l2[0]  # (1, b): W^T's columns
        w_sums = self._w_sums(t, H)
        if w_sums is None:
            Wb = self.rule.update_w(t, W[..., rows, :], H, self.l1[0], l2_W)
        else:  # the rule's W-update, from sums shared by the pass (and the block's error, online)
            Wb = self.rule.h_from_stats(w_sums, W[..., rows, :].mT, self.l1[0], l2_W).mT
        W[..., rows, :] = Wb
        if not self.update_H:
            return
        bias = {} if self.biases is None else self.biases.col_stats(t, Wb)  # read once H is updated
        direct = t.masked or not self.rule.sums
        if direct and t.shape[0] == W.shape[-2] and not self.online and self.sum_ranks is None:  # all of X at once
            self._H = self.rule.update_h(t, Wb, H, self.l1[1], self.l2[1])  # masked HALS: faster than Grams
            self.stats = bias
            return
        stats = {**self.rule.h_stats(t, Wb, H), **bias}
        if not t.masked and not self.online:
            self._x_sq = t.x_sq if self._x_sq is None else self._x_sq + t.x_sq
        if self.online:  # earlier blocks fade by `forget` over a whole pass of X
            # this block's error as it was fit (new rows of W, H before its update): from the sums, or
            # measured where missing entries leave none to read it from
            if w_sums is not None and "WtW" in stats:  # ||X_b||^2 - 2<X_b H^T, W_b> + <W_b^T W_b, H H^T>
                sq = gram_sq(t.x_sq, w_sums["WtX"], Wb.mT, stats["WtW"], w_sums["WtW"])
            else:
                sq = t.sq_error(Wb, H)
            self._running = sq if self._running is None else self._running + sq
            self._fade(stats, self.forget ** (t.shape[0] / W.shape[-2]))
            H.copy_(self.rule.h_from_stats(self.stats, H, self.l1[1], self.l2[1]))
            return
        self.stats = stats if self.stats is None else {k: self.stats[k] + v for k, v in stats.items()}

    def _w_sums(self, t: Block, H: Tensor) -> dict[str, Tensor] | None:
        """A rule in Gram form on a complete block: the sums its W-update reads, ``(X H^T)^T`` and ``H H^T``.

        H is the same for every block of a pass, so H H^T (and, for sparse blocks, H^T
        laid out by rows) is formed once per pass: on a 101 322-column H each costs
        1-2 ms, once per block before. Online, H changes after every block; its H H^T
        serves the block's error as it was fit too. With H held fixed (``update_H=False``:
        W solved for given components), H H^T serves every pass, and so does X H^T of a
        block held in memory.
        """
        if not (self.rule.gram_form and not t.masked):
            return None
        if self._sums_of is not None and self._sums_of[0] is t:  # H fixed, the same block: the same sums
            return self._sums_of[1]
        if self.online or self._HHt is None:
            self._Hv = row_major(H.mT).mT if t.sparse else H  # (a view of H: the same values)
            self._HHt = gram(H, left=False)
        sums = {"WtX": t.XHt(self._Hv).mT, "WtW": self._HHt}
        if not self.update_H:  # solving W for a fixed H: X held in memory gives the same sums every pass
            self._sums_of = (t, sums)
        return sums

    def _fade(self, stats: dict[str, Tensor], decay: float) -> None:
        """Running sums <- decay * running sums + this block's, in place in sums the update owns.

        The first sums are copied by rows (the sparse W^T X comes transposed, and the
        H-update reads it by rows); later ones are added into them: no k x m temporaries.
        """
        if self.stats is None or not self._owns_stats:
            old = self.stats  # (a caller's, or none yet: the block's own sums are fresh tensors)
            self.stats = {k: row_major(v if old is None else decay * old[k] + v) for k, v in stats.items()}
            self._owns_stats = True
            return
        for k, v in stats.items():
            self.stats[k].mul_(decay).add_(v)

    @torch.no_grad()
    def end(self, W: Tensor, H: Tensor) -> PassResult:  # noqa: D102
        if self._H is not None:
            H.copy_(self._H)
            self._H = None
            if self.biases is not None:
                self.biases.fit_cols(self.stats, H)
            return PassResult()
        if self.sum_ranks is not None and self.update_H and self.stats is not None:
            summed = self.sum_ranks({**self.stats, **({} if self._before is None else {"_before": self._before})})
            self._before = summed.pop("_before", None)
            self.stats = summed
            self._x_sq = self.total_x_sq if self._x_sq is not None else None
        if self.update_H and not self.online and self.stats is not None:
            H.copy_(self.rule.h_from_stats(self.stats, H, self.l1[1], self.l2[1]))
            if self.biases is not None:
                self.biases.fit_cols(self.stats, H)
        if self.online:
            running, self._running = self._running, None
            return PassResult(sq=running, after=True, running=True)
        stats, self.stats = self.stats, None
        if self._before is not None:
            return PassResult(sq=self._before, after=False)
        if self._x_sq is None or stats is None or "WtW" not in stats:
            return PassResult()
        x_sq = self._x_sq
        return PassResult(sq=lambda: _sq_from_stats(x_sq, stats, H), after=True)


def _sq_from_stats(x_sq: Tensor, stats: dict[str, Tensor], H: Tensor) -> Tensor:
    """``||X - W H||^2 = ||X||^2 - 2<W^T X, H> + <W^T W, H H^T>`` from the sums of unmasked rows."""
    dtype = torch.promote_types(H.dtype, torch.float32)  # a bf16 sum would be noise
    H, WtX, WtW = H.to(dtype), stats["WtX"].to(dtype), stats["WtW"].to(dtype)
    return gram_sq(x_sq, WtX, H, WtW, gram(H, left=False))


#: optimizers with a fused step kernel in torch (``fused=True``) for float CPU and CUDA tensors
FUSED = (torch.optim.Adam, torch.optim.AdamW)


def fused_optimizer(factory: Callable, params: list[Tensor]) -> torch.optim.Optimizer:
    """``factory(params)``, with ``fused=True`` for Adam and AdamW unless ``fused`` was set.

    One fused kernel updates both factors: on a small problem the optimizer's per-tensor
    loop is a large share of an update (digits: half the step's time on a CPU).
    """
    target = factory.func if isinstance(factory, partial) else factory
    keywords = factory.keywords if isinstance(factory, partial) else {}
    fusable = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    if target in FUSED and keywords.get("fused") is None and fusable and not keywords.get("foreach"):
        return factory(params, fused=True)
    return factory(params)  # fused=None (a config's null) is torch's own default


class _SqWithGrads(torch.autograd.Function):
    """A squared error whose gradients were computed with it, block by block."""

    @staticmethod
    def forward(ctx, W: Tensor, H: Tensor, sq: Tensor, dW: Tensor, dH: Tensor) -> Tensor:
        ctx.save_for_backward(dW, dH)
        return sq.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        dW, dH = ctx.saved_tensors
        g = g[..., None, None]
        return g * dW, g * dH, None, None, None


class GramForm:
    """Whether a gradient update computes X's error without the residual (the Gram form), update by update.

    A sparse X always takes the Gram form and X with missing entries never does; a dense X
    takes it (two X-products, no rows x columns temporary) unless ``loss_form`` says
    otherwise. The Gram form's gradients are as exact as the residual's, but its *value*
    cancels as the relative error nears sqrt(eps); where the loss's gradient reads that
    value (``fro`` and ``rmse`` scale it by the error), the form leaves for the residual
    once the error falls below ``SAFETY`` sqrt(eps). That is checked every ``CHECK``
    updates counted from the start of training (one host sync each), so a fit's arithmetic
    follows from its settings and update number alone: the same in every front end, and
    after a resume (``state_dict``).
    """

    CHECK = 10
    SAFETY = 10.0

    def __init__(self, mode: str = "auto", *, missing: bool = False, sparse: bool = False, reads_value: bool = False):
        self.gram = mode == "gram" or (mode == "auto" and not missing)
        self.watch = mode == "auto" and not (missing or sparse) and reads_value

    def observe(self, done: int, sq: Tensor, x_sq: Tensor) -> None:
        """After update ``done``, whose pass measured ``sq`` (the error before it): leave the Gram form when due."""
        if not (self.watch and self.gram) or done % self.CHECK:
            return
        eps = torch.finfo(sq.dtype if sq.dtype != torch.bfloat16 else torch.float32).eps
        if float(sq.detach().min()) <= (self.SAFETY * math.sqrt(eps)) ** 2 * float(x_sq):
            self.gram = False

    def state_dict(self) -> dict[str, bool]:
        """The form now, for a checkpoint."""
        return {"gram": self.gram}

    def load_state_dict(self, state: dict[str, bool]) -> None:
        """The form a checkpointed run had reached."""
        self.gram = bool(state.get("gram", self.gram))


class PenaltySchedule:
    """The clamp penalty's weight ``lam``, grown by ``growth`` every ``every`` updates while the factors stay negative.

    A fixed weight may leave the factors far from non-negative: the penalty's gradient is
    lam / size per entry, whatever X's scale, and an optimizer may settle where the fit's
    pull outweighs it. Penalty methods raise the weight until the constraint holds; here
    until the factors' negative mass (:func:`~nmf_lightning.objective.negative_mass`, the
    larger of W's and H's, of any restart) is at most ``tol``. Checked after updates
    ``every``, 2 ``every``, ... counted from the start of training (one host sync each), so
    the weight follows from the settings and the update number alone, and a checkpoint
    keeps it (``state_dict``).
    """

    def __init__(self, lam: float, growth: float, tol: float, every: int):
        self.lam, self.growth, self.tol, self.every = float(lam), float(growth), float(tol), int(every)
        self.met = False  # the last check found the factors non-negative to tol (a fit may stop then)

    @torch.no_grad()
    def observe(self, done: int, W: Tensor, H: Tensor, whole: Callable[[Tensor], Tensor] | None = None) -> bool:
        """After update ``done``: grow ``lam`` when due and the factors are still negative; whether it grew.

        ``whole`` completes a sum over this rank's rows of W (row-sharded under DDP).
        """
        if done % self.every:
            return False
        share = torch.maximum(negative_mass(W, whole), negative_mass(H)).max()
        self.met = float(share) <= self.tol
        if self.met:
            return False
        self.lam *= self.growth
        return True

    def state_dict(self) -> dict[str, float]:
        """The weight reached, for a checkpoint."""
        return {"lam": self.lam, "met": self.met}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """The weight a checkpointed run had reached."""
        self.lam = float(state.get("lam", self.lam))
        self.met = bool(state.get("met", self.met))


class GradientUpdate:
    """A torch.optim optimizer (Adam, SGD, ...) over row blocks: one step on W and H together.

    Each block adds its squared error and its gradients at the current factors; ``end``
    turns them into the training loss (``objective``: reconstruction term + penalties,
    through autograd so any optimizer and penalty works; ``compile`` runs it compiled) and
    takes one optimizer step on W and H: the same step as on the whole matrix. ``form``
    says whether unmasked errors are computed without a residual (see :class:`GramForm`;
    ``x_sq``, the whole X's ``||X||^2``, is what it compares the error with); ``schedule``
    grows the clamp penalty's weight (see :class:`PenaltySchedule`); ``done`` counts the
    updates since training started. ``record_terms`` makes the next pass also report the
    objective's unweighted terms for a curve's point, before its step.

    With ``beta`` the data term is the beta-divergence instead of the squared error
    (``objective`` reads it in the same place); a recorded pass then measures the squared
    error too, for the relative error.

    ``sum_ranks`` adds the data term and its H-gradient over the processes that hold X's
    other rows (one all-reduce), so H's gradient is the whole matrix's, summed, not averaged.

    ``biases`` (a biased model, whose blocks come as ratings less the biases) take their
    exact steps at the factors the gradient is taken at: b for each block's rows before its
    gradient, mu and c before the step (:mod:`~nmf_lightning.engine.biases`).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        objective: Objective,
        project: bool = True,
        form: GramForm | None = None,
        beta: float | None = None,
        sum_ranks: SumRanks | None = None,
        x_sq: Tensor | None = None,
        done: int = 0,
        compile: bool = False,
        schedule: PenaltySchedule | None = None,
        biases: Biases | None = None,
    ):
        self.sum_ranks, self.biases = sum_ranks, biases
        self._bias: dict[str, Tensor] = {}  # the pass's sums the column biases read
        self.optimizer, self.project, self.compile = optimizer, project, compile
        self.form = form if form is not None else GramForm()
        self.schedule = schedule
        self.beta, self.x_sq, self.done = beta, x_sq, done
        self.record_terms = False
        self._error: Tensor | None = None  # beta: the recorded pass's squared error
        self._sq: Tensor | None = None
        self._dW: Tensor | None = None
        self._dH: Tensor | None = None
        self._set_objective(objective)

    def _set_objective(self, objective: Objective) -> None:
        self.objective = objective
        self.loss = torch.compile(objective) if self.compile else objective

    def state_dict(self) -> dict[str, dict]:
        """What decides the next updates' arithmetic beyond the factors and the optimizer: for a checkpoint."""
        state = {"gram_form": self.form.state_dict()}
        if self.schedule is not None:
            state["penalty"] = self.schedule.state_dict()
        return state

    def load_state_dict(self, state: dict[str, dict]) -> None:
        """Go on as the checkpointed run would: its Gram form and penalty weight."""
        if "gram_form" in state:
            self.form.load_state_dict(state["gram_form"])
        if self.schedule is not None and "penalty" in state:
            self.schedule.load_state_dict(state["penalty"])
            self._follow_schedule()

    def _follow_schedule(self) -> None:
        if self.schedule is not None and self.objective.lam != self.schedule.lam:
            self._set_objective(dataclasses.replace(self.objective, lam=self.schedule.lam))

    def begin(self, W: Tensor, H: Tensor) -> None:  # noqa: D102
        self._sq = self._dH = None
        self._dW = self._error = None
        self._bias = {}

    @torch.no_grad()
    def block(self, t: Block, W: Tensor, H: Tensor) -> None:  # noqa: D102
        rows = slice(t.start, t.stop)
        if self.biases is not None:
            t = self.biases.fit_rows(t, W[..., rows, :], H)
            part = self.biases.col_stats(t, W[..., rows, :])
            self._bias = {k: self._bias[k] + v for k, v in part.items()} if self._bias else part
        if self.beta is None:
            sq, dW, dH = t.sq_and_grads(W[..., rows, :], H, self.form.gram)
        else:
            sq, dW, dH = t.div_and_grads(W[..., rows, :], H, self.beta)
            if self.record_terms:
                error = t.sq_error(W[..., rows, :], H, self.form.gram)
                self._error = error if self._error is None else self._error + error
        if t.shape[0] == W.shape[-2]:
            self._dW = dW
        else:
            if self._dW is None:
                self._dW = torch.zeros_like(W)
            self._dW[..., rows, :] = dW
        self._sq = sq if self._sq is None else self._sq + sq
        self._dH = dH if self._dH is None else self._dH + dH

    def end(self, W: Tensor, H: Tensor) -> PassResult:  # noqa: D102
        if self.sum_ranks is not None:
            parts = {"sq": self._sq, "dH": self._dH, **({} if self._error is None else {"error": self._error})}
            summed = self.sum_ranks({**parts, **self._bias})
            self._sq, self._dH, self._error = summed["sq"], summed["dH"], summed.get("error")
            self._bias = {k: summed[k] for k in self._bias}
        if self.biases is not None:
            self.biases.fit_cols(self._bias, H.detach())
        self.optimizer.zero_grad(set_to_none=True)
        sq = _SqWithGrads.apply(W, H, self._sq, self._dW, self._dH)
        loss = self.loss(sq, W, H)  # (r,) with restarts: they are independent, so sum them
        terms = None
        if self.record_terms:
            with torch.no_grad():
                terms = self.objective.terms(self._sq, W, H, zero_weights=False)[1]
        (loss.sum() if loss.dim() else loss).backward()
        self.optimizer.step()
        if self.project:
            with torch.no_grad():
                W.clamp_(min=0)
                H.clamp_(min=0)
        self._dW = self._dH = None
        self.done += 1
        if self.schedule is not None and self.schedule.observe(self.done, W, H, self.objective.sum_rows):
            self._follow_schedule()
        if self.beta is None:
            if self.x_sq is not None:
                self.form.observe(self.done, self._sq, self.x_sq)
            return PassResult(sq=self._sq, after=False, loss=loss.detach(), terms=terms)
        return PassResult(sq=self._error, after=False, loss=loss.detach(), terms=terms, divergence=self._sq)
