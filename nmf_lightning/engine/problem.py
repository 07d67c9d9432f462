"""One set-up of a fit for every front end: X and a spec in; factors, update and objective out.

As scikit-learn's ``_fit_transform`` serves ``fit``, ``transform`` and
``non_negative_factorization``, a :class:`Problem` serves ``nmf-train``'s module, the
estimator and ``nmf-transform``. Every decision that changes the arithmetic is taken here,
from the spec and the update number alone, so the same settings and seed give the same
factors whichever front end runs them, and a resumed run repeats a straight one:

- the initial factors (:meth:`Problem.initial_factors`; a deterministic init starts restart 0 alone);
- ``lr=auto`` (:meth:`Problem.auto_lr`);
- the Gram or residual form of gradient updates (:class:`~nmf_lightning.engine.updates.GramForm`);
- the clamp penalty's weight, when it grows (:class:`~nmf_lightning.engine.updates.PenaltySchedule`);
- when to stop (:class:`~nmf_lightning.engine.loop.Convergence`), which restart is best and
  what a fit that diverged raises (:class:`DivergenceError`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from nmf_lightning.consensus import DENSITY_THRESHOLD, NEIGHBORS, Consensus, consensus
from nmf_lightning.console import NMFWarning
from nmf_lightning.divergence import EPSILON, loss_beta
from nmf_lightning.engine.biases import Biases
from nmf_lightning.engine.blocks import Block, ObservedBlock, dense_layout, to_block
from nmf_lightning.engine.loop import Blocks, Convergence, FitResult, divergence, fit, passes, sq_error
from nmf_lightning.engine.updates import (
    GradientUpdate,
    GramForm,
    PenaltySchedule,
    SolverUpdate,
    Update,
    fused_optimizer,
)
from nmf_lightning.init import DETERMINISTIC_INITS, SVD_INITS, draw_factors, initial_factors, streamed_nndsvd
from nmf_lightning.linalg import to_numpy
from nmf_lightning.objective import Objective, reconstruction
from nmf_lightning.params import (
    CONSTRAINTS,
    ENGINE_WORDS,
    Layout,
    Words,
    check_biases,
    check_compatible,
    check_consensus,
    check_init,
    check_params,
    check_restarts,
    check_schedule,
)
from nmf_lightning.solvers import hals
from nmf_lightning.solvers.registry import SolverInfo, for_fixed_components, lookup, of_factory
from nmf_lightning.solvers.rules import Rule
from nmf_lightning.validation import NMFInputError, check_factor_memory, check_scale, has_zeros, require_memory

if TYPE_CHECKING:
    from nmf_lightning.data.rows import RowSummary
    from nmf_lightning.distributed import RowShard

#: lr=auto for an Adam-like optimizer: this share of the factors' scale (the larger RMS of W and H)
AUTO_LR_SHARE = 0.05
#: ... and its eps, this share of the gradient's RMS at the start: torch's 1e-8 for a gradient of 1,
#: and the same steps for X and c X (an absolute eps swamps the gradients of a small X)
AUTO_EPS = 1e-8
HALF = (torch.bfloat16, torch.float16)
#: solving W for fixed components: at most this many passes, until the projected gradient is this share of its start
FIXED_H_MAX_ITER = 5000
FIXED_H_TOL = 1e-8
#: the penalty weights of a spec, in the order messages name them
PENALTIES = ("lam", "l1_W", "l1_H", "l2_W", "l2_H", "l21_H")


class DivergenceError(FloatingPointError):
    """The objective became NaN or infinite; carries the update where it did and the last finite factors."""

    def __init__(self, message: str, step: int, W: np.ndarray | None = None, H: np.ndarray | None = None):
        super().__init__(message)
        self.step, self.W, self.H = step, W, H


@dataclass(frozen=True)
class Spec:
    """Everything about a fit that is not X: the rank, the solver and its loss, the start, when to stop.

    ``lam_growth`` > 1 grows ``lam`` every ``lam_every`` updates while the factors'
    negative mass is above ``neg_tol`` (:class:`~nmf_lightning.engine.updates.PenaltySchedule`).
    ``optimizer`` builds the solver over [W, H] (a closed-form :class:`~nmf_lightning.solvers.Solver`
    or a ``torch.optim.Optimizer`` factory, as a Hydra ``_partial_`` config gives it); its
    ``lr`` may be ``"auto"``. ``l2_scale="count"`` weighs each row's ``l2_W`` and each
    column's ``l2_H`` by its number of observed entries (ALS-WR; scikit-learn's scaling when
    every entry is observed). ``biases`` adds mu + b_i + c_j to W H at every entry, shrunk
    by ``l2_bias`` (:mod:`~nmf_lightning.engine.biases`).
    """

    rank: int
    optimizer: Callable[..., torch.optim.Optimizer]
    loss: str = "fro"
    beta: float | None = None
    lam: float = 0.0
    l1_W: float = 0.0
    l1_H: float = 0.0
    l2_W: float = 0.0
    l2_H: float = 0.0
    l2_scale: str = "none"
    l21_H: float = 0.0
    biases: bool = False
    l2_bias: float = 0.0
    project: bool = True
    lam_growth: float = 1.0
    neg_tol: float = 1e-3
    lam_every: int = 100
    init: str = "random"
    init_scale: float = 0.01
    restarts: int = 1
    consensus: bool = False
    density_threshold: float = DENSITY_THRESHOLD
    neighbors: float = NEIGHBORS
    consensus_refine: int = 0
    seed: int = 0
    loss_form: str = "auto"
    online: bool = False
    forget: float = 0.7
    tol: float | None = 0.0
    tol_window: int = 10
    compile: bool = False

    @property
    def info(self) -> SolverInfo:
        """The solver's entry in the registry."""
        return of_factory(self.optimizer)

    def check(self, words: Words) -> None:
        """Every field against the constraints table, then the loss's beta; before any data is read."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in CONSTRAINTS}
        check_params(values, name=words)
        lr = _keywords(self.optimizer).get("lr")
        if not self.info.closed_form and lr is not None:
            check_params({"lr": lr}, name=words)
        check_restarts(self.init, self.restarts, words)
        check_consensus(self.consensus, self.restarts, words)
        check_biases(self.biases, self.data_loss()[1], self.restarts, self.online, words)
        check_schedule(self.lam_growth, self.lam, self.clamps, words)
        try:
            loss_beta(self.loss, self.beta)
        except ValueError as err:
            raise NMFInputError(str(err)) from None

    def data_loss(self) -> tuple[str, float | None]:
        """The loss and the beta of the data term: the beta-divergence at 2 is 1/2 ||X - WH||^2 (``fro2``)."""
        beta = loss_beta(self.loss, self.beta)
        return ("fro2", None) if beta == 2 else (self.loss, beta)

    @property
    def clamps(self) -> bool:
        """Whether the factors a user gets are the trained ones clamped at 0 (a gradient solver without projection)."""
        return not self.project and not self.info.closed_form

    def reported(self, W: Tensor, H: Tensor) -> tuple[Tensor, Tensor]:
        """The factors a user gets: clamped at 0 when training let them go negative (:attr:`clamps`)."""
        return (W.clamp(min=0), H.clamp(min=0)) if self.clamps else (W, H)

    @property
    def penalized(self) -> bool:
        """Whether an L1 or L2 weight is on."""
        return any((self.l1_W, self.l1_H, self.l2_W, self.l2_H))


def _keywords(factory: Any) -> dict[str, Any]:
    return dict(factory.keywords) if isinstance(factory, partial) else {}


@dataclass
class Source:
    """X as a fit reads it: its row blocks, and what a fit needs to know of the whole X before it starts.

    ``shape``, ``n_obs``, ``x_sq`` (float64) and ``total`` (the sum of the observed entries)
    are the whole X's, every process's rows; ``rows`` are this process's rows of it (under
    DDP), ``whole`` is all of X as one block, or makes it, when X is held in memory (the
    SVD inits read it; None for a streamed X), and ``zeros`` says, when asked, whether an
    observed entry is 0.
    """

    blocks: Blocks | None
    shape: tuple[int, int]
    n_obs: int
    x_sq: Tensor
    total: float
    layout: Layout
    zeros: Callable[[], bool]
    whole: Block | Callable[[], Block] | None = None
    rows: slice | None = None

    @classmethod
    def in_memory(
        cls,
        X: np.ndarray | sp.spmatrix,
        dtype: torch.dtype,
        device: torch.device | str,
        *,
        unstored_missing: bool = False,
        observed: bool = True,
        shard: RowShard | None = None,
        biased: bool = False,
    ) -> Source:
        """X held in host memory, as one block on ``device`` (this process's rows of it under DDP).

        ``observed``: the solver can fit X kept as observed triplets; a dense X with missing
        entries then stays a dense mask. ``biased``: a biased model reads X, which is kept as
        observed triplets whatever its density.
        """
        masked, triplets = dense_layout(X)
        triplets = (triplets or biased) and observed if not sp.issparse(X) else None
        if shard is None:
            t = to_block(X, dtype, device, unstored_missing=unstored_missing, triplets=triplets)
            return cls._of_block(t, X, unstored_missing, whole=t)
        local = X[shard.rows]  # this rank's rows, in the layout the whole X takes
        t = to_block(local, dtype, device, unstored_missing=unstored_missing, triplets=triplets, masked=masked)
        sums = shard.sum(
            {
                "n": torch.tensor(float(t.n_obs), dtype=torch.float64),
                "sq": t.x_sq.double().cpu(),
                "total": t.values_sum().double().cpu(),
            }
        )

        def whole() -> Block:  # the SVD inits read all of X
            return to_block(X, dtype, unstored_missing=unstored_missing, triplets=triplets)

        source = cls._of_block(t, X, unstored_missing, whole=whole)
        source.n_obs, source.x_sq, source.total = int(sums["n"]), sums["sq"], float(sums["total"])
        source.layout = dataclasses.replace(source.layout, ranks=shard.world)
        source.shape, source.rows = tuple(X.shape), shard.rows
        return source

    @classmethod
    def _of_block(
        cls, t: Block, X: np.ndarray | sp.spmatrix, unstored_missing: bool, whole: Block | Callable[[], Block]
    ) -> Source:
        layout = Layout(missing=t.masked, observed=isinstance(t, ObservedBlock), sparse=t.sparse)
        return cls(
            blocks=t,
            shape=t.shape,
            n_obs=t.n_obs,
            x_sq=t.x_sq.double().cpu(),
            total=float(t.values_sum()),
            layout=layout,
            zeros=lambda: has_zeros(X, unstored_missing),
            whole=whole,
        )

    @classmethod
    def host_blocks(
        cls,
        X: np.ndarray | sp.spmatrix,
        dtype: torch.dtype,
        device: torch.device | str,
        batch_rows: int,
        observed: bool = True,
        biased: bool = False,
    ) -> Source:
        """X held in host memory, reaching ``device`` in blocks of ``batch_rows`` rows, one pass at a time."""
        X = X.tocsr() if sp.issparse(X) else X
        masked, triplets = dense_layout(X)
        triplets = (triplets or biased) and observed if not sp.issparse(X) else None
        host = torch.device("cpu")
        parts = [
            to_block(X[s : s + batch_rows], dtype, host, start=s, triplets=triplets, masked=masked)
            for s in range(0, X.shape[0], batch_rows)
        ]
        x_sq = torch.stack([p.x_sq for p in parts]).sum()  # each block's computed once, on the host
        device = torch.device(device)
        blocks = (lambda: iter(parts)) if device.type == "cpu" else (lambda: (p.to(device) for p in parts))
        total = float(sum(float(p.values_sum()) for p in parts))
        layout = Layout(missing=masked, observed=bool(triplets), sparse=sp.issparse(X), streamed=True)
        return cls(
            blocks=blocks,
            shape=tuple(X.shape),
            n_obs=sum(p.n_obs for p in parts),
            x_sq=x_sq.double(),
            total=total,
            layout=layout,
            zeros=lambda: has_zeros(X),
            whole=lambda: to_block(X, dtype, host, triplets=triplets),
        )

    @classmethod
    def host(
        cls,
        X: np.ndarray | sp.spmatrix,
        dtype: torch.dtype,
        device: torch.device | str,
        batch_rows: int | None = None,
        *,
        observed: bool = True,
        unstored_missing: bool = False,
        biased: bool = False,
    ) -> Source:
        """X held in host memory as a fit reads it: one block on ``device``, or blocks of ``batch_rows`` rows."""
        if batch_rows is None or X.shape[0] <= batch_rows:
            options = {"unstored_missing": unstored_missing, "observed": observed, "biased": biased}
            return cls.in_memory(X, dtype, device, **options)
        if unstored_missing:
            raise NMFInputError(
                "a sparse X whose unstored entries are missing (ratings) is fit whole here: leave batch_rows unset."
            )
        return cls.host_blocks(X, dtype, device, batch_rows, observed=observed, biased=biased)

    @classmethod
    def summarized(
        cls,
        summary: RowSummary,
        shape: tuple[int, int],
        *,
        sparse: bool,
        unstored_missing: bool = False,
        streamed: bool = False,
        ranks: int = 1,
    ) -> Source:
        """What is known of X from one scan of it (:func:`~nmf_lightning.data.rows.scan`): enough to check a run.

        It has no blocks to update; ``streamed`` X is read from where it lies, a block of rows at a time.
        """
        layout = Layout(
            missing=summary.masked,
            observed=unstored_missing,
            sparse=sparse,
            streamed=streamed,
            on_disk=streamed,
            ranks=ranks,
        )
        return cls(
            blocks=None,
            shape=shape,
            n_obs=summary.n_obs,
            x_sq=torch.tensor(summary.x_sq, dtype=torch.float64),
            total=summary.total,
            layout=layout,
            zeros=lambda: summary.zeros,
        )

    def to(self, device: torch.device | str) -> Source:
        """The same X with its block in memory moved to ``device`` (a streamed X moves block by block)."""
        if not isinstance(self.blocks, Block):
            return self
        moved = self.blocks.to(device)
        whole = moved if self.whole is self.blocks else self.whole  # one process: its block is all of X
        return dataclasses.replace(self, blocks=moved, whole=whole)

    def check_memory(self, device: torch.device | str, rank: int, restarts: int, itemsize: int) -> None:
        """X held on a GPU must fit there with the factors: say so before it is moved (not a raw CUDA OOM)."""
        device = torch.device(device)
        if device.type != "cuda" or not isinstance(self.blocks, Block):
            return
        x_bytes, (n, m) = self.blocks.nbytes, self.blocks.shape
        factors = 4 * restarts * (n + m) * rank * itemsize  # W, H, their gradients and moments
        require_memory(
            x_bytes + factors,
            f"X ({n} x {m}{', sparse' if self.layout.sparse else ''}) and the factors need about {{need}} GiB",
            lambda free: (
                "keep X in host memory and stream it in row blocks with data.batch_rows="
                f"{max(1, int(free / 4 / max(x_bytes / max(n, 1), 1)))} (or fewer)."
            ),
            device=device,
        )

    def whole_block(self) -> Block:
        """All of X as one block (on the host, or where X is held when one process holds it all)."""
        return self.whole if isinstance(self.whole, Block) else self.whole()


#: online mode stops, unless ``tol`` says otherwise, once a pass's cost moves by less than this (relative)
ONLINE_TOL = 1e-4


def effective_tol(tol: float | None, online: bool, window: int) -> tuple[float, int]:
    """The ``tol`` test a fit runs: (tol, updates between two measurements).

    ``tol=None`` is the mode's default: off for passes over X, as the notebooks' fixed
    update counts; online, :data:`ONLINE_TOL` on each pass's own cost (each block's error
    as it was fit, free to read), as scikit-learn's ``MiniBatchNMF`` stops early on its
    smoothed batch cost, where a fixed count of passes would run on long after it settled.
    """
    if tol is None:
        return (ONLINE_TOL, 1) if online else (0.0, window)
    return tol, window


class Problem:
    """A fit as the engine runs it: X's blocks, the objective, and how W and H start and are updated.

    ``shard`` is this process's part of X's rows under DDP: W holds those rows, and the
    sums an update needs of the whole X are added over the processes.
    """

    def __init__(
        self,
        spec: Spec,
        source: Source,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        shard: RowShard | None = None,
    ):
        self.spec, self.source, self.dtype, self.device, self.shard = spec, source, dtype, torch.device(device), shard
        self.info = spec.info
        self.loss_name, self.beta = spec.data_loss()
        self.sum_ranks = None if shard is None else shard.sum
        self._objective: Objective | None = None  # made when first read: a count-scaled L2 counts X's entries
        self._biases: Biases | None = None
        self.schedule = (
            PenaltySchedule(spec.lam, spec.lam_growth, spec.neg_tol, spec.lam_every) if spec.lam_growth > 1 else None
        )
        ready = None if self.schedule is None else (lambda: self.schedule.met)  # the penalty's constraint holds
        self.convergence = Convergence(*effective_tol(spec.tol, spec.online, spec.tol_window), ready=ready)

    @property
    def objective(self) -> Objective:
        """The training objective, at the penalty weight the schedule has reached (``lam_growth``)."""
        if self._objective is None:
            weights = {key: float(getattr(self.spec, key)) for key in PENALTIES}
            if self.shard is not None:  # W's penalties are those of the whole factor
                weights.update(sum_rows=self.shard.sum_rows, n_rows=self.shard.n)
            if self.spec.l2_scale == "count" and (self.spec.l2_W or self.spec.l2_H):
                weights.update(l2_counts=self.l2_counts())
            self._objective = Objective(loss=self.loss_name, beta=self.beta, n_obs=self.source.n_obs, **weights)
        if self.schedule is not None and self._objective.lam != self.schedule.lam:
            self._objective = dataclasses.replace(self._objective, lam=self.schedule.lam)
        return self._objective

    @functools.cached_property
    def counts(self) -> tuple[Tensor, Tensor]:
        """Each row's (this process's rows) and each column's number of observed entries: one pass over X.

        (n, 1) and (1, m) in float64 on the device; the columns' are summed over every rank under DDP.
        """
        rows_here = (
            self.source.shape[0] if self.source.rows is None else len(range(self.source.shape[0])[self.source.rows])
        )
        rows = torch.zeros(rows_here, dtype=torch.float64, device=self.device)
        cols = torch.zeros(self.source.shape[1], dtype=torch.float64, device=self.device)
        for t in passes(self.source.blocks):
            r, c = t.counts()
            rows[t.start : t.stop] = r.to(self.device)
            cols += c.to(self.device)
        if self.sum_ranks is not None:
            cols = self.sum_ranks({"n": cols})["n"]
        return rows[:, None], cols[None, :]

    def l2_counts(self) -> tuple[float | Tensor, float | Tensor]:
        """What ``l2_scale`` multiplies ``l2_W`` (per row, (n, 1)) and ``l2_H`` (per column, (1, m)) by.

        ``none``: 1. ``count``: each row's and column's number of observed entries; plain numbers
        when every entry is observed (m and n: scikit-learn's scaling), so the unmasked updates,
        whose columns share one Gram, take them too.
        """
        if self.spec.l2_scale == "none":
            return 1.0, 1.0
        n, m = self.source.shape
        if not self.source.layout.missing:
            return float(m), float(n)
        rows, cols = self.counts
        return rows.to(self.dtype), cols.to(self.dtype)

    def l2_weights(self) -> tuple[float | Tensor, float | Tensor]:
        """``l2_W`` and ``l2_H`` as the closed-form updates take them: numbers, or per row (n, 1) and column (1, m)."""
        rows, cols = self.l2_counts() if (self.spec.l2_W or self.spec.l2_H) else (1.0, 1.0)
        return self.spec.l2_W * rows, self.spec.l2_H * cols

    @property
    def blocks(self) -> Blocks:
        """X as the updates read it: one block, or a callable giving a pass of blocks.

        A biased model's blocks are the ratings less the biases as they are when read.
        """
        if self.biases is None:
            return self.source.blocks
        biases = self.biases
        return lambda: (biases.shift(t) for t in passes(self.source.blocks))

    @property
    def biases(self) -> Biases | None:
        """mu, b (this process's rows) and c of a biased model (``spec.biases``), None otherwise.

        They start at mu = the mean observed entry and b = c = 0 (:meth:`start_biases` sets others).
        """
        if self.spec.biases and self._biases is None:
            self.start_biases()
        return self._biases

    def start_biases(self, mu: float | None = None, c: Tensor | None = None) -> Biases:
        """Start the biases: mu (default: the mean observed entry), b = 0 and c (default 0; (1, m) or (m,))."""
        like = torch.empty((), dtype=self.dtype, device=self.device)
        mean = self.source.total / max(self.source.n_obs, 1) if mu is None else mu
        self._biases = Biases.start(mean, self.counts, self.spec.l2_bias, like)
        if c is not None:
            self._biases.c.copy_(torch.as_tensor(c).reshape(1, -1))
        return self._biases

    # ----------------------------------------------------------------- checks
    def check(self, words: Words = ENGINE_WORDS, precision: str | None = None) -> None:
        """Everything that can be refused before a factor is drawn, in the front end's ``words``."""
        spec, source = self.spec, self.source
        spec.check(words)
        split = source.layout.streamed and source.layout.ranks > 1  # no process reads all of X
        check_init(spec.init, spec.rank, source.shape, words, whole=not split)
        self.check_solver(words, precision)
        if spec.loss_form == "gram" and source.layout.missing:
            raise NMFInputError(
                f"{words.show('loss_form', 'gram')} cannot skip missing entries, and X has some (NaN entries, "
                f"entries held out, or unstored ones of ratings); use {words.show('loss_form', 'auto')} or residual."
            )
        if spec.loss_form == "residual" and source.layout.sparse:
            warnings.warn(
                f"{words.show('loss_form', 'residual')} densifies the sparse X at every update; auto keeps it sparse.",
                NMFWarning,
                stacklevel=3,
            )
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        check_factor_memory(
            source.shape, spec.rank, spec.restarts, itemsize, (words.name("rank"), words.name("restarts"))
        )
        check_scale(float(source.x_sq), source.n_obs, self.dtype)

    def check_solver(self, words: Words, precision: str | None = None) -> None:
        """The solver against X's layout, the loss, the precision and the mode (see :func:`check_compatible`)."""
        spec = self.spec
        check_compatible(
            self.info,
            words,
            layout=self.source.layout,
            beta=self.beta,
            loss=spec.loss,
            project=spec.project,
            online=spec.online,
            half=self.dtype in HALF,
            precision=precision,
            penalties=spec.penalized,
            l21=bool(spec.l21_H),
            biases=spec.biases,
        )
        self._check_beta_data(words)

    def _check_beta_data(self, words: Words) -> None:
        """Itakura-Saito (beta <= 0) divides by X; betas other than 1 and 2 read W H densely."""
        beta, loss = self.beta, words.show("loss", self.spec.loss)
        if beta is None:
            return
        kl = words.show_raw(words.name("loss"), words.kl)
        if beta <= 0 and self.source.zeros():
            name = "the Itakura-Saito divergence" if beta == 0 else f"the beta={beta:g} divergence"
            raise NMFInputError(
                f"{name} ({loss}) is defined for X > 0 only, and X has zero entries (a sparse X's unstored "
                "entries are zeros); add a small floor to X (a noise floor, e.g. 1e-6 of its largest value)"
                f", or use {kl}, which takes zeros."
            )
        rms = math.sqrt(float(self.source.x_sq) / max(self.source.n_obs, 1))
        if rms < 1e3 * EPSILON:
            warnings.warn(
                f"X's values are at scale {rms:.3g}, near the floor {EPSILON:.3g} the beta-divergence keeps W H "
                f"above (scikit-learn's): the fit of {loss} depends on X's units there; multiply X by "
                f"{1 / rms:.3g} first.",
                NMFWarning,
                stacklevel=3,
            )
        if self.source.layout.sparse and beta not in (1.0, 2.0):
            warnings.warn(
                f"{loss} with beta={beta:g} reads every entry of W H, so each update builds it densely (rows x "
                f"columns) although X is sparse; {kl} (beta=1) keeps to X's non-zeros.",
                NMFWarning,
                stacklevel=3,
            )

    # ---------------------------------------------------------------- factors
    def initial_factors(self) -> tuple[Tensor, Tensor]:
        """W (this process's rows) and H to start from: restart r draws from seed ``seed + r``.

        The random inits read X's shape and mean only; the SVD inits read all of X (a
        streamed X in a few passes, :func:`~nmf_lightning.init.streamed_nndsvd`). A
        deterministic init (nndsvd, nndsvda) starts restart 0 and the others draw random
        starts: the best of the restarts is then never a worse start than one run's. Under
        DDP each process draws W for the whole X and keeps its rows, so a run starts where
        one process starts.
        """
        spec = self.spec
        if spec.init in DETERMINISTIC_INITS and spec.restarts > 1:
            W0, H0 = self._starts(spec.init, spec.seed, 1)
            W, H = self._starts("random", spec.seed + 1, spec.restarts - 1)
            W, H = (torch.cat([A0[None], A if A.dim() == 3 else A[None]]) for A0, A in ((W0, W), (H0, H)))
        else:
            W, H = self._starts(spec.init, spec.seed, spec.restarts)
        if self.source.rows is not None:
            W = W[..., self.source.rows, :].clone()
        return W, H

    def _starts(self, init: str, seed: int, restarts: int) -> tuple[Tensor, Tensor]:
        """``restarts`` starts of ``init`` from seeds ``seed``, ``seed + 1``, ... (stacked when several), all of W."""
        spec, source = self.spec, self.source
        like = torch.empty((), dtype=self.dtype, device=self.device)
        if init in SVD_INITS and source.whole is None and source.rows is None:  # X in row blocks: pass by pass
            return streamed_nndsvd(
                lambda: passes(source.blocks),
                source.shape,
                spec.rank,
                init,
                mean=self._init_mean(),
                sparse=source.layout.sparse,
                seed=seed,
                restarts=restarts,
                like=like,
            )
        options = {"seed": seed, "restarts": restarts, "scale": spec.init_scale}
        if init in SVD_INITS:
            W, H = initial_factors(source.whole_block(), spec.rank, init, **options)
            return W.to(self.device, self.dtype), H.to(self.device, self.dtype)
        return draw_factors(source.shape, spec.rank, init, mean=self._init_mean(), like=like, **options)

    def _init_mean(self) -> float:
        """What the random inits scale W H to: X's mean; a biased model's W H fits X's spread about it."""
        source = self.source
        mean = source.total / max(source.n_obs, 1)
        if not self.spec.biases:
            return mean
        spread = math.sqrt(max(float(source.x_sq) / max(source.n_obs, 1) - mean * mean, 0.0))
        return spread or mean

    def scale(self, W: Tensor, H: Tensor) -> float:
        """The scale of the factors: the larger RMS of W (all of its rows, under DDP) and H."""
        with torch.no_grad():
            sums = {"W": W.double().pow(2).sum(), "H": H.double().pow(2).sum()}
            if self.sum_ranks is not None:  # W's rows are sharded: its mean square over every rank
                sums["W"] = self.sum_ranks({"W": sums["W"]})["W"]
            sizes = {"W": W.numel() // max(W.shape[-2], 1) * self.source.shape[0], "H": H.numel()}
            return max(math.sqrt(float(sums[name]) / max(sizes[name], 1)) for name in sums)

    def auto_lr(self, W: Tensor, H: Tensor) -> float:
        """``lr=auto``: a step that fits the factors' scale, so X and c X train alike.

        Adam-like steps move an entry by about lr whatever the gradient: 5% of the factors'
        scale. Plain gradient steps are safe below 1/L, L the Lipschitz constant of the
        reconstruction's gradient at the start (``||H H^T||`` and ``||W^T W||`` for 1/2 ||X - WH||^2).
        """
        if self.info.adaptive:
            return AUTO_LR_SHARE * self.scale(W, H)
        with torch.no_grad():
            wide = torch.promote_types(W.dtype, torch.float32)  # (float32 would underflow a float64 X's tiny Grams)
            WtW = W.mT @ W if self.sum_ranks is None else self.sum_ranks({"WtW": W.mT @ W})["WtW"]
            L = max(float(torch.linalg.matrix_norm(G.to(wide), ord=2).max()) for G in (H @ H.mT, WtW))
        return 1.0 / max(L * self._slope(W, H), torch.finfo(torch.float64).tiny)

    def _slope(self, W: Tensor, H: Tensor) -> float:
        """How the reconstruction term scales the gradient of 1/2 ||X - W H||^2 at these factors (1 for fro2)."""
        if self.beta is not None:
            return 1.0
        with torch.no_grad():
            sq = self.sq_error(W, H).double().clamp_min(torch.finfo(torch.float64).tiny).requires_grad_(True)
        with torch.enable_grad():
            term = reconstruction(sq, self.source.n_obs, self.loss_name)
            return float(torch.autograd.grad(term.sum(), sq)[0].max()) * 2

    @torch.no_grad()
    def gradient_rms(self, W: Tensor, H: Tensor) -> float:
        """The root mean square of the reconstruction term's gradient in W and H at these factors.

        One pass over X's blocks; W's part and H's are summed over every rank under DDP.
        """
        w_sq, dH = None, None
        for t in passes(self.blocks):
            rows = W[..., t.start : t.stop, :]
            _, dW, part = (
                t.sq_and_grads(rows, H, gram_form=True) if self.beta is None else t.div_and_grads(rows, H, self.beta)
            )
            square = dW.double().pow(2).sum()
            w_sq, dH = (square, part) if w_sq is None else (w_sq + square, dH + part)
        if self.sum_ranks is not None:
            summed = self.sum_ranks({"W": w_sq, "dH": dH})
            w_sq, dH = summed["W"], summed["dH"]
        count = W.numel() // max(W.shape[-2], 1) * self.source.shape[0] + H.numel()
        return math.sqrt(float(w_sq + dH.double().pow(2).sum()) / max(count, 1)) * self._slope(W, H)

    def lr_advice(self, lr: float, updates: int, W: Tensor, H: Tensor, words: Words) -> str | None:
        """Why ``lr`` cannot fit X in ``updates`` updates of an Adam-like optimizer, or None.

        Its steps move an entry by about lr whatever the gradient's size: when lr x updates
        cannot even cover the scale of the factors (large-valued X), the run ends far from a
        fit, and saying so now beats a poor relative error later.
        """
        scale = self.scale(W, H)
        if not self.info.adaptive or updates <= 0 or lr * updates >= scale:
            return None
        auto = _keywords(self.spec.optimizer).get("lr") == "auto"
        share = f"{AUTO_LR_SHARE:.0%} of the scale, made for runs of {round(1 / AUTO_LR_SHARE)} updates or more"
        lr_name, closed = words.name("lr"), words.solvers(["hals" if self.beta is None else "mu"])
        return (
            f"{lr_name}={lr:g} moves a factor entry by about {lr:g} per update, at most {lr * updates:.3g} over "
            f"{updates} updates, but the factors are at scale {scale:.3g} (X is large-valued): the run will end "
            f"far from a fit. Use {closed}, or raise {words.name('steps')} or the lr (e.g. {lr_name}="
            f"{scale / max(min(updates, 100), 1):.2g}{f'; lr=auto took {share}' if auto else ''})."
        )

    def optimizer(self, W: Tensor, H: Tensor) -> torch.optim.Optimizer:
        """The spec's solver over [W, H], as Lightning configures and checkpoints it; ``lr=auto`` is :meth:`auto_lr`."""
        factory = self.spec.optimizer
        if self.info.closed_form:
            optimizer = factory([W, H])
            self._set_beta(optimizer.rule)
            return optimizer
        keywords = _keywords(factory)
        if "lr" in keywords and keywords["lr"] in ("auto", None):
            factory = partial(factory, lr=self.auto_lr(W, H))
            if (
                self.info.adaptive
                and "eps" not in keywords
                and "eps" in inspect.signature(self.info.factory).parameters
            ):
                factory = partial(factory, eps=AUTO_EPS * self.gradient_rms(W, H))
        return fused_optimizer(factory, [W, H])

    def rule(self) -> Rule:
        """The closed-form rule alone (no optimizer object: the first one a process builds costs seconds)."""
        return self._set_beta(self.info.factory.rule_class(**_keywords(self.spec.optimizer)))

    def _set_beta(self, rule: Rule) -> Rule:
        if self.beta is not None:
            rule.beta = self.beta
        return rule

    def stepper(self, W: Tensor, H: Tensor) -> Rule | torch.optim.Optimizer:
        """What updates W and H outside Lightning: the closed-form rule, or the gradient optimizer."""
        return self.rule() if self.info.closed_form else self.optimizer(W, H)

    def update(self, step: Rule | torch.optim.Optimizer, *, update_H: bool = True, measure: bool = False) -> Update:
        """The engine's update for a rule or an optimizer; ``measure``: masked blocks report errors in passing."""
        spec = self.spec
        if self.info.closed_form:
            return SolverUpdate(
                getattr(step, "rule", step),
                (spec.l1_W, spec.l1_H),
                self.l2_weights(),
                update_H=update_H,
                online=spec.online,
                forget=spec.forget,
                measure=measure,
                sum_ranks=self.sum_ranks,
                x_sq=None if self.shard is None else self.source.x_sq.to(self.device),
                biases=self.biases,
            )
        layout = self.source.layout
        form = GramForm(
            spec.loss_form, missing=layout.missing, sparse=layout.sparse, reads_value=self.loss_name in ("fro", "rmse")
        )
        return GradientUpdate(
            step,
            self.objective,
            spec.project,
            form=form,
            beta=self.beta,
            sum_ranks=self.sum_ranks,
            x_sq=self.source.x_sq,
            compile=spec.compile,
            schedule=self.schedule,
            biases=self.biases,
        )

    # -------------------------------------------------------------- measuring
    def sq_error(self, W: Tensor, H: Tensor, gram_form: bool = False) -> Tensor:
        """``||M * (X - W H)||^2`` of the whole X (every process's rows), one per restart."""
        return sq_error(self.blocks, W.detach(), H.detach(), gram_form, self.sum_ranks)

    def data_term(self, W: Tensor, H: Tensor) -> Tensor:
        """What the loss reads: the squared error (exact: the residual form on dense X), or the beta-divergence."""
        if self.beta is None:
            return self.sq_error(W, H)
        return divergence(self.blocks, W.detach(), H.detach(), self.beta, self.sum_ranks)

    def loss(self, W: Tensor, H: Tensor) -> Tensor:
        """The objective of the factors as they are, one per restart."""
        with torch.no_grad():
            return self.objective(self.data_term(W, H), W.detach(), H.detach())

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        W: Tensor,
        H: Tensor,
        update: Update,
        steps: int,
        *,
        done: int = 0,
        on_update: Callable[..., bool | None] | None = None,
        convergence: Convergence | None = None,
    ) -> FitResult:
        """Up to ``steps`` updates (``done`` ran before them), stopping where ``convergence`` (the spec's tol) says."""
        return fit(
            self.blocks,
            W,
            H,
            update,
            steps,
            measure=lambda last: last.sq if last.running else self.loss(W, H),  # online: the pass's own cost
            convergence=self.convergence if convergence is None else convergence,
            done=done,
            on_update=on_update,
        )

    @staticmethod
    def best(loss: Tensor) -> int | None:
        """The restart of lowest finite loss (None without restarts); NaN everywhere is caught by :meth:`diverged`."""
        if loss.dim() == 0:
            return None
        return int(torch.nan_to_num(loss.detach().double(), nan=math.inf).argmin())

    def diverged(
        self,
        losses: Tensor | None,
        start: int,
        end: int,
        factors: tuple[Tensor, Tensor] | None,
        lr: float | None,
        words: Words,
    ) -> DivergenceError:
        """The error of a fit whose loss stopped being finite between updates ``start`` and ``end``.

        ``losses`` are the per-update losses of a gradient fit (the first that is not finite
        names the update); ``factors`` the last finite ones when kept (one start's, all of W's rows).
        """
        if losses is not None and losses.dim() == 2:  # restarts: the block failed if all did
            losses = losses.nan_to_num(nan=math.inf).min(dim=1).values
        if losses is None:  # closed-form solvers keep no per-update losses: blame the block's end
            losses = torch.full((max(end - start, 1),), math.nan)
        bad = (~torch.isfinite(losses)).nonzero()
        offset = int(bad[0]) if len(bad) else len(losses) - 1
        value = float(losses[offset]) if len(bad) else math.nan
        hint = f"lower the learning rate (e.g. {words.show('lr', lr / 10)})" if lr else "check X for extreme values"
        if not lr and self.info.name == "als" and not (self.spec.l2_W or self.spec.l2_H):  # projected ALS unsteadied
            hint += f", or steady ALS's solves with a ridge ({words.name('l2_W')}, {words.name('l2_H')})"
        if not self.spec.project:
            hint += f", or set {words.show('project', True)}"
        step = start + offset + 1
        kept = (None, None) if factors is None else tuple(map(to_numpy, factors))
        return DivergenceError(f"the loss became {value} at update {step}; {hint}.", step, *kept)

    def solve_w(self, H: Tensor, max_iter: int, tol: float) -> tuple[Tensor, int, bool]:
        """W >= 0 for X with H fixed, run to ``tol``: the spec's rule's W-update (scikit-learn's ``update_H=False``).

        HALS on the Frobenius loss of a complete X solves each row's non-negative least
        squares exactly (:func:`~nmf_lightning.solvers.hals.nnls`); otherwise the rule's
        W-updates run until the objective changes by less than ``tol`` over 10 updates. Returns
        W, the passes run and whether ``tol`` was met.
        """
        t, k = self.blocks, H.shape[-2]
        mean = self._init_mean()
        W = torch.full((self.source.shape[0], k), math.sqrt(max(mean, 0.0) / k), dtype=self.dtype, device=self.device)
        spec = self.spec
        if self.info.name == "hals" and self.beta is None and isinstance(t, Block) and not t.masked:
            W, steps, converged = hals.nnls(t.XHt(H), H @ H.mT, W, spec.l1_W, self.l2_weights()[0], max_iter, tol)
            return W, steps, converged
        result = self.fit(W, H, self.update(self.rule(), update_H=False), max_iter, convergence=Convergence(tol, 10))
        return W, result.steps, result.steps < max_iter

    def consensus(self, H: Tensor) -> tuple[Tensor, Tensor, Consensus]:
        """The consensus components of the restarts' H (R, k, m), and W solved for them: cNMF's combine and refit.

        W is each row's best fit with the consensus H held fixed (:meth:`solve_w`, by the
        spec's rule, or by HALS/MU for a gradient solver). Returns W (n, k), H (k, m) and
        the :class:`~nmf_lightning.consensus.Consensus` (stability, outliers). ``consensus_refine``
        > 0 then runs that many updates of W and H together from there.
        """
        spec = self.spec
        found = consensus(H.detach(), spec.density_threshold, spec.neighbors, spec.seed)
        fixed = spec
        if not self.info.closed_form:
            rule = for_fixed_components(self.beta is None, self.source.layout.observed)
            fixed = dataclasses.replace(spec, optimizer=rule.factory)
        fixed = dataclasses.replace(fixed, restarts=1, consensus=False)
        problem = Problem(fixed, self.source, self.dtype, self.device, self.shard)
        H_c = found.H.to(self.device, self.dtype)
        W, _, _ = problem.solve_w(H_c, FIXED_H_MAX_ITER, FIXED_H_TOL)
        if spec.consensus_refine:  # polish W and H together from the consensus: a closer fit, components drift
            problem.fit(W, H_c, problem.update(problem.rule()), spec.consensus_refine)
            scale = H_c.sum(1, keepdim=True).clamp_min(torch.finfo(H_c.dtype).tiny)
            W, H_c = W * scale.mT, H_c / scale  # H's rows sum to 1 again, as cNMF's
        return W, H_c, found


def solve_w(
    X: np.ndarray | sp.spmatrix,
    H: np.ndarray,
    solver: str,
    words: Words,
    *,
    max_iter: int = 500,
    tol: float = 1e-6,
    device: torch.device | str = "cpu",
    l1_W: float = 0.0,
    l2_W: float = 0.0,
    l2_scale: str = "none",
    beta: float = 2.0,
    biases: tuple[float, np.ndarray] | None = None,
    l2_bias: float = 0.0,
    unstored_missing: bool = False,
) -> tuple[np.ndarray, int, bool, np.ndarray | None]:
    """W >= 0 with X ~ W H for fixed components H (k, m), in H's dtype: what ``transform`` computes everywhere.

    ``solver`` names a closed-form rule (its W-update runs); ``beta`` the loss the
    components were trained on. NaN entries of a dense X are missing. ``biases`` (mu, c (m,))
    are a biased model's, held fixed with H: each row's bias b is solved with its W.
    ``unstored_missing``: a sparse X's unstored entries are missing (ratings). Returns
    W (n, k) as numpy, the passes run, whether ``tol`` was met (see :meth:`Problem.solve_w`)
    and b (n,) (None without ``biases``).
    """
    dtype = torch.float64 if H.dtype == np.float64 else torch.float32
    spec = Spec(
        rank=H.shape[0],
        optimizer=lookup(solver).factory,
        loss="fro2" if beta == 2 else "beta",
        beta=None if beta == 2 else beta,
        l1_W=l1_W,
        l2_W=l2_W,
        l2_scale=l2_scale,
        biases=biases is not None,
        l2_bias=l2_bias,
    )
    biased = biases is not None
    options = {"unstored_missing": unstored_missing, "observed": biased or unstored_missing, "biased": biased}
    problem = Problem(spec, Source.in_memory(X, dtype, device, **options), dtype, device)
    problem.check_solver(words)
    if biased:
        problem.start_biases(*biases)
    W, steps, converged = problem.solve_w(torch.from_numpy(H).to(device=device, dtype=dtype), max_iter, tol)
    return to_numpy(W), steps, converged, to_numpy(problem.biases.b)[:, 0] if biased else None
