"""NMFModule: W and H as parameters of a LightningModule, trained by manual optimization.

Each ``training_step`` runs a block of ``inner_steps`` optimizer updates on the full
matrix with no host synchronisation inside the block, then computes the metrics once
on the device and logs them. ``trainer.max_steps`` counts updates, not blocks, and the
curves have a point every ``trainer.log_every_n_steps`` updates whatever the block sizes.
"""

from __future__ import annotations

import logging
import math
import signal
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from functools import partial

import lightning as L
import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn

from nmf_lightning.console import NMFWarning
from nmf_lightning.curves import UpdateGrid, restart_curves
from nmf_lightning.data.holdout import Holdout
from nmf_lightning.data.rows import RowSummary
from nmf_lightning.data.sources import Matrix
from nmf_lightning.distributed import RowShard, map_w_state
from nmf_lightning.divergence import elementwise, loss_beta
from nmf_lightning.engine import GradientUpdate, SolverUpdate, Target, Update, divergence, fit, sq_error, to_target
from nmf_lightning.engine.loop import Convergence
from nmf_lightning.engine.target import PRECISIONS, csr_from_parts, dense_layout, to_numpy
from nmf_lightning.engine.updates import PassResult, SumRanks, fused_optimizer
from nmf_lightning.init import INITS, SVD_INITS, draw_factors, initial_factors
from nmf_lightning.objective import LOSSES, Objective, factor_stats, predict_observed, relative_error
from nmf_lightning.solvers import Solver
from nmf_lightning.transform import transform
from nmf_lightning.validation import (
    NMFInputError,
    check_factor_memory,
    check_rank,
    check_scale,
    has_zeros,
    require_memory,
)

log = logging.getLogger(__name__)

LOSS_FORMS = ("auto", "residual", "gram")
#: auto mode leaves the Gram form when the relative error falls below this many sqrt(eps)
_GRAM_SAFETY = 10.0
#: optimizers whose steps are about lr in size whatever the gradient (see _warn_small_lr)
_ADAPTIVE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adamax, torch.optim.NAdam)
#: inner_steps=auto sizes each block of updates to take about this long (one log point)
_BLOCK_SECONDS = 1.0
#: lr: auto's choice where it reaches the factors' scale (the notebooks' Adam lr)
AUTO_LR = 1e-3
#: closed-form rules whose H-update from running sums is monotone: they can run model.online=true
ONLINE = ("HALS", "MU")


class DivergenceError(RuntimeError):
    """The objective became NaN or infinite; carries the last finite factors."""

    def __init__(self, message: str, step: int, W: np.ndarray, H: np.ndarray):
        super().__init__(message)
        self.step, self.W, self.H = step, W, H


