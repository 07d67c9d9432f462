"""What a fit reports: the objective's terms, the errors, the factors' statistics and the held-out scores.

One :class:`Recorder` measures a :class:`~nmf_lightning.engine.Problem`'s factors for
every front end: the Lightning module's curves and ``metrics.json``, and the estimator's
``verbose`` lines and ``log_dir`` curves. Values stay tensors on the device (one per
restart until the best is picked); reading them is the caller's host sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from nmf_lightning.divergence import elementwise
from nmf_lightning.engine.biases import predict
from nmf_lightning.engine.problem import PENALTIES, Problem, Spec
from nmf_lightning.engine.updates import PassResult
from nmf_lightning.objective import Objective, factor_stats, relative_error
from nmf_lightning.params import Words

if TYPE_CHECKING:
    from nmf_lightning.curves import UpdateGrid
    from nmf_lightning.data.holdout import Holdout
    from nmf_lightning.distributed import RowShard


#: clamping the trained factors may cost this much of their relative error before they count as not an NMF
CLAMP_COST = 0.01


def factor_tag(factor: str, stat: str) -> str:
    """The curve of a statistic of W or H: ``train/sparsity_W``.

    Under ``train/`` so TensorBoard opens on the training curves; the statistic first so
    its cards sort after the errors and the loss (TensorBoard sorts upper case first).
    """
    return f"train/{stat}_{factor}"


def metric_key(tag: str) -> str:
    """metrics.json's name of a curve.

    ``train/rmse`` -> ``rmse``, ``val/rmse`` -> ``val_rmse``, ``train/sparsity_W`` -> ``W_sparsity``.
    """
    group, _, rest = tag.rpartition("/")
    stat, _, factor = rest.rpartition("_")
    if factor in ("W", "H") and stat in FACTOR_STATS:
        return f"{factor}_{stat}"
    return f"val_{rest}" if group == "val" else rest


def metric_tag(key: str) -> str:
    """The curve a final metric ends: ``val_rmse`` -> ``val/rmse``, ``rmse`` -> ``train/rmse``.

    HPARAMS reads a run's final metrics as the last points of these curves.
    """
    return f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"


#: the statistics of W and H on the curves (objective.factor_stats)
FACTOR_STATS = ("neg_fraction", "neg_mean", "sparsity", "neg_mass")


@dataclass(frozen=True)
class Clamped:
    """What clamping trained factors at 0 did to a run that let them go negative (``project=false``).

    ``mass`` is W's and H's negative mass (:func:`~nmf_lightning.objective.negative_mass`);
    ``trained`` and ``clamped`` the relative errors of the factors as trained and clamped.
    """

    mass: tuple[float, float]
    trained: float
    clamped: float
    lam: float

    @property
    def costly(self) -> bool:
        """Whether the clamped factors, those a user gets, fit worse than training found (by more than CLAMP_COST)."""
        return not self.clamped <= self.trained * (1 + CLAMP_COST)

    def message(self, spec: Spec, words: Words) -> str:
        """What happened, in one line, and (when ``costly``) the settings that give non-negative factors."""
        shares = f"W {self.mass[0]:.2%}, H {self.mass[1]:.2%} of their mass"
        errors = f"relative error {self.clamped:.4g}, against {self.trained:.4g} as trained"
        if not self.costly:
            return f"the trained factors had negative entries ({shares}); clamped at 0 they fit as well ({errors})."
        if spec.lam_growth > 1:
            fix = (
                f"the schedule raised {words.name('lam')} to {self.lam:g} but the factors stayed negative: give it "
                f"more updates ({words.name('steps')}), grow it faster ({words.name('lam_growth')}) or set "
                f"{words.show('project', True)}"
            )
        elif self.lam:
            fix = (
                f"for an NMF set {words.show('project', True)}, a larger {words.name('lam')} (now {self.lam:g}), "
                f"or {words.show('lam_growth', 10.0)} to grow it until the negative mass is below "
                f"{words.name('neg_tol')}"
            )
        else:
            fix = (
                f"for an NMF set {words.show('project', True)}, or a clamp penalty grown until the negative mass "
                f"is below {words.name('neg_tol')}: {words.show('lam', 10.0)} and {words.show('lam_growth', 10.0)}"
            )
        return (
            f"the trained factors are not non-negative ({shares} is negative), and clamped at 0 they fit worse "
            f"({errors}); {fix}."
        )


@dataclass
class HeldOut:
    """Entries held out of training (row, column, value), on the training device; rows are this process's.

    ``clip`` is the scale their predictions are clipped to before they are scored (``data.rating_range``).
    """

    rows: Tensor
    cols: Tensor
    vals: Tensor
    clip: tuple[float, float] | None = None

    def __len__(self) -> int:
        return len(self.vals)

    @classmethod
    def of(
        cls,
        holdout: Holdout,
        dtype: torch.dtype,
        device: torch.device,
        shard: RowShard | None = None,
        clip: tuple[float, float] | None = None,
    ) -> HeldOut:
        """``data.holdout``'s entries on ``device`` (values in float32 at least); under DDP this rank's, from row 0."""
        rows, cols, values = holdout.rows, holdout.cols, holdout.values
        if shard is not None:
            mine = (rows >= shard.start) & (rows < shard.stop)
            rows, cols, values = rows[mine] - shard.start, cols[mine], values[mine]
        vals = torch.from_numpy(values).to(device, torch.promote_types(dtype, torch.float32))
        return cls(torch.from_numpy(rows).long().to(device), torch.from_numpy(cols).long().to(device), vals, clip)


class Recorder:
    """The numbers a run reports about its factors, measured the same way wherever it runs.

    ``reported`` factors are those a user gets: clamped at 0 when a gradient solver trained
    them free to go negative (``project=false``). The best restart is the one of lowest
    finite loss at the last :meth:`metrics` (``best``).
    """

    #: the error a closed-form pass forms from its sums (the Gram form) is trusted down to this many sqrt(eps)
    GRAM_SAFETY = 10.0

    def __init__(self, problem: Problem, held_out: HeldOut | None = None, grid: UpdateGrid | None = None):
        self.problem, self.held_out, self.grid = problem, held_out, grid
        self.clamps = problem.spec.clamps
        self.best: int = 0
        layout = problem.source.layout
        self._dense = not (layout.missing or layout.sparse)  # where the sums' error has a residual to check
        self._sums_ok = self._points_ok = True

    def observe(self, relative_error: Tensor) -> None:
        """The error measured at a block's end: whether the sums' error can be trusted from here.

        Near an exact fit (a relative error near sqrt(eps)) the Gram form cancels to noise;
        the next points are then measured on the residual. Points inside a block switch a
        decade early, as the error may fall 10x within one.
        """
        if self._dense:
            eps = torch.finfo(self.problem.dtype).eps
            error = float(relative_error)
            self._sums_ok = error > self.GRAM_SAFETY * math.sqrt(eps)
            self._points_ok = error > 10 * self.GRAM_SAFETY * math.sqrt(eps)

    def sums_ok(self, points: bool = False) -> bool:
        """Whether an error formed from a pass's sums is good enough to report (``points``: inside a block)."""
        return self._points_ok if points else self._sums_ok

    def reported(self, W: Tensor, H: Tensor) -> tuple[Tensor, Tensor]:
        """The factors a user gets: clamped at 0 when training let them go negative."""
        return self.problem.spec.reported(W, H)

    def errors(self, sq: Tensor, div: Tensor | None = None) -> dict[str, Tensor]:
        """Relative error, RMSE and the divergence (``div``; 1/2 sq for the Frobenius losses), one per restart."""
        source = self.problem.source
        sq = sq.double()
        return {
            "train/relative_error": relative_error(sq, source.x_sq.to(sq.device)),
            "train/rmse": torch.sqrt(sq.clamp_min(0) / source.n_obs),
            "train/divergence": 0.5 * sq.clamp_min(0) if div is None else div,
        }

    @torch.no_grad()
    def metrics(self, W: Tensor, H: Tensor, sq: Tensor | None = None) -> dict[str, Tensor]:
        """Objective terms, errors and factor statistics of the best restart (and each restart's loss).

        The loss is the training objective; the errors and sparsity are those of the factors
        a user gets, the negative shares those of the trained ones. ``sq`` is the squared
        error of (W, H) when already known; the exact one is measured otherwise.
        """
        W, H = W.detach(), H.detach()
        per_restart = self.train(W, H, sq)
        reported = self.reported(W, H)
        for name, A, R in (("W", W, reported[0]), ("H", H, reported[1])):
            shard = self.problem.shard if name == "W" else None  # W's rows are sharded under DDP
            per_restart.update({factor_tag(name, k): v for k, v in factor_stats(A, R, shard).items()})
        loss = per_restart["train/loss"]
        if loss.dim() == 0:
            return per_restart
        best = torch.nan_to_num(loss.double(), nan=float("inf")).argmin()  # NaN everywhere: all diverged
        self.best = best
        metrics = {key: value[best] for key, value in per_restart.items()}
        metrics.update({f"restarts/loss_{r}": loss[r] for r in range(len(loss))})
        return metrics

    @torch.no_grad()
    def train(self, W: Tensor, H: Tensor, sq: Tensor | None = None) -> dict[str, Tensor]:
        """The loss, its terms and the errors (``train/*``), one per restart: a curve's point."""
        problem = self.problem
        W, H = W.detach(), H.detach()
        sq = problem.sq_error(W, H) if sq is None else sq
        div = None if problem.beta is None else problem.data_term(W, H)
        loss, terms = problem.objective.terms(sq if div is None else div, W, H, zero_weights=False)
        point = {"train/loss": loss, **{f"train/{k}": v for k, v in terms.items()}}
        if problem.schedule is not None:  # the penalty weight reached
            point["train/lam"] = torch.full_like(loss, problem.schedule.lam, dtype=torch.float64)
        reported = self.reported(W, H)
        if reported[0] is not W:
            point["train/trained_relative_error"] = relative_error(sq.double(), problem.source.x_sq.to(sq.device))
            sq = problem.sq_error(*reported)
        return {**point, **self.errors(sq, div)}

    @torch.no_grad()
    def on_update(self, span: tuple[int, int], s: int, result: PassResult, W: Tensor, H: Tensor, update: Any) -> None:
        """Keep the curves' points inside a block of updates ``span`` (first, last) on the device.

        ``s`` is the update just taken (the block's end logs its own point). A gradient step
        reports the loss and error of the factors before it, so update s gives the point
        s - 1 for free, and ``update.record_terms`` asks the next step for the terms at s; a
        closed-form update's error is that of its new factors, read from its sums while
        they are trusted (:meth:`sums_ok`).
        """
        (start, end), grid = span, self.grid
        if result.loss is not None:
            if start < s - 1 < end and grid.due(s - 1):
                point = {"train/loss": result.loss, **{f"train/{k}": v for k, v in (result.terms or {}).items()}}
                if not self.clamps and result.sq is not None:
                    point.update(self.errors(result.sq, result.divergence))
                grid.add(s - 1, point)
            update.record_terms = s < end and grid.due(s)
        if not (s < end and grid.due(s)):
            return
        grid.add(s, {})  # reached now (a gradient step reports its values with the next update)
        if result.loss is None:
            grid.add(s, self.online(self.train(W, H, sq=self.pass_sq(result, points=True)), result))
        elif self.clamps:
            grid.add(s, self.errors(self.problem.sq_error(*self.reported(W, H))))

    def pass_sq(self, result: PassResult, points: bool = False) -> Tensor | None:
        """The squared error a pass measured of the factors it ended with, when it can be trusted; None: measure it.

        A closed-form pass forms it from its sums (trusted per :meth:`sums_ok`; ``points``:
        inside a block); an online pass (``running``) reports each block's error as it was
        fit, which :meth:`online` names as such.
        """
        if result.running:
            return result.sq
        return result.sq if result.after and self.sums_ok(points) else None

    @staticmethod
    def online(metrics: dict[str, Tensor], result: PassResult) -> dict[str, Tensor]:
        """``train/*`` as ``online/*`` after an online pass: its errors are not those of the factors it ended with."""
        return {k.replace("train/", "online/", 1): v for k, v in metrics.items()} if result.running else metrics

    def clamped(self, metrics: dict[str, float]) -> Clamped | None:
        """What clamping did to the final factors (``metrics``, as floats), when training let them go negative."""
        mass = tuple(metrics[factor_tag(n, "neg_mass")] for n in ("W", "H"))
        if not self.clamps or not any(v > 0 for v in mass):
            return None
        lam = self.problem.objective.lam
        return Clamped(mass, metrics["train/trained_relative_error"], metrics["train/relative_error"], lam)

    @torch.no_grad()
    def validation(self, W: Tensor, H: Tensor) -> dict[str, Tensor]:
        """``val/relative_error``, ``val/rmse`` and ``val/divergence`` of (2-D) factors on the held-out entries.

        The divergence is the training loss's (1/2 the squared error for the Frobenius losses).
        Predictions are the model's (:func:`~nmf_lightning.engine.biases.predict`: with its
        biases, clipped to the rating scale).
        """
        held, problem = self.held_out, self.problem
        if held is None:
            return {}
        W, H = W.to(held.vals.dtype), H.to(held.vals.dtype)
        sq = torch.zeros((), dtype=torch.float64, device=W.device)
        div = torch.zeros((), dtype=torch.float64, device=W.device)
        chunk = max(1, 2**24 // max(1, W.shape[-1]))  # bounds the (chunk, k) gather
        for start in range(0, len(held), chunk):
            rows, cols, vals = (A[start : start + chunk] for A in (held.rows, held.cols, held.vals))
            pred = predict(rows, cols, W, H, problem.biases, held.clip)  # one gather serves both
            sq += ((vals - pred) ** 2).sum().double()
            if problem.beta is not None:
                div += elementwise(vals, pred, problem.beta).sum().double()
        ref = (held.vals.double() ** 2).sum()
        count = torch.tensor(float(len(held)), dtype=torch.float64, device=W.device)
        if problem.sum_ranks is not None:  # every rank's held-out entries
            sq, div, ref, count = problem.sum_ranks({"sq": sq, "div": div, "ref": ref, "n": count}).values()
        return {
            "val/relative_error": relative_error(sq, ref),
            "val/rmse": torch.sqrt(sq.clamp_min(0) / count),
            "val/divergence": 0.5 * sq if problem.beta is None else div,
        }

    def curve_metrics(self, metrics: dict[str, Tensor]) -> dict[str, Tensor]:
        """The metrics worth a curve: no term of weight 0, no negative share of factors kept >= 0."""
        objective = self.problem.objective
        skip = {name for name, weight, _ in objective.penalties(None, None) if not weight}
        if not self.clamps:
            skip |= {f"{A}_{stat}" for A in "WH" for stat in FACTOR_STATS if stat.startswith("neg_")}
        skip.add("trained_relative_error")  # measured at a block's end only: a final number, not a curve
        return {k: v for k, v in metrics.items() if metric_key(k) not in skip}


def final_names(spec: Spec, held_out: bool = False) -> set[str]:
    """Names of the numbers a run of ``spec`` writes to metrics.json (checked before training)."""
    weights = Objective(**{k: getattr(spec, k) for k in PENALTIES})
    names = {"loss", "reconstruction", "relative_error", "rmse", "divergence", "steps", "updates_per_sec"}
    names |= {name for name, weight, _ in weights.penalties(None, None) if weight}
    names |= {f"{A}_{stat}" for A in "WH" for stat in FACTOR_STATS}
    if spec.clamps:
        names.add("trained_relative_error")
    if spec.lam_growth > 1:
        names.add("lam")
    if spec.restarts > 1:
        names |= {"best_restart"} | {f"loss_{r}" for r in range(spec.restarts)}
    if spec.consensus:
        names |= {"consensus_relative_error", "stability", "consensus_kept"}
    if held_out:
        names |= {"val_relative_error", "val_rmse", "val_divergence"}
    return names
