"""NMFModule: W and H as parameters of a LightningModule, trained by manual optimization.

Each ``training_step`` runs a block of ``inner_steps`` optimizer updates on the full
matrix with no host synchronisation inside the block, then computes the metrics once
on the device and logs them. ``trainer.max_steps`` counts updates, not blocks.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from functools import partial

import lightning as L
import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn

from nmf_lightning.data.holdout import Holdout
from nmf_lightning.data.sources import Matrix
from nmf_lightning.init import INITS, SVD_INITS, initialize
from nmf_lightning.objective import (
    LOSSES,
    frobenius_sq,
    l1,
    l2,
    l21,
    negativity_penalty,
    reconstruction,
    relative_error,
    sq_error_gram,
    sq_error_observed,
    sq_error_residual,
    transpose_sparse,
)
from nmf_lightning.solvers import Solver, Target
from nmf_lightning.validation import NMFInputError, check_rank

LOSS_FORMS = ("auto", "residual", "gram")
_PRECISION_DTYPES = {
    "64": torch.float64,
    "64-true": torch.float64,
    "bf16-true": torch.bfloat16,
    "16-true": torch.float16,
}
#: auto mode leaves the Gram form when the relative error falls below this many sqrt(eps)
_GRAM_SAFETY = 10.0
#: masked X with at most this fraction observed is kept as (row, col, value) triplets
_OBSERVED_FRACTION = 0.1
#: optimizers whose steps are about lr in size whatever the gradient (see _warn_small_lr)
_ADAPTIVE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adamax, torch.optim.NAdam)
#: inner_steps=auto sizes each block of updates to take about this long (one log point)
_BLOCK_SECONDS = 1.0


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
        seed: int = 0,
    ):
        super().__init__()
        check_rank(rank)
        _check_choice("model.loss", loss, LOSSES)
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
        if int(restarts) > 1 and init in ("nndsvd", "nndsvda"):
            warnings.warn(
                f"model.init={init} is deterministic, so the {restarts} restarts start (and end) alike; "
                "use model.init=random or nndsvdar for different starts.",
                UserWarning,
                stacklevel=2,
            )
        self.save_hyperparameters(ignore=["optimizer"], logger=False)
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, lr=1e-3, betas=(0.9, 0.9))
        self.automatic_optimization = False
        # (n, k) and (k, m); with restarts a leading batch dimension: (r, n, k), (r, k, m)
        self.W = nn.Parameter(torch.empty(*_batch(restarts), 0, rank))
        self.H = nn.Parameter(torch.empty(*_batch(restarts), rank, 0))
        self.matrix: Matrix | None = None
        self.final_metrics: dict[str, float] = {}
        self.stop_reason = "max_steps"
        self._gram_safe = True
        self._last_time: float | None = None
        self._block = 1  # current block size under inner_steps=auto
        self._tol_prev: Tensor | None = None  # objective at the last convergence check
        self._train_loss: Callable[[], Tensor] | None = None  # built (and compiled) once

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
        if "16" in precision and sp.issparse(datamodule.matrix.X):
            raise NMFInputError(
                f"trainer.precision={precision} has no sparse matrix kernels; X is sparse, so use "
                "trainer.precision=32-true (or 64-true)."
            )
        self.set_matrix(datamodule.matrix, dtype=_PRECISION_DTYPES.get(precision), holdout=datamodule.holdout)
        self.holdout_spec = {"fraction": datamodule.holdout_fraction, "seed": datamodule.holdout_seed}

    def set_matrix(self, matrix: Matrix, dtype: torch.dtype | None = None, holdout: Holdout | None = None) -> None:
        """Store X (and the held-out entries) as non-checkpointed buffers; draw the initial factors."""
        dtype = dtype or torch.float32
        n, m = matrix.shape
        k = self.hparams.rank
        check_rank(k, (n, m))
        if self.hparams.init in SVD_INITS and k > min(n, m):
            raise NMFInputError(
                f"model.init={self.hparams.init} needs model.rank <= min(n, m) = {min(n, m)}, "
                f"got {k}; lower the rank or use model.init=random."
            )
        X, mask = matrix_to_tensor(matrix.X, dtype)
        sparse = X.layout == torch.sparse_csr
        observed = None  # (rows, cols, values) when only the observed entries are kept
        if sparse and matrix.unstored_missing:
            counts = X.crow_indices().diff()
            rows = torch.repeat_interleave(torch.arange(n), counts)
            observed = (rows, X.col_indices(), X.values())
        elif mask is not None and mask.float().mean() <= _OBSERVED_FRACTION:
            rows, cols = mask.nonzero(as_tuple=True)
            observed = (rows, cols, X[rows, cols])
        n_obs = len(observed[2]) if observed is not None else int(mask.sum()) if mask is not None else n * m
        if sparse and self.hparams.loss_form == "residual":
            warnings.warn(
                "model.loss_form=residual densifies the sparse X at every update; loss_form=auto keeps it sparse.",
                UserWarning,
                stacklevel=2,
            )
        if (mask is not None or observed is not None) and self.hparams.loss_form == "gram":
            raise NMFInputError(
                "model.loss_form=gram cannot skip missing entries, and X has some (NaN entries, "
                "entries held out by data.holdout, or data.unstored=missing); use model.loss_form=auto or residual."
            )
        self.matrix = matrix
        self.n_obs = n_obs
        self.register_buffer("X_sq", frobenius_sq(X, mask).to(dtype), persistent=False)
        Xf = X if X.dtype in (torch.float32, torch.float64) else X.float()
        pairs = [
            initialize(
                Xf,
                k,
                self.hparams.init,
                generator=torch.Generator().manual_seed(int(self.hparams.seed) + r),
                mask=mask,
                scale=self.hparams.init_scale,
                n_obs=n_obs,
            )
            for r in range(self.hparams.restarts)
        ]
        if observed is not None:  # the triplets replace X, its transpose and the mask
            X = mask = None
            sparse = False
        self.register_buffer("X", X, persistent=False)
        self.register_buffer("Xt", transpose_sparse(X) if sparse else None, persistent=False)
        self.register_buffer("mask", mask, persistent=False)
        for name, value in zip(("obs_rows", "obs_cols", "obs_vals"), observed or (None,) * 3, strict=True):
            self.register_buffer(name, value, persistent=False)
        held = None
        if holdout is not None:
            held = (torch.from_numpy(holdout.rows).long(), torch.from_numpy(holdout.cols).long())
            held += (torch.from_numpy(holdout.values).to(torch.promote_types(dtype, torch.float32)),)
        for name, value in zip(("val_rows", "val_cols", "val_vals"), held or (None,) * 3, strict=True):
            self.register_buffer(name, value, persistent=False)
        W = torch.stack([W for W, _ in pairs]).to(dtype)
        H = torch.stack([H for _, H in pairs]).to(dtype)
        if self.hparams.restarts == 1:  # plain 2-D factors: no batch overhead in the hot loop
            W, H = W[0], H[0]
        self.W = nn.Parameter(W)
        self.H = nn.Parameter(H)
        self._train_loss = None

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Shape W and H like the checkpoint's before Lightning copies the values in."""
        state = checkpoint["state_dict"]
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
        self._train_loss = None  # it holds the old parameters
        self.W = nn.Parameter(torch.empty_like(state["W"]))
        self.H = nn.Parameter(torch.empty_like(state["H"]))
        self._best_index = torch.tensor(checkpoint.get("best_restart", 0))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record which restart is best, so a loaded module returns the same factors."""
        checkpoint["best_restart"] = self._best()
        checkpoint["holdout"] = getattr(self, "holdout_spec", {"fraction": 0.0, "seed": 0})

    # ------------------------------------------------------------- objective
    def objective(self, all_terms: bool = False, sq: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and its unweighted terms, one value per restart (shape (r,)).

        ``all_terms`` adds the terms whose weight is 0 (for logging); ``sq`` is a squared
        error already computed for the current factors.
        """
        sq = self._sq_error(self.W, self.H) if sq is None else sq
        terms = {"reconstruction": reconstruction(sq, self.n_obs, self.hparams.loss)}
        total = terms["reconstruction"]
        for name, weight, fn, args in self._penalties():
            if weight or all_terms:
                terms[name] = fn(*args)
            if weight:
                total = total + weight * terms[name]
        return total, terms

    def _penalties(self) -> list[tuple[str, float, Callable[..., Tensor], tuple[Tensor, ...]]]:
        """(name, weight, function, arguments) of every penalty term of the objective."""
        hp, W, H = self.hparams, self.W, self.H
        return [
            ("penalty", float(hp.lam), negativity_penalty, (W, H)),
            ("l1_W", float(hp.l1_W), l1, (W,)),
            ("l1_H", float(hp.l1_H), l1, (H,)),
            ("l2_W", float(hp.l2_W), l2, (W,)),
            ("l2_H", float(hp.l2_H), l2, (H,)),
            ("l21_H", float(hp.l21_H), l21, (H,)),
        ]

    def _loss_fn(self) -> Callable[[], Tensor]:
        """The training loss as one closure over the weighted terms only: the hot loop's body.

        Same value as ``objective()[0]``, without its per-call bookkeeping; built once, and
        with ``model.compile=true`` compiled by ``torch.compile`` (fusing the element-wise
        penalty and loss kernels; it pays off for small, launch-bound problems on a GPU).
        """
        if self._train_loss is not None:
            return self._train_loss
        W, H, kind, n_obs = self.W, self.H, self.hparams.loss, self.n_obs
        active = [(weight, fn, args) for _, weight, fn, args in self._penalties() if weight]

        def loss() -> Tensor:
            total = reconstruction(self._sq_error(W, H), n_obs, kind)
            for weight, fn, args in active:
                total = total + weight * fn(*args)
            return total

        self._train_loss = torch.compile(loss) if self.hparams.compile else loss
        return self._train_loss

    def _sq_error(self, W: Tensor, H: Tensor, exact: bool = False) -> Tensor:
        """Squared error in the training form; ``exact`` avoids the Gram form on dense X."""
        if self.obs_vals is not None:
            return sq_error_observed(self.obs_rows, self.obs_cols, self.obs_vals, W, H)
        sparse_gram = self.Xt is not None and (exact or self.hparams.loss_form != "residual")
        if sparse_gram or (self._use_gram() and not exact):
            return sq_error_gram(self.X, W, H, self.X_sq, self.Xt)
        return sq_error_residual(self.X, W, H, self.mask)

    def target(self) -> Target:
        """X as the closed-form solvers read it."""
        return Target(self.X, self.Xt, self.mask, self.obs_rows, self.obs_cols, self.obs_vals, self.matrix.shape)

    def _use_gram(self) -> bool:
        form = self.hparams.loss_form
        if form != "auto":
            return form == "gram"
        if self.mask is not None:
            return False
        return self.Xt is not None or self._gram_safe

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

    def _resize_block(self, n: int, seconds: float) -> None:
        if self.hparams.inner_steps == "auto" and seconds > 0:
            target = n * _BLOCK_SECONDS / seconds
            self._block = int(min(max(target, 1), 10 * n, 100_000))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Build the configured optimizer (or closed-form solver) over W and H."""
        optimizer = self.optimizer_factory([self.W, self.H])
        if isinstance(optimizer, Solver):
            name = type(optimizer).__name__.lower()
            if self.hparams.l21_H:
                raise NMFInputError(
                    f"optimizer={name} has no closed form for the L2,1 penalty (model.l21_H="
                    f"{self.hparams.l21_H}); use a gradient optimizer such as optimizer=adam."
                )
            if self.obs_vals is not None and not optimizer.supports_triplets:
                raise NMFInputError(
                    f"optimizer={name} needs a dense mask, but X is kept as observed entries "
                    "(ratings or mostly-missing data); use optimizer=mu, als or a gradient optimizer."
                )
            if self.mask is not None and not optimizer.supports_mask:
                raise NMFInputError(
                    f"optimizer={name} cannot skip missing entries, and X has some (NaN entries or "
                    "entries held out by data.holdout); use optimizer=hals, mu, als or a gradient optimizer."
                )
            hp = self.hparams
            if (hp.l1_W or hp.l1_H or hp.l2_W or hp.l2_H) and not optimizer.supports_penalties:
                raise NMFInputError(
                    f"optimizer={name} takes no L1/L2 penalty (model.l1_W, l1_H, l2_W, l2_H); use hals, mu or als."
                )
        return optimizer

    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        """Run one block of updates, then check, measure and log once."""
        start_step = self.global_step
        n = self.inner_steps
        if self.trainer.max_steps > 0:
            n = min(n, self.trainer.max_steps - start_step)
        W0, H0 = self.W.detach().clone(), self.H.detach().clone()
        losses, n = self._run_block(self.optimizers().optimizer, n)
        self._advance_global_step(n)
        metrics = self.compute_metrics()
        if not bool(torch.isfinite(metrics["train/loss"])):  # sync point, once per block
            if losses is not None and losses.dim() == 2:  # restarts: the block failed if all did
                losses = losses.nan_to_num(nan=float("inf")).min(dim=1).values
            self._diverged(losses, start_step, W0, H0)
        now = time.perf_counter()
        if self._last_time is not None:
            metrics["perf/updates_per_sec"] = torch.tensor(n / max(now - self._last_time, 1e-9))
            self._resize_block(n, now - self._last_time)
        else:  # the first block carries warm-up costs: grow, measure from the next one
            self._block = 10 * n
        self._last_time = now
        self._update_gram_safety(metrics["train/relative_error"])
        self.log("step", float(self.global_step), on_step=True, batch_size=1)
        for key in ("train/loss", "train/relative_error"):
            self.log(key, metrics.pop(key), prog_bar=True, on_step=True, batch_size=1)
        self.log_dict(metrics, on_step=True, batch_size=1)

    def _run_block(self, optimizer: torch.optim.Optimizer, n: int) -> tuple[Tensor | None, int]:
        """Run up to ``n`` updates; with ``model.tol`` stop early once the objective settles.

        The convergence test runs every ``tol_window`` updates, counted from the start of
        training (so where a run stops does not depend on block sizes): the relative
        change of the objective over the window below ``tol`` ends the run.
        """
        tol, window = self.hparams.tol, int(self.hparams.tol_window)
        if not tol:
            return self._run_updates(optimizer, n), n
        pieces, done = [], 0
        while done < n:
            w = min(window - (self.global_step + done) % window, n - done)
            pieces.append(self._run_updates(optimizer, w))
            done += w
            if (self.global_step + done) % window:
                continue
            with torch.no_grad():
                cur = self.objective()[0].detach().min()
            prev, self._tol_prev = self._tol_prev, cur
            if prev is not None and bool((prev - cur).abs() <= tol * prev.abs()):  # sync, once per window
                self.stop_reason = (
                    f"converged: the objective changed by less than model.tol={tol} (relative) "
                    f"over the last {window} updates"
                )
                self.trainer.should_stop = True
                break
        losses = None if any(p is None for p in pieces) else torch.cat(pieces)
        return losses, done

    def _run_updates(self, optimizer: torch.optim.Optimizer, n: int) -> Tensor | None:
        """``n`` optimizer updates; the per-update losses stay on the device."""
        if isinstance(optimizer, Solver):
            target, hp = self.target(), self.hparams
            l1_, l2_ = (hp.l1_W, hp.l1_H), (hp.l2_W, hp.l2_H)
            for _ in range(n):
                optimizer.update(target, self.W, self.H, l1_, l2_)
            return None
        losses = torch.empty(n, *_batch(self.hparams.restarts), device=self.W.device, dtype=torch.float32)
        loss_fn = self._loss_fn()
        for i in range(n):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn()  # (r,): restarts are independent, so sum their losses
            (loss.sum() if loss.dim() else loss).backward()
            optimizer.step()
            if self.hparams.project:
                self._project()
            losses[i] = loss.detach()
        return losses

    @torch.no_grad()
    def _project(self) -> None:
        self.W.clamp_(min=0)
        self.H.clamp_(min=0)

    def _advance_global_step(self, n: int) -> None:
        # The raw optimizer bypasses LightningOptimizer.step (and its per-call hooks), so
        # count the n updates in the progress tracker that trainer.global_step reads.
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        for tracker in (progress.total, progress.current):
            tracker.ready += n
            tracker.completed += n

    def _diverged(self, losses: Tensor | None, start_step: int, W0: Tensor, H0: Tensor) -> None:
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
            W=_to_numpy(W0 if W0.dim() == 2 else W0[self._best()]),
            H=_to_numpy(H0 if H0.dim() == 2 else H0[self._best()]),
        )

    def _update_gram_safety(self, rel_err: Tensor) -> None:
        eps = torch.finfo(self.W.dtype).eps
        if self.hparams.loss_form == "auto" and self.X is not None and self.Xt is None and self.mask is None:
            # Gram-form cancellation: near sqrt(eps) relative error, switch to the residual.
            self._gram_safe = bool(rel_err > _GRAM_SAFETY * math.sqrt(eps))

    # ---------------------------------------------------------------- metrics
    @torch.no_grad()
    def compute_metrics(self) -> dict[str, Tensor]:
        """Objective terms, relative error, RMSE and factor statistics of the best restart.

        Everything stays on the device; with restarts, ``restarts/loss_<r>`` logs each one.
        """
        sq = self._sq_error(self.W, self.H, exact=True)  # (r,): the residual form on dense X
        loss, terms = self.objective(all_terms=True, sq=sq)
        per_restart = {"train/loss": loss}
        per_restart.update({f"train/{name}": value for name, value in terms.items()})
        per_restart["train/relative_error"] = relative_error(sq.double(), self.X_sq.double())
        per_restart["train/rmse"] = torch.sqrt(sq.double().clamp_min(0) / self.n_obs)
        for name, A in (("W", self.W.detach()), ("H", self.H.detach())):
            per_restart[f"factors/{name}_neg_fraction"] = (A < 0).float().mean(dim=(-2, -1))
            per_restart[f"factors/{name}_neg_mean"] = torch.clamp(-A, min=0).float().mean(dim=(-2, -1))
            top = A.abs().amax(dim=(-2, -1), keepdim=True)
            per_restart[f"factors/{name}_sparsity"] = (A.abs() <= 1e-6 * top).float().mean(dim=(-2, -1))
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
        names = {"loss", "reconstruction", "relative_error", "rmse", "steps", "updates_per_sec"}
        names |= {name for name, *_ in self._penalties()}
        names |= {f"{A}_{stat}" for A in "WH" for stat in ("neg_fraction", "neg_mean", "sparsity")}
        if self.hparams.restarts > 1:
            names |= {"best_restart"} | {f"loss_{r}" for r in range(self.hparams.restarts)}
        if held_out:
            names |= {"val_relative_error", "val_rmse"}
        return names

    @torch.no_grad()
    def validation_metrics(self) -> dict[str, Tensor]:
        """``val/relative_error`` and ``val/rmse`` of the best restart on the held-out entries."""
        if self.val_vals is None:
            return {}
        W, H = (A.to(self.val_vals.dtype) for A in self.best_factors())
        sq = torch.zeros((), dtype=torch.float64, device=W.device)
        chunk = max(1, 2**24 // max(1, W.shape[-1]))  # bounds the (chunk, k) gather
        for start in range(0, len(self.val_vals), chunk):
            part = slice(start, start + chunk)
            sq += sq_error_observed(self.val_rows[part], self.val_cols[part], self.val_vals[part], W, H).double()
        ref = (self.val_vals.double() ** 2).sum()
        return {
            "val/relative_error": relative_error(sq, ref),
            "val/rmse": torch.sqrt(sq.clamp_min(0) / len(self.val_vals)),
        }

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        """Score the current factors on the held-out entries (``data.holdout``)."""
        metrics = self.validation_metrics()
        self.log("step", float(self.global_step), batch_size=1)  # x axis: updates, as in training
        self.log("val/relative_error", metrics.pop("val/relative_error"), prog_bar=True, batch_size=1)
        self.log_dict(metrics, batch_size=1)

    def on_train_start(self) -> None:
        """Start the clock for the run's mean ``updates_per_sec``; warn of an lr too small for X."""
        self._fit_start = (time.perf_counter(), self.global_step)
        self._warn_small_lr()

    def _warn_small_lr(self) -> None:
        """Adam-like steps move an entry by about lr per update, whatever the gradient's size.

        When lr x updates cannot even cover the scale of the factors (large-valued X), the
        run ends far from a fit; say so now rather than leave a poor relative error.
        """
        optimizer = self.optimizers().optimizer
        if not isinstance(optimizer, _ADAPTIVE):
            return
        lr = float(optimizer.param_groups[0]["lr"])
        updates = self.trainer.max_steps - self.global_step if self.trainer.max_steps > 0 else 0
        with torch.no_grad():
            scale = max(float(A.float().pow(2).mean().sqrt()) for A in (self.W, self.H))
        if updates > 0 and lr * updates < scale:
            warnings.warn(
                f"optimizer.lr={lr:g} moves a factor entry by about {lr:g} per update, at most "
                f"{lr * updates:.3g} over {updates} updates, but the factors are at scale {scale:.3g} "
                f"(X is large-valued): the run will end far from a fit. Raise the lr (e.g. "
                f"optimizer.lr={scale / 100:.2g}) or trainer.max_steps, or use optimizer=hals.",
                UserWarning,
                stacklevel=2,
            )

    def on_train_end(self) -> None:
        """Keep the final metrics as plain floats (one sync) for metrics.json."""
        metrics = self.compute_metrics()
        metrics.update(self.validation_metrics())
        final = {k: float(v) for k, v in metrics.items()}
        final["steps"] = int(self.global_step)
        start, first = getattr(self, "_fit_start", (None, 0))
        if start is not None:
            final["updates_per_sec"] = (self.global_step - first) / max(time.perf_counter() - start, 1e-9)
        if self.hparams.restarts > 1:
            final["best_restart"] = self._best()
        self.final_metrics = final
        if not self.hparams.project:
            negs = {n: final[f"factors/{n}_neg_fraction"] for n in ("W", "H")}
            if any(v > 0 for v in negs.values()):
                warnings.warn(
                    f"the factors keep negative entries (W {negs['W']:.1%}, H {negs['H']:.1%}); "
                    "set model.project=true or raise model.lam for strictly non-negative factors.",
                    UserWarning,
                    stacklevel=2,
                )

    def transform(self, X: np.ndarray | sp.spmatrix, solver: str = "hals", **options) -> np.ndarray:
        """W >= 0 for new rows X (same columns) with this model's H held fixed."""
        from nmf_lightning.transform import transform

        return transform(X, self.factors()[1], solver, **options)

    def best_factors(self, restart: int | None = None) -> tuple[Tensor, Tensor]:
        """W (n, k) and H (k, m) of the best (or the given) restart, detached, on their device."""
        W, H = self.W.detach(), self.H.detach()
        if W.dim() == 2:
            return W, H
        r = self._best() if restart is None else restart
        return W[r], H[r]

    def factors(self, restart: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """W (n, k) and H (k, m) of the best (or the given) restart as numpy, in the trained dtype.

        bf16/fp16 factors come back as float32.
        """
        W, H = self.best_factors(restart)
        return _to_numpy(W), _to_numpy(H)


def _batch(restarts: int) -> tuple[int, ...]:
    """Leading batch shape of the factors: none for a single start, (r,) for r restarts."""
    return () if restarts == 1 else (restarts,)


def _to_numpy(A: Tensor) -> np.ndarray:
    A = A.detach()
    if A.dtype in (torch.bfloat16, torch.float16):
        A = A.float()
    return A.cpu().numpy()


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise NMFInputError(f"{key}={value!r} is not supported; choose one of {choices}.")


def matrix_to_tensor(X: np.ndarray | sp.spmatrix, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """Dense X with NaN -> (X with 0 at NaN, observed mask); sparse X -> CSR tensor, no mask."""
    if sp.issparse(X):
        X = sp.csr_matrix(X)
        X.sum_duplicates()  # scipy's canonical CSR: the invariants torch would check hold
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
            Xt = torch.sparse_csr_tensor(
                torch.from_numpy(X.indptr.astype(np.int64)),
                torch.from_numpy(X.indices.astype(np.int64)),
                torch.from_numpy(X.data).to(dtype),
                size=X.shape,
                check_invariants=False,
            )
        return (
            Xt,
            None,
        )
    Xn = np.asarray(X, dtype=np.float64)
    missing = np.isnan(Xn)
    if missing.any():
        return torch.from_numpy(np.where(missing, 0.0, Xn)).to(dtype), torch.from_numpy(~missing)
    return torch.from_numpy(Xn).to(dtype), None