class NMFModule(L.LightningModule):
    """X ~ W H with W (n, k), H (k, m) trained on a penalised reconstruction loss.

    objective = reconstruction(loss) + lam * (mean(clamp(-W, 0)) + mean(clamp(-H, 0)))
                + l1_W * |W|_1 + l1_H * |H|_1 + l2_W/2 * ||W||^2 + l2_H/2 * ||H||^2
                + l21_H * mean_j |H[:, j]|_2

    ``optimizer`` is a factory ``params -> torch.optim.Optimizer`` (a Hydra
    ``_partial_`` config); ``project`` clamps W, H to >= 0 after every update.
    ``restarts`` = r trains r initialisations (seeds seed, seed+1, ...) at once as one
    batched problem, W (r, n, k) and H (r, k, m), and keeps the one with the lowest loss.
    """

    def __init__(
        self,
        rank: int = 10,
        optimizer: Callable[[Iterable[Tensor]], torch.optim.Optimizer] | None = None,
        loss: str = "fro",
        beta: float | None = None,
        lam: float = 0.0,
        l1_W: float = 0.0,
        l1_H: float = 0.0,
        l2_W: float = 0.0,
        l2_H: float = 0.0,
        l21_H: float = 0.0,
        project: bool = True,
        init: str = "random",
        init_scale: float = 0.01,
        loss_form: str = "auto",
        inner_steps: int | str = "auto",
        restarts: int = 1,
        tol: float = 0.0,
        tol_window: int = 10,
        compile: bool = False,
        online: bool = False,
        forget: float = 0.7,
        seed: int = 0,
    ):
        super().__init__()
        check_rank(rank)
        _check_choice("model.loss", loss, LOSSES)
        try:
            self.beta = loss_beta(loss, beta)  # None for the Frobenius losses
        except ValueError as err:
            raise NMFInputError(str(err)) from None
        self._loss = loss
        if self.beta == 2:  # the beta-divergence at 2 is scikit-learn's 1/2 ||X - WH||^2: the Gram form's loss
            self.beta, self._loss = None, "fro2"
        if self.beta is not None and not project:
            raise NMFInputError(
                f"model.loss={loss} is a beta-divergence, defined for W H >= 0 only; it trains with "
                "model.project=true (the default)."
            )
        _check_choice("model.init", init, INITS)
        _check_choice("model.loss_form", loss_form, LOSS_FORMS)
        weights = {"lam": lam, "l1_W": l1_W, "l1_H": l1_H, "l2_W": l2_W, "l2_H": l2_H, "l21_H": l21_H}
        for key, value in weights.items():
            if value < 0:
                raise NMFInputError(f"model.{key} is a penalty weight and must be >= 0, got {value}.")
        if init == "normal_abs" and init_scale <= 0:
            raise NMFInputError(f"model.init_scale must be > 0 for init=normal_abs, got {init_scale}.")
        if inner_steps != "auto" and (isinstance(inner_steps, bool) or int(inner_steps) < 1):
            raise NMFInputError(f"model.inner_steps must be 'auto' or an integer >= 1, got {inner_steps!r}.")
        if tol < 0 or int(tol_window) < 1:
            raise NMFInputError(f"model.tol must be >= 0 and model.tol_window >= 1, got {tol} and {tol_window}.")
        if isinstance(restarts, bool) or int(restarts) < 1:
            raise NMFInputError(f"model.restarts must be an integer >= 1, got {restarts!r}.")
        if not 0 < forget <= 1:
            raise NMFInputError(f"model.forget must be in (0, 1], got {forget}.")
        if int(restarts) > 1 and init in ("nndsvd", "nndsvda"):
            warnings.warn(
                f"model.init={init} is deterministic, so the {restarts} restarts start (and end) alike; "
                "use model.init=random or nndsvdar for different starts.",
                NMFWarning,
                stacklevel=2,
            )
        self.save_hyperparameters(ignore=["optimizer"], logger=False)
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, lr=1e-3, betas=(0.9, 0.9))
        self.automatic_optimization = False
        # (n, k) and (k, m); with restarts a leading batch dimension: (r, n, k), (r, k, m)
        self.W = nn.Parameter(torch.empty(*_batch(restarts), 0, rank))
        self.H = nn.Parameter(torch.empty(*_batch(restarts), rank, 0))
        self.matrix: Matrix | None = None
        self.streamed = False  # X arrives as row blocks from the dataloader (data.batch_rows)
        self.final_metrics: dict[str, float] = {}
        self.stop_reason = "max_steps"
        self._gram_safe = True
        self._gram_points = True  # the Gram sums are safe for the points inside the next block too
        self._last_time: float | None = None
        self._block = 1  # current block size under inner_steps=auto
        self._convergence = Convergence()  # the tol test's last objective
        self._update: Update | None = None  # built once per optimizer
        self._target: Target | None = None  # X in memory as the engine reads it
        self._unlogged = 0  # updates since the last block end (perf/updates_per_sec)
        self._grid: UpdateGrid | None = None  # the curves' points (trainer.log_every_n_steps)
        self._block_span = (0, 0)  # first and last update of the block under way
        self._closed_form = False  # the optimizer is a closed-form rule (its factors are >= 0)
        self.stop_signal: int | None = None  # a signal asked the run to stop (GracefulStop)
        self._auto_lr_chosen: float | None = None  # what optimizer.lr=auto picked
        self.shard: RowShard | None = None  # this process's rows of X and W under DDP (trainer=ddp)
        self._whole_W: Tensor | None = None  # under DDP: all of W (every restart) gathered when training ends
        #: ||X||^2 over observed entries (the whole X's under DDP), float64 on the host: not a buffer,
        #: which a "-true" precision would cast (float16 overflows it, bfloat16 rounds it by 0.4%)
        self._x_sq_total: Tensor | None = None

    #: what DDP must neither verify nor broadcast: W and X differ in shape between ranks (see ShardedDDP).
    #: DDP checks a root module's parameters under two names, "W" and ".W"
    _ddp_params_and_buffers_to_ignore = ("W", ".W") + tuple(
        f"{prefix}{name}"
        for name in ("X", "Xt", "mask", "obs_rows", "obs_cols", "obs_vals", "val_rows", "val_cols", "val_vals")
        for prefix in ("", ".")
    )

    # ------------------------------------------------------------------ data
    def setup(self, stage: str | None = None) -> None:
        """Take X from the datamodule, move it to the training dtype and initialise W, H."""
        if self.matrix is not None:
            return
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "matrix"):
            raise TypeError("NMFModule trains on an NMFDataModule: trainer.fit(module, datamodule=...).")
        datamodule.setup(stage)
        precision = str(self.trainer.precision)
        X = datamodule.matrix.X
        if "16" in precision and (sp.issparse(X) or bool(getattr(X, "sparse", False))):  # in memory or on disk
            raise NMFInputError(
                f"trainer.precision={precision} has no sparse matrix kernels; X is sparse, so use "
                "trainer.precision=32-true (or 64-true)."
            )
        dtype = PRECISIONS.get(precision)
        if self.trainer.world_size > 1:
            self.shard = RowShard.of_rows(datamodule.matrix.shape[0], datamodule.batch_rows)
            datamodule.shard = self.shard
        if datamodule.streamed:
            datamodule.dtype = dtype or torch.float32
            self.set_rows(datamodule.matrix, datamodule.summary, dtype=dtype, holdout=datamodule.holdout)
        else:
            self.set_matrix(datamodule.matrix, dtype=dtype, holdout=datamodule.holdout)
        self.holdout_spec = {"fraction": datamodule.holdout_fraction, "seed": datamodule.holdout_seed}

    def set_matrix(self, matrix: Matrix, dtype: torch.dtype | None = None, holdout: Holdout | None = None) -> None:
        """Store X (and the held-out entries) as non-checkpointed buffers; draw the initial factors."""
        dtype = dtype or torch.float32
        self._check_shape(matrix.shape, dtype)
        X, masked, triplets = matrix.X, False, None
        if self.shard is not None:  # this rank's rows, kept in the layout the whole X takes
            X, (masked, triplets) = X[self.shard.rows], dense_layout(X)
        t = to_target(X, dtype, unstored_missing=matrix.unstored_missing, triplets=triplets, masked=masked)
        self._check_device_memory(t, dtype)
        if t.sparse and self.hparams.loss_form == "residual":
            warnings.warn(
                "model.loss_form=residual densifies the sparse X at every update; loss_form=auto keeps it sparse.",
                NMFWarning,
                stacklevel=2,
            )
        self._check_loss_form(t.masked)
        self._check_beta_data(lambda: has_zeros(matrix.X, matrix.unstored_missing), t.sparse)
        self.matrix = matrix
        self.n_obs, x_sq = t.n_obs, t.x_sq
        self._local_x_sq = t.x_sq
        if self.shard is not None:  # the whole X's sums
            total = self.shard.sum({"n": torch.tensor(float(t.n_obs), dtype=torch.float64), "sq": t.x_sq})
            self.n_obs, x_sq = int(total["n"]), total["sq"]
        check_scale(float(x_sq), self.n_obs, dtype)
        self._x_sq_total = x_sq.double().cpu()
        W, H = self._initial_factors(t, matrix, dtype)
        for name in ("X", "Xt", "mask"):
            self.register_buffer(name, getattr(t, name), persistent=False)
        for name in ("rows", "cols", "vals"):
            self.register_buffer(f"obs_{name}", getattr(t, name), persistent=False)
        self._set_holdout(holdout, dtype)
        self._set_factors(W, H)

    def _initial_factors(self, t: Target, matrix: Matrix, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """W and H as one process would draw them from the whole X; under DDP, this rank's rows of W."""
        hp = self.hparams
        options = {"seed": hp.seed, "restarts": hp.restarts, "scale": hp.init_scale}
        if self.shard is None:
            return initial_factors(t, hp.rank, hp.init, **options)
        if hp.init in SVD_INITS:  # the singular vectors of the whole X
            whole = to_target(matrix.X, dtype, unstored_missing=matrix.unstored_missing, triplets=t.vals is not None)
            W, H = initial_factors(whole, hp.rank, hp.init, **options)
        else:
            values = t.vals if t.X is None else t.X
            total = values.values() if t.sparse else values
            mean = float(self.shard.sum({"s": total.sum(dtype=torch.float64)})["s"]) / max(self.n_obs, 1)
            W, H = draw_factors(matrix.shape, hp.rank, hp.init, mean=mean, like=values, **options)
        return W[..., self.shard.rows, :].clone(), H

    def set_rows(
        self, matrix: Matrix, summary: RowSummary, dtype: torch.dtype | None = None, holdout: Holdout | None = None
    ) -> None:
        """Train on X streamed in row blocks: keep only its size and sums; draw the initial factors."""
        dtype = dtype or torch.float32
        self._check_shape(matrix.shape, dtype)
        if self.hparams.init in SVD_INITS:
            raise NMFInputError(
                f"model.init={self.hparams.init} reads X's singular vectors, which a streamed X "
                "(data.batch_rows) never holds at once; use model.init=random (or normal_abs)."
            )
        self._check_loss_form(summary.masked)
        sparse = sp.issparse(matrix.X) or bool(getattr(matrix.X, "sparse", False))
        self._check_beta_data(lambda: summary.zeros, sparse)
        self.matrix, self.streamed, self._stream_masked, self._stream_sparse = matrix, True, summary.masked, sparse
        self.n_obs = summary.n_obs
        check_scale(float(summary.x_sq), summary.n_obs, dtype)
        self._x_sq_total = torch.tensor(summary.x_sq, dtype=torch.float64)
        for name in ("X", "Xt", "mask", "obs_rows", "obs_cols", "obs_vals"):
            self.register_buffer(name, None, persistent=False)
        self._set_holdout(holdout, dtype)
        hp = self.hparams
        mean = summary.total / summary.n_obs
        like = torch.empty((), dtype=dtype)
        options = {"seed": hp.seed, "restarts": hp.restarts, "scale": hp.init_scale}
        W, H = draw_factors(matrix.shape, hp.rank, hp.init, mean=mean, like=like, **options)
        if self.shard is not None:
            W = W[..., self.shard.rows, :].clone()
        self._set_factors(W, H)

    def _check_device_memory(self, t: Target, dtype: torch.dtype) -> None:
        """X held on a GPU must fit there with the factors: say so before Lightning moves it (a raw CUDA OOM)."""
        device = self.trainer.strategy.root_device if self._trainer is not None else None
        if device is None or device.type != "cuda":
            return
        x_bytes = sum(_nbytes(a) for a in (t.X, t.Xt, t.mask, t.rows, t.cols, t.vals) if a is not None)
        n, m = t.shape
        k, r = self.hparams.rank, int(self.hparams.restarts)
        factors = 4 * r * (n + m) * k * torch.empty((), dtype=dtype).element_size()  # W, H, gradients, moments
        require_memory(
            x_bytes + factors,
            f"X ({n} x {m}{', sparse' if t.sparse else ''}) and the factors need about {{need}} GiB",
            lambda free: (
                "keep X in host memory and stream it in row blocks with data.batch_rows="
                f"{max(1, int(free / 4 / max(x_bytes / max(n, 1), 1)))} (or fewer)."
            ),
            device=device,
        )

    def _check_shape(self, shape: tuple[int, int], dtype: torch.dtype) -> None:
        k = self.hparams.rank
        check_rank(k, shape)
        check_factor_memory(shape, k, int(self.hparams.restarts), torch.empty((), dtype=dtype).element_size())
        if self.hparams.init in SVD_INITS and k > min(shape):
            raise NMFInputError(
                f"model.init={self.hparams.init} needs model.rank <= min(n, m) = {min(shape)}, "
                f"got {k}; lower the rank or use model.init=random."
            )

    def _check_loss_form(self, masked: bool) -> None:
        if masked and self.hparams.loss_form == "gram":
            raise NMFInputError(
                "model.loss_form=gram cannot skip missing entries, and X has some (NaN entries, "
                "entries held out by data.holdout, or data.unstored=missing); use model.loss_form=auto or residual."
            )

    def _check_beta_data(self, zeros: Callable[[], bool], sparse: bool) -> None:
        """Itakura-Saito (beta <= 0) divides by X; other betas than 1 and 2 read W H densely.

        ``zeros`` tells whether an observed entry of X is 0, asked only for beta <= 0.
        """
        beta, loss = self.beta, self.hparams.loss
        if beta is None:
            return
        if beta <= 0 and zeros():
            raise NMFInputError(
                f"model.loss={loss} (beta={beta:g}) is defined for X > 0 only, and X has zero entries "
                "(a sparse X's unstored entries are zeros); add a small floor to X (a noise floor, e.g. "
                "1e-6 of its largest value), or use model.loss=kl, which takes zeros."
            )
        if sparse and beta not in (1.0, 2.0):
            warnings.warn(
                f"model.loss={loss} with beta={beta:g} reads every entry of W H, so each update builds it "
                "densely (rows x columns) although X is sparse; model.loss=kl (beta=1) keeps to X's non-zeros.",
                NMFWarning,
                stacklevel=3,
            )

    def _set_holdout(self, holdout: Holdout | None, dtype: torch.dtype) -> None:
        held = None
        if holdout is not None:
            rows, cols, values = holdout.rows, holdout.cols, holdout.values
            if self.shard is not None:  # this rank's held-out entries, in its own row numbers
                mine = (rows >= self.shard.start) & (rows < self.shard.stop)
                rows, cols, values = rows[mine] - self.shard.start, cols[mine], values[mine]
            held = (torch.from_numpy(rows).long(), torch.from_numpy(cols).long())
            held += (torch.from_numpy(values).to(torch.promote_types(dtype, torch.float32)),)
        for name, value in zip(("val_rows", "val_cols", "val_vals"), held or (None,) * 3, strict=True):
            self.register_buffer(name, value, persistent=False)

    def _set_factors(self, W: Tensor, H: Tensor) -> None:
        self.W = nn.Parameter(W)
        self.H = nn.Parameter(H)
        self._update = None

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Shape W and H like the checkpoint's before Lightning copies the values in."""
        state = checkpoint["state_dict"]
        if self.shard is not None:  # the checkpoint holds all of W (and of its optimizer state): keep this rank's rows
            map_w_state(checkpoint, lambda A: A[..., self.shard.rows, :].clone(), state["W"].shape)
        for name, now in (("W", self.W), ("H", self.H)):
            if now.numel() and tuple(state[name].shape) != tuple(now.shape):
                raise NMFInputError(
                    f"the checkpoint's {name} has shape {tuple(state[name].shape)} but this run's is "
                    f"{tuple(now.shape)}; resume with the data, model.rank and model.restarts it was trained with."
                )
        saved = checkpoint.get("holdout", {"fraction": 0.0, "seed": 0})
        now = getattr(self, "holdout_spec", saved)
        if float(saved["fraction"]) != float(now["fraction"]) or (now["fraction"] and saved["seed"] != now["seed"]):
            raise NMFInputError(
                f"the checkpoint was trained with data.holdout={saved['fraction']} (holdout_seed={saved['seed']}) "
                f"but this run has data.holdout={now['fraction']} (holdout_seed={now['seed']}); resuming would "
                "train on entries held out before. Resume with the same data.holdout and data.holdout_seed."
            )
        self._update = None  # it holds the old parameters
        self.W = nn.Parameter(torch.empty_like(state["W"]))
        self.H = nn.Parameter(torch.empty_like(state["H"]))
        self._best_index = torch.tensor(checkpoint.get("best_restart", 0))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record which restart is best, so a loaded module returns the same factors."""
        checkpoint["best_restart"] = self._best()
        checkpoint["holdout"] = getattr(self, "holdout_spec", {"fraction": 0.0, "seed": 0})
        if self.shard is not None:  # all of W, in row order: a checkpoint resumes on any number of ranks
            map_w_state(checkpoint, self.shard.gather_rows, self.W.shape)

    # ------------------------------------------------------------- objective
    @property
    def loss_terms(self) -> Objective:
        """The objective's formula and weights (a pure function of the squared error, W, H)."""
        hp = self.hparams
        weights = {key: float(hp[key]) for key in ("lam", "l1_W", "l1_H", "l2_W", "l2_H", "l21_H")}
        if self.shard is not None:
            weights.update(sum_rows=self.shard.sum_rows, n_rows=self.shard.n)
        return Objective(loss=self._loss, beta=self.beta, n_obs=getattr(self, "n_obs", 1), **weights)

    def objective(
        self, sq: Tensor | None = None, factors: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and its unweighted terms of non-zero weight, one value per restart (shape (r,)).

        ``sq`` is the data term (squared error, or beta-divergence) already computed for
        ``factors`` (default: the current W, H).
        """
        W, H = factors or (self.W, self.H)
        sq = self._data_term(factors=factors) if sq is None else sq
        return self.loss_terms.terms(sq, W, H, zero_weights=False)

    def blocks(self) -> Target | Callable[[], Iterator[Target]]:
        """X as the engine reads it: the in-memory target, or one pass over the streamed row blocks."""
        if not self.streamed:
            return self.target()
        blocks = self.trainer.datamodule.row_blocks
        return lambda: (self.block_target(self._to_device(b)) for b in blocks() if not b.get("empty"))

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.W.device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}

    def _sq_error(self, exact: bool = False) -> Tensor:
        """Squared error of the current factors; ``exact`` avoids the Gram form on dense X."""
        W, H = self.W.detach(), self.H.detach()
        return sq_error(self.blocks(), W, H, gram_form=not exact and self._use_gram(), sum_ranks=self.sum_ranks)

    @property
    def sum_ranks(self) -> SumRanks | None:
        """Sums over the ranks holding X's other rows (under DDP), for the engine; None in one process."""
        return None if self.shard is None else self.shard.sum

    def _data_term(self, sq: Tensor | None = None, factors: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """What the loss reads of ``factors`` (default: the current ones): the squared error ``sq``, or D_beta."""
        if self.beta is None:
            return self._sq_error() if sq is None else sq
        W, H = factors or (self.W.detach(), self.H.detach())
        return divergence(self.blocks(), W, H, self.beta, sum_ranks=self.sum_ranks)

    def target(self) -> Target:
        """X in memory as the engine reads it (built once per device)."""
        t = self._target
        ref = self.X if self.X is not None else self.obs_vals
        if t is None or (t.X if t.X is not None else t.vals) is not ref:
            shape = (int(self.W.shape[-2]), self.matrix.shape[1])  # this rank's rows under DDP
            t = Target(self.X, self.Xt, self.mask, self.obs_rows, self.obs_cols, self.obs_vals, shape, _zeroed=True)
            t._x_sq = self._local_x_sq.to(self.W.device)  # this rank's ||X||^2 (all of X's in one process)
            self._target = t
        return t

    def block_target(self, batch: dict) -> Target:
        """A row block from the dataloader (see :class:`~nmf_lightning.data.rows.RowBlocks`) as a target."""
        dtype, start = self.W.dtype, int(batch["start"]) - (0 if self.shard is None else self.shard.start)
        x_sq = torch.tensor(float(batch["x_sq"]), dtype=torch.float64, device=self.W.device)
        if "X" in batch:
            X = batch["X"].to(dtype)
            mask = None
            if batch["missing"]:
                mask = ~torch.isnan(X)
                X = torch.nan_to_num(X, nan=0.0)
            return Target(X, None, mask, None, None, None, tuple(X.shape), start, _x_sq=x_sq, _zeroed=True)
        shape = tuple(int(s) for s in batch["shape"])
        vals = batch["data"].to(dtype)
        if self.matrix.unstored_missing:
            counts = batch["indptr"].diff()  # output_size: no sync to learn the length
            rows = torch.repeat_interleave(torch.arange(shape[0], device=vals.device), counts, output_size=vals.numel())
            return Target(None, None, None, rows, batch["indices"], vals, shape, start, _x_sq=x_sq)
        X = csr_from_parts(batch["indptr"], batch["indices"], vals, shape)
        Xt = csr_from_parts(batch["t_indptr"], batch["t_indices"], batch["t_data"].to(dtype), shape[::-1])
        return Target(X, Xt, None, None, None, None, shape, start, _x_sq=x_sq)

    def _use_gram(self) -> bool:
        form = self.hparams.loss_form
        if form != "auto":
            return form == "gram"
        if self.mask is not None or (self.streamed and self._stream_masked):
            return False
        return self.Xt is not None or (self.streamed and self._stream_sparse) or self._gram_safe

    # -------------------------------------------------------------- training
    @property
    def inner_steps(self) -> int:
        """Updates in the next ``training_step``.

        ``auto`` sizes blocks to take about ``_BLOCK_SECONDS`` each, so Lightning's per-step
        cost and the metric read-back stay a small fraction of the time however fast an
        update is. Block sizes change only when metrics are logged, never the factors.
        """
        k = self.hparams.inner_steps
        return self._block if k == "auto" else int(k)

    def _block_size(self, start: int) -> int:
        """Updates of the block starting after update ``start``.

        Under ``auto`` a block ends on the logging grid where it can, so block ends are
        points of the curves with all their metrics.
        """
        n = self.inner_steps
        if self.hparams.inner_steps == "auto":  # end on the grid where that leaves an update to run
            aligned = (start + n) // self.grid.every * self.grid.every
            n = aligned - start if aligned > start else n
        if self.trainer.max_steps > 0:
            n = min(n, self.trainer.max_steps - start)
        return n

    @property
    def grid(self) -> UpdateGrid:
        """The points of the curves: every ``trainer.log_every_n_steps`` updates."""
        if self._grid is None:
            self._grid = UpdateGrid(self.trainer.log_every_n_steps if self._trainer is not None else 10)
        return self._grid

    def _resize_block(self, n: int, seconds: float) -> None:
        if self.hparams.inner_steps == "auto" and self.shard is not None:  # every rank runs the same block sizes
            seconds = float(self.shard.max(torch.tensor(seconds, dtype=torch.float64, device=self.W.device)))
        if self.hparams.inner_steps == "auto" and seconds > 0:
            target = n * _BLOCK_SECONDS / seconds
            self._block = int(min(max(target, 1), 10 * n, 100_000))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Build the configured optimizer (or closed-form solver) over W and H."""
        factory = self.optimizer_factory
        if isinstance(factory, partial) and factory.keywords.get("lr") == "auto":
            factory = partial(factory, lr=self._auto_lr())
        optimizer = fused_optimizer(factory, [self.W, self.H])
        hp = self.hparams
        self._closed_form = isinstance(optimizer, Solver)
        if isinstance(optimizer, Solver):
            name = type(optimizer).__name__.lower()
            if self.beta is not None:
                if not optimizer.rule.supports_beta:
                    raise NMFInputError(
                        f"optimizer={name} minimises the Frobenius loss, not model.loss={hp.loss}; use "
                        "optimizer=mu (multiplicative updates for any beta) or a gradient optimizer such as adam."
                    )
                if hp.online:
                    raise NMFInputError(
                        f"model.online=true runs the Frobenius loss only; model.loss={hp.loss} streams with "
                        "model.online=false (H updated once per pass)."
                    )
                optimizer.rule.beta = self.beta
            if hp.l21_H:
                raise NMFInputError(
                    f"optimizer={name} has no closed form for the L2,1 penalty (model.l21_H="
                    f"{hp.l21_H}); use a gradient optimizer such as optimizer=adam."
                )
            triplets = self.obs_vals is not None or (self.streamed and self.matrix.unstored_missing)
            if triplets and not optimizer.rule.supports_triplets:
                raise NMFInputError(
                    f"optimizer={name} needs a dense mask, but X is kept as observed entries "
                    "(ratings or mostly-missing data); use optimizer=mu, als or a gradient optimizer."
                )
            if self.mask is not None and not optimizer.rule.supports_mask:
                raise NMFInputError(
                    f"optimizer={name} cannot skip missing entries, and X has some (NaN entries or "
                    "entries held out by data.holdout); use optimizer=hals, mu, als or a gradient optimizer."
                )
            if (hp.l1_W or hp.l1_H or hp.l2_W or hp.l2_H) and not optimizer.rule.supports_penalties:
                raise NMFInputError(
                    f"optimizer={name} takes no L1/L2 penalty (model.l1_W, l1_H, l2_W, l2_H); use hals, mu or als."
                )
            if self.W.dtype in (torch.bfloat16, torch.float16) and not optimizer.rule.supports_half:
                raise NMFInputError(
                    f"optimizer={name} solves k x k systems, which trainer.precision={self.trainer.precision} "
                    "cannot; use trainer.precision=32-true (or optimizer=hals or mu)."
                )
            if self.streamed and not optimizer.rule.supports_blocks:
                raise NMFInputError(
                    f"optimizer={name} samples rows anywhere in X for every update, so it cannot stream X "
                    "in row blocks (data.batch_rows); use optimizer=hals, mu or als, or data.batch_rows=null."
                )
        if hp.online and not (self.streamed and isinstance(optimizer, Solver) and type(optimizer).__name__ in ONLINE):
            raise NMFInputError(
                "model.online=true updates H after every row block with a closed-form rule: it needs "
                f"data.batch_rows=B and optimizer={' or '.join(ONLINE).lower()}; this run has "
                f"data.batch_rows={'set' if self.streamed else 'null'} and {type(optimizer).__name__}."
            )
        return optimizer

    def engine_update(self, optimizer: torch.optim.Optimizer) -> Update:
        """The engine's update for this optimizer (built once; the form follows ``loss_form``)."""
        if self._update is None:
            hp = self.hparams
            if isinstance(optimizer, Solver):
                self._update = SolverUpdate(
                    optimizer.rule,
                    (hp.l1_W, hp.l1_H),
                    (hp.l2_W, hp.l2_H),
                    online=hp.online,
                    forget=hp.forget,
                    measure=self.streamed,
                    sum_ranks=self.sum_ranks,
                    x_sq=None if self.shard is None else self._x_sq_total.to(self.W.device),
                )
            else:
                loss = self.loss_terms
                compiled = torch.compile(loss) if hp.compile else loss
                self._update = GradientUpdate(
                    optimizer, compiled, hp.project, objective=loss, beta=self.beta, sum_ranks=self.sum_ranks
                )
        if isinstance(self._update, GradientUpdate):
            self._update.gram_form = self._use_gram()
        return self._update

    def training_step(self, batch: Tensor | dict, batch_idx: int) -> None:
        """Run a block of updates on X in memory, or take one row block of a streamed X."""
        if self.streamed:
            self._stream_step(batch, batch_idx)
            return
        start_step = self.global_step
        n = self._block_size(start_step)
        self._block_span = (start_step, start_step + n)
        self.grid.start(self.W.device)
        W0, H0 = self.W.detach().clone(), self.H.detach().clone()
        result = self._fit(n)
        self._advance_global_step(result.steps)
        metrics = self.compute_metrics()
        if not bool(torch.isfinite(metrics["train/loss"])):  # sync point, once per block
            self._diverged(result.losses, start_step, W0, H0)
        self._log_block(metrics, result.steps)

    @torch.no_grad()
    def _on_update(self, i: int, result: PassResult) -> bool:
        """Keep the grid's points inside a block on the device (the block end logs its own).

        A gradient step reports the loss and error of the factors before it, so update
        s gives the point s - 1 for free; a closed-form update's error is that of its new
        factors. Factors reported clamped (``project=false``) are measured here. Returns
        True to stop the block here: a stop signal arrived (see ``GracefulStop``).
        """
        if self.stop_signal is not None and self.shard is None:  # under DDP: where the block ends, all ranks together
            return True
        if not self.loggers:  # no curves to draw
            return False
        start, end = self._block_span
        s = start + i
        grid = self.grid
        if result.loss is not None:
            p = s - 1
            if start < p < end and grid.due(p):
                point = {"train/loss": result.loss, **{f"train/{k}": v for k, v in (result.terms or {}).items()}}
                if self.hparams.project and result.sq is not None:
                    point.update(self._errors(result.sq, result.divergence))
                grid.add(p, point)
            self._update.record_terms = s < end and grid.due(s)  # the next step reports the terms at s
        if not (s < end and grid.due(s)):
            return False
        grid.add(s, {})  # reached now (a gradient step reports its values with the next update)
        W, H = self.W.detach(), self.H.detach()
        if result.loss is None:
            exact = not self._gram_points  # near an exact fit the Gram sums are rounding noise
            sq = result.sq if result.after and not result.running and not exact else None
            sq = self._sq_error(exact=exact) if sq is None else sq
            div = None if self.beta is None else self._data_term()
            loss, terms = self.loss_terms.terms(sq if div is None else div, W, H, zero_weights=False)
            point = {"train/loss": loss, **{f"train/{k}": v for k, v in terms.items()}, **self._errors(sq, div)}
            grid.add(s, point)
        elif not self.hparams.project:
            reported = self.reported_factors(W, H)
            gram_form = self._use_gram() and self._gram_points
            sq = sq_error(self.blocks(), *reported, gram_form=gram_form, sum_ranks=self.sum_ranks)
            grid.add(s, self._errors(sq))
        return False

    def _errors(self, sq: Tensor, div: Tensor | None = None) -> dict[str, Tensor]:
        """Relative error, RMSE and the divergence (``div``; 1/2 sq for the Frobenius losses), one per restart."""
        sq = sq.double()
        return {
            "train/relative_error": relative_error(sq, self._x_sq_total.to(sq.device)),
            "train/rmse": torch.sqrt(sq.clamp_min(0) / self.n_obs),
            "train/divergence": 0.5 * sq.clamp_min(0) if div is None else div,
        }

    def reported_factors(self, W: Tensor, H: Tensor) -> tuple[Tensor, Tensor]:
        """The factors a user gets: clamped at 0 when training let them go negative (``project=false``)."""
        if self.hparams.project or self._closed_form:
            return W, H
        return W.clamp(min=0), H.clamp(min=0)

    def _fit(self, n: int):
        hp = self.hparams
        optimizer = self.optimizers().optimizer
        result = fit(
            self.blocks(),
            self.W,
            self.H,
            self.engine_update(optimizer),
            n,
            objective=self.loss_terms,
            tol=hp.tol,
            tol_window=int(hp.tol_window),
            done=self.global_step,
            convergence=self._convergence,
            on_update=self._on_update,
            sum_ranks=self.sum_ranks,
        )
        if result.converged:
            self._converged()
        if self._stop_asked():
            self._interrupted()
        return result

    def _stop_asked(self) -> bool:
        """Whether a stop signal arrived (under DDP: on any rank, so all stop after the same update)."""
        if self.shard is not None and self.shard.any(self.stop_signal is not None, self.W.device):
            self.stop_signal = self.stop_signal or signal.SIGTERM
        return self.stop_signal is not None

    def _interrupted(self) -> None:
        self.stop_reason = f"interrupted by {signal.Signals(self.stop_signal).name}"
        self.trainer.should_stop = True

    def _converged(self) -> None:
        hp = self.hparams
        self.stop_reason = (
            f"converged: the objective changed by less than model.tol={hp.tol} (relative) "
            f"over the last {hp.tol_window} updates"
        )
        self.trainer.should_stop = True

    def _stream_step(self, batch: dict, batch_idx: int) -> None:
        """One row block of a pass over X; the pass's last block finishes the update (H)."""
        update = self.engine_update(self.optimizers().optimizer)
        n_blocks = self.trainer.num_training_batches
        if batch_idx >= n_blocks:  # Lightning finishing the epoch a checkpoint ended (a pass already done)
            return
        if batch_idx == 0:
            self._finite_start = getattr(self, "_pass_start", None)
            self._pass_start = (self.W.detach().clone(), self.H.detach().clone())
            self._in_pass = True
            update.begin(self.W, self.H)
        elif not getattr(self, "_in_pass", False):
            raise NMFInputError(
                "this run resumed in the middle of a pass over the row blocks of X (data.batch_rows), whose "
                "partial sums no checkpoint holds; resume from a checkpoint saved at the end of a pass."
            )
        if not batch.get("empty"):  # (under DDP a rank with fewer rows pads its pass)
            update.block(self.block_target(batch), self.W, self.H)
        if batch_idx + 1 < n_blocks:
            return
        self._in_pass = False
        result = update.end(self.W, self.H)
        self._advance_global_step(1)
        if self._stop_asked():  # the pass is done: a consistent place to stop
            self._interrupted()
        self._unlogged += 1
        s = self.global_step
        last = self.trainer.should_stop or 0 < self.trainer.max_steps <= s
        tol_due = bool(self.hparams.tol) and s % int(self.hparams.tol_window) == 0
        sq = result.sq if result.running or self._gram_safe or not result.after else None  # Gram sums: noise
        if result.after or sq is None or last:  # the error of the new factors (or measured by a pass over X)
            step, factors, before = s, None, None
            sq = sq if result.after else None
        else:  # the error before this update (gradient steps, masked X): a point at the update before
            step, factors = s - 1, self._pass_start
            before = self._finite_start  # the factors of the update before, if these are not finite
        due = last or self.grid.due(step)
        if not (due or tol_due):
            return  # a point off the grid: not measured
        metrics = self.compute_metrics(sq=sq, factors=factors)
        if not bool(torch.isfinite(metrics["train/loss"])):
            losses = None if result.loss is None else result.loss[None]
            self._diverged(losses, step - 1, *(before if before is not None else self._pass_start))
        if tol_due:  # on the exact objective, as in memory: sums of float32 products are too noisy for tol
            with torch.no_grad():
                sq = self._sq_error(exact=True) if self.beta is None else None
                current = self.loss_terms(self._data_term(sq), self.W, self.H).min()
            if self._convergence.settled(current, self.hparams.tol):
                self._converged()
        if due or self.trainer.should_stop:
            if result.running:  # each block's error as it was fit: not the error of these factors
                metrics = {k.replace("train/", "online/", 1): v for k, v in metrics.items()}
            self._log_block(metrics, self._unlogged, step)
            self._unlogged = 0

    def _log_block(self, metrics: dict[str, Tensor], n: int, step: int | None = None) -> None:
        """End of a block of ``n`` updates: its point (when on the grid or the last), progress, block size."""
        step = self.global_step if step is None else step
        now = time.perf_counter()
        if self._last_time is not None:
            metrics["perf/updates_per_sec"] = torch.tensor(n / max(now - self._last_time, 1e-9))
            self._resize_block(n, now - self._last_time)
        else:  # the first block carries warm-up costs: grow, measure from the next one
            self._block = 10 * n
        self._last_time = now
        if "train/relative_error" in metrics:
            self._update_gram_safety(metrics["train/relative_error"])
        for key in ("train/loss", "train/relative_error", "online/loss", "online/relative_error"):
            if key in metrics:  # the progress bar and callbacks (early stopping) read these
                self.log(key, metrics[key], prog_bar=True, logger=False, on_step=True, batch_size=1)
        if self.grid.due(step) or self._ending():
            self.grid.add(step, self._logged(metrics))
            self._last_point = step
        self.grid.flush(self.loggers)

    def _ending(self) -> bool:
        return bool(self.trainer.should_stop) or 0 < self.trainer.max_steps <= self.global_step

    def _logged(self, metrics: dict[str, Tensor]) -> dict[str, Tensor]:
        """The metrics worth a curve: no term of weight 0, no negative share of factors kept >= 0."""
        skip = {name for name, weight, _ in self.loss_terms.penalties(self.W, self.H) if not weight}
        if self.hparams.project or self._closed_form:
            skip |= {f"{A}_neg_{stat}" for A in "WH" for stat in ("fraction", "mean")}
        return {k: v for k, v in metrics.items() if k.rpartition("/")[2] not in skip}

    def _advance_global_step(self, n: int) -> None:
        # The raw optimizer bypasses LightningOptimizer.step (and its per-call hooks), so
        # count the n updates in the progress tracker that trainer.global_step reads.
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        for tracker in (progress.total, progress.current):
            tracker.ready += n
            tracker.completed += n

    def _diverged(self, losses: Tensor | None, start_step: int, W0: Tensor, H0: Tensor) -> None:
        if losses is not None and losses.dim() == 2:  # restarts: the block failed if all did
            losses = losses.nan_to_num(nan=float("inf")).min(dim=1).values
        if losses is None:  # closed-form solvers keep no per-update losses: blame the block's end
            losses = torch.full((self.global_step - start_step,), float("nan"))
        bad = (~torch.isfinite(losses)).nonzero()
        offset = int(bad[0]) if len(bad) else len(losses) - 1
        step = start_step + offset + 1
        value = float(losses[offset]) if len(bad) else float("nan")
        lr = self.optimizers().optimizer.param_groups[0].get("lr")
        hint = f"lower the learning rate (e.g. optimizer.lr={lr / 10:g})" if lr else "check X for extreme values"
        raise DivergenceError(
            f"the loss became {value} at update {step}; {hint}"
            + ("" if self.hparams.project else ", or set model.project=true")
            + ".",
            step=step,
            W=to_numpy(self._whole(W0 if W0.dim() == 2 else W0[self._best()])),
            H=to_numpy(H0 if H0.dim() == 2 else H0[self._best()]),
        )

    def _update_gram_safety(self, rel_err: Tensor) -> None:
        eps = torch.finfo(self.W.dtype).eps
        dense = self.X is not None and self.Xt is None and self.mask is None
        if self.streamed:
            dense = not (self._stream_masked or self._stream_sparse)
        if self.hparams.loss_form == "auto" and dense:
            # Gram-form cancellation: near sqrt(eps) relative error, switch to the residual.
            self._gram_safe = bool(rel_err > _GRAM_SAFETY * math.sqrt(eps))
            # the error may fall 10x within a block: its points switch a decade early
            self._gram_points = bool(rel_err > 10 * _GRAM_SAFETY * math.sqrt(eps))

    # ---------------------------------------------------------------- metrics
    @torch.no_grad()
    def compute_metrics(
        self, sq: Tensor | None = None, factors: tuple[Tensor, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """Objective terms, relative error, RMSE and factor statistics of the best restart.

        The loss is the training objective; the errors and sparsity are those of the factors
        a user gets (clamped at 0 under ``project=false``), the negative shares those of the
        trained ones. Everything stays on the device; with restarts, ``restarts/loss_<r>``
        logs each one.
        ``sq`` is the squared error of ``factors`` (default: the current W, H) when known.
        """
        sq = self._sq_error(exact=True) if sq is None else sq  # (r,): the residual form on dense X
        W, H = factors or (self.W.detach(), self.H.detach())
        div = None if self.beta is None else self._data_term(factors=(W, H))
        loss, terms = self.objective(sq=sq if div is None else div, factors=(W, H))
        per_restart = {"train/loss": loss}
        per_restart.update({f"train/{name}": value for name, value in terms.items()})
        reported = self.reported_factors(W, H)
        if reported[0] is not W:  # the errors of the factors a user gets, clamped at 0
            sq = sq_error(self.blocks(), *reported, gram_form=False, sum_ranks=self.sum_ranks)
        per_restart.update(self._errors(sq, div))
        for name, A, R in (("W", W, reported[0]), ("H", H, reported[1])):
            whole = self.shard if name == "W" else None  # W's rows are sharded under DDP
            per_restart.update({f"factors/{name}_{k}": v for k, v in factor_stats(A, R, whole).items()})
        # the best restart has the lowest finite loss; NaN everywhere means all diverged
        if loss.dim() == 0:
            return per_restart
        best = torch.nan_to_num(loss.detach(), nan=float("inf")).argmin()
        self._best_index = best
        metrics = {key: value[best] for key, value in per_restart.items()}
        metrics.update({f"restarts/loss_{r}": loss[r] for r in range(len(loss))})
        return metrics

    def _best(self) -> int:
        return int(getattr(self, "_best_index", 0))

    def final_metric_names(self, held_out: bool = False) -> set[str]:
        """Names of the numbers a run writes to metrics.json (checked before training)."""
        names = {"loss", "reconstruction", "relative_error", "rmse", "divergence", "steps", "updates_per_sec"}
        names |= {name for name, weight, _ in self.loss_terms.penalties(self.W, self.H) if weight}
        names |= {f"{A}_{stat}" for A in "WH" for stat in ("neg_fraction", "neg_mean", "sparsity")}
        if self.hparams.restarts > 1:
            names |= {"best_restart"} | {f"loss_{r}" for r in range(self.hparams.restarts)}
        if held_out:
            names |= {"val_relative_error", "val_rmse", "val_divergence"}
        return names

    @torch.no_grad()
    def validation_metrics(self) -> dict[str, Tensor]:
        """``val/relative_error``, ``val/rmse`` and ``val/divergence`` of the best restart on the held-out entries.

        The divergence is the training loss's (1/2 the squared error for the Frobenius losses).
        """
        if self.val_vals is None:
            return {}
        W, H = (A.to(self.val_vals.dtype) for A in self.best_factors(local=True))
        sq = torch.zeros((), dtype=torch.float64, device=W.device)
        div = torch.zeros((), dtype=torch.float64, device=W.device)
        chunk = max(1, 2**24 // max(1, W.shape[-1]))  # bounds the (chunk, k) gather
        for start in range(0, len(self.val_vals), chunk):
            rows, cols, vals = (A[start : start + chunk] for A in (self.val_rows, self.val_cols, self.val_vals))
            pred = predict_observed(rows, cols, W, H)  # one gather serves both
            sq += ((vals - pred) ** 2).sum().double()
            if self.beta is not None:
                div += elementwise(vals, pred, self.beta).sum().double()
        ref = (self.val_vals.double() ** 2).sum()
        count = torch.tensor(float(len(self.val_vals)), dtype=torch.float64, device=W.device)
        if self.shard is not None:  # every rank's held-out entries
            sq, div, ref, count = self.shard.sum({"sq": sq, "div": div, "ref": ref, "n": count}).values()
        return {
            "val/relative_error": relative_error(sq, ref),
            "val/rmse": torch.sqrt(sq.clamp_min(0) / count),
            "val/divergence": 0.5 * sq if self.beta is None else div,
        }

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        """Score the current factors on the held-out entries (``data.holdout``)."""
        metrics = self.validation_metrics()
        for key, value in metrics.items():  # for early stopping and the progress bar
            self.log(key, value, prog_bar=key == "val/relative_error", logger=False, batch_size=1)
        if self.grid.due(self.global_step) or self._ending():  # a point of the curves
            self.grid.add(self.global_step, metrics)
            self.grid.flush(self.loggers)
            self._last_val_point = self.global_step

    def on_train_start(self) -> None:
        """Start the clock (``updates_per_sec``) and the curves' grid; warn of an lr too small for X."""
        if self.streamed and self.trainer.num_training_batches != len(self.trainer.datamodule.row_blocks()):
            raise NMFInputError(
                f"a pass over X takes all its {len(self.trainer.datamodule.row_blocks())} row blocks, but the "
                f"trainer runs {self.trainer.num_training_batches} per epoch; leave trainer.limit_train_batches unset."
            )
        self._fit_start = (time.perf_counter(), self.global_step)
        self._whole_W = None  # W changes from here: gathered again at the end
        if self.shard is not None:  # what scale-out costs, from here
            self._comm_start = (self.shard.sent_bytes, self.shard.seconds)
        self._grid = UpdateGrid(self.trainer.log_every_n_steps)
        self._last_point = self._last_val_point = self.global_step  # a resumed run's curves go on from here
        if self.global_step:
            restart_curves(self.loggers, self.global_step + 1)
        self._warn_small_lr()

    def _lr_reach(self) -> tuple[int, float]:
        """Updates left in the run, and the scale of the factors (the larger RMS of W and H) an lr must cover."""
        updates = self.trainer.max_steps - self.global_step if self.trainer.max_steps > 0 else 0
        with torch.no_grad():
            sums = {name: A.double().pow(2).sum() for name, A in (("W", self.W), ("H", self.H))}
            if self.shard is not None:  # W's rows are sharded: its mean square over every rank
                sums["W"] = self.shard.sum({"W": sums["W"]})["W"]
            rows = self.W.shape[-2] if self.shard is None else self.shard.n
            sizes = {"W": self.W.numel() // max(self.W.shape[-2], 1) * rows, "H": self.H.numel()}
            scale = max(math.sqrt(float(sums[name]) / max(sizes[name], 1)) for name in sums)
        return updates, scale

    def _auto_lr(self) -> float:
        """``lr: auto``: 1e-3, unless 1e-3 per update cannot cover the factors' scale in the run's updates."""
        updates, scale = self._lr_reach()
        lr = AUTO_LR if updates <= 0 or AUTO_LR * updates >= scale else scale / 100
        self._auto_lr_chosen = lr
        log.info("optimizer.lr=auto: %g (factors at scale %.3g, %d updates)", lr, scale, updates)
        return lr

    def _warn_small_lr(self) -> None:
        """Adam-like steps move an entry by about lr per update, whatever the gradient's size.

        When lr x updates cannot even cover the scale of the factors (large-valued X), the
        run ends far from a fit; say so now rather than leave a poor relative error.
        """
        optimizer = self.optimizers().optimizer
        if not isinstance(optimizer, _ADAPTIVE):
            return
        lr = float(optimizer.param_groups[0]["lr"])
        auto = self._auto_lr_chosen == lr
        updates, scale = self._lr_reach()
        if updates > 0 and lr * updates < scale:
            warnings.warn(
                f"optimizer.lr={lr:g} moves a factor entry by about {lr:g} per update, at most "
                f"{lr * updates:.3g} over {updates} updates, but the factors are at scale {scale:.3g} "
                f"(X is large-valued): the run will end far from a fit. Use optimizer="
                f"{'hals' if self.beta is None else 'mu'}, or raise trainer.max_steps or the lr (e.g. "
                f"optimizer.lr={scale / max(min(updates, 100), 1):.2g}"
                f"{'; lr=auto took 1% of the scale, made for runs of 100 updates or more' if auto else ''}).",
                NMFWarning,
                stacklevel=2,
            )

    def on_train_end(self) -> None:
        """Keep the final metrics as plain floats (one sync) for metrics.json."""
        start, first = getattr(self, "_fit_start", (None, 0))
        rate = (self.global_step - first) / max(time.perf_counter() - start, 1e-9) if start is not None else None
        metrics = self.compute_metrics()  # (a streamed X is read once more for the final error)
        metrics.update(self.validation_metrics())
        if self.shard is not None:  # the factors a user gets: all of W, in row order
            self._whole_W = self._whole(self.W.detach())
        restored = getattr(self, "restored_from_step", None) is not None  # these factors are of an earlier check
        if getattr(self, "_last_point", self.global_step) < self.global_step and not restored:  # ended off the grid
            self.grid.add(self.global_step, self._logged(metrics))
        held_out = {k: v for k, v in metrics.items() if k.startswith("val/")}
        if held_out and getattr(self, "_last_val_point", self.global_step) < self.global_step and not restored:
            self.grid.add(self.global_step, held_out)  # the last validation check came before the end
        self.grid.flush(self.loggers)
        final = {k: float(v) for k, v in metrics.items()}
        final["steps"] = int(self.global_step)
        if rate is not None:
            final["updates_per_sec"] = rate
        if self.shard is not None and start is not None and self.global_step > first:
            sent, seconds = self.shard.sent_bytes - self._comm_start[0], self.shard.seconds - self._comm_start[1]
            final["ddp_ranks"] = self.shard.world
            final["comm_bytes_per_update"] = sent / (self.global_step - first)
            final["comm_time_share"] = seconds / max(time.perf_counter() - start, 1e-9)
        if self.hparams.restarts > 1:
            final["best_restart"] = self._best()
        self.final_metrics = final
        if not self.hparams.project and not self._closed_form:
            negs = {n: final[f"factors/{n}_neg_fraction"] for n in ("W", "H")}
            if any(v > 0 for v in negs.values()):
                warnings.warn(
                    f"the trained factors have negative entries (W {negs['W']:.1%}, H {negs['H']:.1%}); "
                    "factors.npz and the errors reported use them clamped at 0. Set model.project=true "
                    "or raise model.lam to train factors that need no clamping.",
                    NMFWarning,
                    stacklevel=2,
                )

    def transform(self, X: np.ndarray | sp.spmatrix, solver: str | None = None, **options) -> np.ndarray:
        """W >= 0 for new rows X (same columns) with this model's H held fixed, on the model's loss.

        ``solver`` defaults to HALS for the Frobenius losses and MU for a beta-divergence.
        """
        if self.beta is not None:
            options.setdefault("beta", self.beta)
        return transform(X, to_numpy(self.best_factors(local=True)[1]), solver, **options)

    def best_factors(self, restart: int | None = None, raw: bool = False, local: bool = False) -> tuple[Tensor, Tensor]:
        """W (n, k) and H (k, m) of the best (or the given) restart, detached, on their device.

        Clamped at 0 when training let them go negative (``project=false``), unless ``raw``.
        Under DDP, all of W once training has ended (gathered from every rank; before, see
        :meth:`whole_factors`); ``local`` gives this rank's rows.
        """
        W, H = self.W.detach(), self.H.detach()
        if self.shard is not None and not local:
            if self._whole_W is None:
                raise RuntimeError(
                    "under DDP each rank holds its own rows of W until training ends; whole_factors() gathers "
                    "them (every rank must call it), best_factors(local=True) gives this rank's."
                )
            W = self._whole_W
        if W.dim() == 3:
            r = self._best() if restart is None else restart
            W, H = W[r], H[r]
        return (W, H) if raw else self.reported_factors(W, H)

    def whole_factors(self) -> tuple[Tensor, Tensor]:
        """The best restart's W and H, all of W's rows: under DDP every rank must call it (W is gathered)."""
        W, H = self.best_factors(local=True)
        return self._whole(W), H

    def _whole(self, W: Tensor) -> Tensor:
        """All rows of a W of this rank's rows (itself in one process); every rank calls it under DDP."""
        return W if self.shard is None else self.shard.gather_rows(W)

    def factors(self, restart: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """W (n, k) and H (k, m) of the best (or the given) restart as numpy, in the trained dtype.

        Clamped at 0 under ``project=false``; bf16/fp16 factors come back as float32.
        """
        W, H = self.best_factors(restart)
        return to_numpy(W), to_numpy(H)


def _batch(restarts: int) -> tuple[int, ...]:
    """Leading batch shape of the factors: none for a single start, (r,) for r restarts."""
    return () if restarts == 1 else (restarts,)


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise NMFInputError(f"{key}={value!r} is not supported; choose one of {choices}.")


def _nbytes(A: Tensor) -> int:
    """Bytes a dense or sparse (CSR, COO) tensor holds."""
    if A.layout == torch.sparse_csr:
        parts = (A.values(), A.col_indices(), A.crow_indices())
    elif A.layout == torch.sparse_coo:
        parts = (A._values(), A._indices())
    else:
        parts = (A,)
    return sum(p.numel() * p.element_size() for p in parts)
