"""NMFModule: W and H as parameters of a LightningModule, trained by the engine under manual optimization.

The module is glue: it hands the engine's :class:`~nmf_lightning.engine.Problem` what
Lightning gives it (the data, the device, the precision, the ranks) and hands Lightning
what it needs (parameters, an optimizer, steps, checkpoints, logged metrics). Each
``training_step`` runs a block of updates with no host sync inside, each a pass over X's
row blocks: one block held in memory, or blocks of ``data.batch_rows`` rows read in the
step (no trainer hooks per block). ``trainer.max_steps`` counts updates, and the
curves have a point every ``trainer.log_every_n_steps`` updates whatever the block sizes.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
import warnings
from collections.abc import Callable, Iterable
from functools import partial

import lightning as L
import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn

from nmf_lightning.consensus import Consensus
from nmf_lightning.console import NMFWarning
from nmf_lightning.curves import BlockSizer, UpdateGrid, restart_curves
from nmf_lightning.data.datamodule import NMFDataModule
from nmf_lightning.data.holdout import check_resumed
from nmf_lightning.data.rows import in_memory
from nmf_lightning.distributed import RowShard, gather_rows, keep_rows
from nmf_lightning.engine import DivergenceError, PassResult, Problem, Spec, Update
from nmf_lightning.internals import count_updates
from nmf_lightning.linalg import to_numpy
from nmf_lightning.objective import relative_error
from nmf_lightning.params import CLI_WORDS, Integer, check_params, one_of
from nmf_lightning.rank import RankResult, RankSearch, search
from nmf_lightning.recorder import Clamped, HeldOut, Recorder, final_names
from nmf_lightning.transform import transform
from nmf_lightning.validation import PRECISIONS, NMFInputError, check_checkpoint_factors, check_rank

log = logging.getLogger(__name__)

__all__ = ["DivergenceError", "NMFModule"]

#: the model's keys whose values differ from the engine's table (:data:`~nmf_lightning.params.CONSTRAINTS`):
#: inner_steps, a fixed number of updates per training_step or auto (blocks of about a second); rank, a
#: number or auto (chosen by held-out error, :mod:`nmf_lightning.rank`)
MODEL_CONSTRAINTS = {"inner_steps": one_of("auto", Integer(1)), "rank": one_of("auto", Integer(1))}
#: the 20 newsgroups notebook's optimizer, the default when none is given
DEFAULT_OPTIMIZER = partial(torch.optim.Adam, lr=1e-3, betas=(0.9, 0.9))


class NMFModule(L.LightningModule):
    """X ~ W H with W (n, k), H (k, m) trained on a penalised reconstruction loss.

    objective = reconstruction(loss) + lam * (mean(clamp(-W, 0)) + mean(clamp(-H, 0)))
                + l1_W * |W|_1 + l1_H * |H|_1 + l2_W/2 * ||W||^2 + l2_H/2 * ||H||^2
                + l21_H * mean_j |H[:, j]|_2

    (with ``l2_scale="count"`` each row's ||W_i||^2 and column's ||H_j||^2 weighed by its observed entries)

    ``biases`` models X_ij as mu + b_i + c_j + (W H)_ij (ratings): the global mean and the row
    and column biases are buffers ``mu`` (1, 1), ``b`` (n, 1) and ``c`` (1, m), fit in closed
    form in every update and shrunk by ``l2_bias`` (:mod:`~nmf_lightning.engine.biases`).

    ``optimizer`` is a factory ``params -> torch.optim.Optimizer`` (a Hydra ``_partial_``
    config; ``lr="auto"`` sizes it to the factors) or a closed-form solver; ``project``
    clamps W, H to >= 0 after every update; without it, ``lam_growth`` > 1 grows ``lam`` until
    the factors are non-negative to ``neg_tol``. ``restarts`` = r trains r initialisations
    (seeds seed, seed+1, ...) at once as one batched problem, W (r, n, k) and H (r, k, m),
    and keeps the one with the lowest loss. The other arguments are the engine's
    :class:`~nmf_lightning.engine.Spec`, and ``inner_steps`` the updates per ``training_step``.
    """

    def __init__(
        self,
        rank: int | str = 10,
        optimizer: Callable[[Iterable[Tensor]], torch.optim.Optimizer] | None = None,
        loss: str = "fro",
        beta: float | None = None,
        lam: float = 0.0,
        l1_W: float = 0.0,
        l1_H: float = 0.0,
        l2_W: float = 0.0,
        l2_H: float = 0.0,
        l2_scale: str = "none",
        l21_H: float = 0.0,
        biases: bool = False,
        l2_bias: float = 0.0,
        project: bool = True,
        lam_growth: float = 1.0,
        neg_tol: float = 1e-3,
        lam_every: int = 100,
        init: str = "random",
        init_scale: float = 0.01,
        loss_form: str = "auto",
        inner_steps: int | str = "auto",
        restarts: int = 1,
        consensus: bool = False,
        density_threshold: float = 0.5,
        neighbors: float = 0.3,
        consensus_refine: int = 0,
        rank_min: int = 2,
        rank_max: int = 20,
        rank_holdout: float = 0.1,
        rank_rule: str = "min",
        tol: float | None = 0.0,
        tol_window: int = 10,
        compile: bool = False,
        online: bool = False,
        forget: float = 0.7,
        seed: int = 0,
    ):
        super().__init__()
        self._checked = False  # check() ran against the data: setup need not warn again
        check_params({"inner_steps": inner_steps, "rank": rank}, MODEL_CONSTRAINTS, CLI_WORDS)
        search = {"rank_min": rank_min, "rank_max": rank_max, "rank_holdout": rank_holdout, "rank_rule": rank_rule}
        check_params(search, name=CLI_WORDS)
        #: rank=auto: where to look for the rank (chosen by :meth:`choose_rank` before training)
        self.rank_search = RankSearch(rank_min, rank_max, rank_holdout, rank_rule, seed) if rank == "auto" else None
        self.rank_result: RankResult | None = None
        rank = rank_min if rank == "auto" else rank
        self.spec = Spec(
            rank=rank, optimizer=optimizer or DEFAULT_OPTIMIZER, loss=loss, beta=beta, lam=lam, l1_W=l1_W,
            l1_H=l1_H, l2_W=l2_W, l2_H=l2_H, l2_scale=l2_scale, l21_H=l21_H, biases=biases, l2_bias=l2_bias,
            project=project, lam_growth=lam_growth,
            neg_tol=neg_tol, lam_every=lam_every, init=init, init_scale=init_scale, restarts=restarts,
            consensus=consensus, density_threshold=density_threshold, neighbors=neighbors,
            consensus_refine=consensus_refine, seed=seed,
            loss_form=loss_form, online=online, forget=forget, tol=tol, tol_window=tol_window, compile=compile,
        )  # fmt: skip
        self.spec.check(CLI_WORDS)  # before any data is read
        self.save_hyperparameters(ignore=["optimizer"], logger=False)
        self.automatic_optimization = False
        self.W, self.H = self._unsized_factors()
        self.problem: Problem | None = None
        self.recorder: Recorder | None = None
        self.matrix = None  # the datamodule's Matrix (its names, image shape)
        self.shard: RowShard | None = None  # this process's rows of X and W under DDP (trainer=ddp)
        self.streamed = False  # X is read in row blocks every pass (data.batch_rows)
        self.final_metrics: dict[str, float] = {}
        self.clamped: Clamped | None = None  # what clamping did to the final factors (project=false)
        self.consensus: tuple[Tensor, Tensor, Consensus] | None = None  # model.consensus: W, H and the clustering
        self.stop_reason = "max_steps"
        self.stop_signal: int | None = None  # a signal asked the run to stop (GracefulStop)
        self._update: Update | None = None  # built once per optimizer
        self._update_state: dict | None = None  # a checkpoint's update state, for the update built after loading
        self._whole_W: Tensor | None = None  # under DDP: all of W (every restart) gathered when training ends
        self._grid: UpdateGrid | None = None
        self._sizer: BlockSizer | None = None
        self._block_span = (0, 0)  # first and last update of the block under way
        self._last_time: float | None = None
        self._unlogged = 0  # updates since the last block end (train/updates_per_sec)

    def _unsized_factors(self) -> tuple[nn.Parameter, nn.Parameter]:
        """W and H of the spec's rank, before X gives their other sides (``setup``, or a checkpoint, sizes them).

        (n, k) and (k, m); with restarts a leading batch dimension: (r, n, k), (r, k, m).
        """
        batch, k = () if self.spec.restarts == 1 else (self.spec.restarts,), self.spec.rank
        return nn.Parameter(torch.empty(*batch, 0, k)), nn.Parameter(torch.empty(*batch, k, 0))

    #: what DDP must neither verify nor broadcast: W's rows and the row biases b differ between ranks
    #: (see ShardedDDP); DDP checks a root module's parameters under two names, "W" and ".W"
    _ddp_params_and_buffers_to_ignore = ("W", ".W", "b", ".b")

    # ------------------------------------------------------------------ data
    def setup(self, stage: str | None = None) -> None:
        """Set the engine's problem up from the datamodule's X and the trainer; draw the initial factors."""
        if self.problem is not None:
            return
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "matrix"):
            raise TypeError("NMFModule trains on an NMFDataModule: trainer.fit(module, datamodule=...).")
        dm.setup(stage)
        precision, device = str(self.trainer.precision), self.trainer.strategy.root_device
        dtype = PRECISIONS.get(precision, torch.float32)
        matrix = self.matrix = dm.matrix
        if self.trainer.world_size > 1:
            self.shard = dm.shard = RowShard.of_rows(matrix.shape[0], dm.batch_rows)
        check_rank(self.spec.rank, None if self._checked else matrix.shape)  # (warned by check() already)
        self.streamed = dm.streamed
        source = dm.source(self.spec, dtype, device, self.shard)
        self.problem = Problem(self.spec, source, dtype, device, self.shard)
        self.problem.check(CLI_WORDS, precision)
        clip = getattr(dm, "rating_range", None)
        held_out = None if dm.holdout is None else HeldOut.of(dm.holdout, dtype, device, self.shard, clip)
        self.recorder = Recorder(self.problem, held_out)
        self.holdout_spec = {"fraction": dm.holdout_fraction, "seed": dm.holdout_seed}
        self.rating_range = clip
        W, H = self.problem.initial_factors()
        self.W, self.H = nn.Parameter(W), nn.Parameter(H)
        biases = self.problem.biases
        if biases is not None:  # checkpointed with W and H; the engine updates them in place
            for name in ("mu", "b", "c"):
                self.register_buffer(name, getattr(biases, name))

    def check(self, datamodule: NMFDataModule, precision: str, ranks: int = 1) -> None:
        """Check this model against the datamodule's X (set up) and the trainer's precision, before anything runs.

        ``setup`` checks the same again with X as it trains on it; this lets ``nmf-train``
        refuse a run before Lightning opens its loggers' files.
        """
        dtype = PRECISIONS.get(str(precision), torch.float32)
        check_rank(self.spec.rank, datamodule.matrix.shape)
        self._checked = True
        Problem(self.spec, datamodule.summarized(ranks), dtype).check(CLI_WORDS, str(precision))
        if ranks > 1 and (self.rank_search is not None or self.spec.consensus):
            raise NMFInputError(
                "model.rank=auto and model.consensus run in one process: drop trainer=ddp (or several devices)."
            )
        if self.rank_search is not None and self.spec.biases:
            raise NMFInputError(
                "model.rank=auto chooses the rank of an unbiased model; with model.biases=true set model.rank "
                "(compare ranks by val_rmse in a sweep: model.rank=5,10,20 -m)."
            )
        if self.rank_search is not None and not in_memory(datamodule.matrix.X):
            raise NMFInputError(
                "model.rank=auto holds out entries of X, which needs X in host memory, but this X is read from "
                "disk block by block; load it whole (data.batch_rows=null), or choose the rank on a subset of "
                "its rows and set model.rank."
            )

    def choose_rank(self, datamodule: NMFDataModule, precision: str, steps: int, device: torch.device) -> None:
        """``rank=auto``: choose the rank by held-out error on the training entries, and size W and H for it."""
        if self.rank_search is None or self.rank_result is not None:
            return
        dtype = PRECISIONS.get(str(precision), torch.float32)
        options = (self.rank_search, CLI_WORDS, dtype, device, datamodule.batch_rows)
        self.rank_result = search(datamodule.matrix, self.spec, steps, *options)
        self.spec = dataclasses.replace(self.spec, rank=self.rank_result.rank)
        self.W, self.H = self._unsized_factors()

    # ------------------------------------------------------------ checkpoints
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Shape W and H like the checkpoint's before Lightning copies the values in."""
        state = checkpoint["state_dict"]
        spec = self.spec
        check_checkpoint_factors(
            state.get("W"), state.get("H"), spec.rank, spec.restarts, not spec.clamps, "the checkpoint"
        )
        if self.shard is not None:
            keep_rows(checkpoint, self.shard)
        for name, now in (("W", self.W), ("H", self.H), *((k, getattr(self, k)) for k in ("b", "c") if k in state)):
            if now.numel() and tuple(state[name].shape) != tuple(now.shape):
                raise NMFInputError(
                    f"the checkpoint's {name} has shape {tuple(state[name].shape)} but this run's is "
                    f"{tuple(now.shape)}; resume with the data, model.rank and model.restarts it was trained with."
                )
        saved = checkpoint.get("holdout", {"fraction": 0.0, "seed": 0})
        check_resumed(saved, getattr(self, "holdout_spec", saved))
        self._update = None  # it holds the old parameters
        self._update_state = checkpoint.get("update")
        self.W = nn.Parameter(torch.empty_like(state["W"]))
        self.H = nn.Parameter(torch.empty_like(state["H"]))
        self._loaded_best = int(checkpoint.get("best_restart", 0))
        if self.recorder is not None:
            self.recorder.best = self._loaded_best

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record which restart is best and the update's state (its Gram form, the penalty weight reached)."""
        checkpoint["best_restart"] = self._best()
        checkpoint["holdout"] = getattr(self, "holdout_spec", {"fraction": 0.0, "seed": 0})
        state = self._update.state_dict() if hasattr(self._update, "state_dict") else self._update_state
        if state is not None:
            checkpoint["update"] = state
        if self.shard is not None:  # all of W, in row order: a checkpoint resumes on any number of ranks
            gather_rows(checkpoint, self.shard, self.W.shape)

    # -------------------------------------------------------------- training
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The configured optimizer (or closed-form solver) over W and H, from the engine."""
        self._update = None
        optimizer = self.problem.optimizer(self.W, self.H)
        resumed = self._trainer is not None and self.trainer.ckpt_path is not None  # (its lr comes with the checkpoint)
        if getattr(self.spec.optimizer, "keywords", {}).get("lr") == "auto" and not resumed:
            lr, scale = optimizer.param_groups[0]["lr"], self.problem.scale(self.W, self.H)
            log.info("optimizer.lr=auto: %.3g (the factors' scale is %.3g)", lr, scale)
        return optimizer

    @property
    def update(self) -> Update:
        """The engine's update for the trainer's optimizer (built once; counts updates from this run's start)."""
        if self._update is None:
            self._update = self.problem.update(self.optimizers().optimizer, measure=self.streamed)
            if hasattr(self._update, "done"):
                self._update.done = self.global_step
            if self._update_state is not None and hasattr(self._update, "load_state_dict"):
                self._update.load_state_dict(self._update_state)
        return self._update

    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        """Run a block of updates, each a pass over X's row blocks (one block when X is held in memory).

        A streamed X is read once per update: it is measured again only where the curves
        have a point or the run ends (from the last pass's sums when they can be trusted).
        """
        start = self.global_step
        n = self.sizer.next(start, self.trainer.max_steps)
        self._block_span = (start, start + n)
        self.grid.start(self.W.device)
        W0, H0 = self.W.detach().clone(), self.H.detach().clone()
        result = self.problem.fit(self.W, self.H, self.update, n, done=start, on_update=self._on_update)
        count_updates(self.trainer, result.steps)
        self._after_updates(result.converged)
        if self.streamed and not (self.grid.due(self.global_step) or self._ending()):
            last = result.losses[-1] if result.losses is not None else result.last.sq
            if last is not None and not bool(torch.isfinite(last).any()):
                raise self._diverged(result.losses, start, W0, H0)
            self._log_block({}, result.steps)
            return
        sq = self.recorder.pass_sq(result.last) if self.streamed else None
        metrics = self.recorder.online(self.recorder.metrics(self.W, self.H, sq=sq), result.last)
        loss = metrics.get("train/loss", metrics.get("online/loss"))
        if not bool(torch.isfinite(loss)):  # sync point, once per block
            raise self._diverged(result.losses, start, W0, H0)
        self._log_block(metrics, result.steps)

    def _after_updates(self, converged: bool) -> None:
        """Stop the trainer where the objective settled (``tol``) or a stop signal arrived (on any rank)."""
        if converged:
            self.stop_reason = (
                f"converged: the objective changed by less than model.tol={self.problem.convergence.tol} "
                f"(relative) over the last {self.problem.convergence.window} updates"
            )
            self.trainer.should_stop = True
        if self.shard is not None and self.shard.any(self.stop_signal is not None, self.W.device):
            self.stop_signal = self.stop_signal or signal.SIGTERM
        if self.stop_signal is not None:
            self.stop_reason = f"interrupted by {signal.Signals(self.stop_signal).name}"
            self.trainer.should_stop = True

    def _on_update(self, i: int, result: PassResult) -> bool:
        """After update i of a block: keep the curves' points inside it; True stops it there (a stop signal)."""
        if self.stop_signal is not None and self.shard is None:  # under DDP: where the block ends, all ranks together
            return True
        if self.loggers:  # (no curves to draw without a logger)
            start = self._block_span[0]
            self.recorder.on_update(self._block_span, start + i, result, self.W, self.H, self.update)
        return False

    # --------------------------------------------------------------- metrics
    @property
    def grid(self) -> UpdateGrid:
        """The points of the curves: every ``trainer.log_every_n_steps`` updates."""
        if self._grid is None:
            self._grid = self.recorder.grid = UpdateGrid(self.trainer.log_every_n_steps)
        return self._grid

    @property
    def sizer(self) -> BlockSizer:
        """How many updates the next ``training_step`` runs (``model.inner_steps``)."""
        if self._sizer is None:
            self._sizer = BlockSizer(self.hparams.inner_steps, self.grid.every)
        return self._sizer

    def _log_block(self, metrics: dict[str, Tensor], n: int, step: int | None = None) -> None:
        """End of a block of ``n`` updates: its point (when on the grid or the last), progress, block size."""
        step = self.global_step if step is None else step
        now = time.perf_counter()
        seconds = None if self._last_time is None else now - self._last_time
        if seconds is not None:
            metrics["train/updates_per_sec"] = torch.tensor(n / max(seconds, 1e-9))
            if self.shard is not None and self.sizer.auto:  # every rank runs the same block sizes
                seconds = float(self.shard.max(torch.tensor(seconds, dtype=torch.float64, device=self.W.device)))
        self.sizer.measured(n, seconds)
        self._last_time = now
        if "train/relative_error" in metrics:
            self.recorder.observe(metrics["train/relative_error"])
        for key in ("train/loss", "train/relative_error", "online/loss", "online/relative_error"):
            if key in metrics:  # the progress bar and callbacks (early stopping) read these
                self.log(key, metrics[key], prog_bar=True, logger=False, on_step=True, batch_size=1)
        if self.grid.due(step) or self._ending():
            self.grid.add(step, self.recorder.curve_metrics(metrics))
            self._last_point = step
        self.grid.flush(self.loggers)

    def _ending(self) -> bool:
        return bool(self.trainer.should_stop) or 0 < self.trainer.max_steps <= self.global_step

    def _best(self) -> int:
        return int(self.recorder.best) if self.recorder is not None else getattr(self, "_loaded_best", 0)

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        """Score the current factors on the held-out entries (``data.holdout``)."""
        metrics = self.recorder.validation(*self.best_factors(local=True))
        for key, value in metrics.items():  # for early stopping and the progress bar
            self.log(key, value, prog_bar=key == "val/relative_error", logger=False, batch_size=1)
        if self.grid.due(self.global_step) or self._ending():  # a point of the curves
            self.grid.add(self.global_step, metrics)
            self.grid.flush(self.loggers)
            self._last_val_point = self.global_step

    def _diverged(self, losses: Tensor | None, start: int, W0: Tensor, H0: Tensor) -> DivergenceError:
        """The error of a block whose loss stopped being finite, with the last finite factors (all of W)."""
        if W0.dim() == 3:
            W0, H0 = W0[self._best()], H0[self._best()]
        lr = self.optimizers().optimizer.param_groups[0].get("lr")
        return self.problem.diverged(losses, start, self.global_step, (self._whole(W0), H0), lr, CLI_WORDS)

    # ------------------------------------------------------ start and end
    def on_train_start(self) -> None:
        """Start the clock (``updates_per_sec``) and the curves' grid; warn of an lr too small for X."""
        self._fit_start = (time.perf_counter(), self.global_step)
        self._whole_W = None  # W changes from here: gathered again at the end
        self._comm_mark = None if self.shard is None else self.shard.mark()  # what scale-out costs, from here
        self._grid = self.recorder.grid = UpdateGrid(self.trainer.log_every_n_steps)
        self._last_point = self._last_val_point = self.global_step  # a resumed run's curves go on from here
        if self.global_step:
            restart_curves(self.loggers, self.global_step + 1)
            if getattr(self.spec.optimizer, "keywords", {}).get("lr") == "auto":
                lr = self.optimizers().optimizer.param_groups[0].get("lr")
                log.info("optimizer.lr=auto: %.3g, as the checkpoint's run chose it at its start", lr)
        if self.rank_result is not None:  # a plot against the rank: one point per candidate, at step = rank
            for row in self.rank_result.rows:
                values = {f"rank_search/{k}": v for k, v in row.as_dict().items() if k != "rank"}
                for logger in self.loggers:
                    logger.log_metrics(values, step=row.rank)
        self._warn_small_lr()

    def on_train_epoch_end(self) -> None:
        """``model.consensus``: as training ends, the consensus of the restarts (before the pictures and metrics)."""
        if self.spec.consensus and self.consensus is None and self._ending():
            self.consensus = self.problem.consensus(self.spec.reported(self.W.detach(), self.H.detach())[1])

    def _warn_small_lr(self) -> None:
        """Say now when the lr cannot reach a fit in the run's updates (see :meth:`Problem.lr_advice`)."""
        lr = float(self.optimizers().optimizer.param_groups[0].get("lr") or 0.0)
        updates = self.trainer.max_steps - self.global_step if self.trainer.max_steps > 0 else 0
        advice = self.problem.lr_advice(lr, updates, self.W, self.H, CLI_WORDS)
        if advice is not None:
            warnings.warn(advice, NMFWarning, stacklevel=2)

    def on_train_end(self) -> None:
        """Keep the final metrics as plain floats (one sync) for metrics.json."""
        start, first = getattr(self, "_fit_start", (None, 0))
        rate = (self.global_step - first) / max(time.perf_counter() - start, 1e-9) if start is not None else None
        metrics = self.recorder.metrics(self.W, self.H)  # (a streamed X is read once more for the final error)
        metrics.update(self.recorder.validation(*self.best_factors(local=True)))
        if self.shard is not None:  # the factors a user gets: all of W, in row order
            self._whole_W = self._whole(self.W.detach())
            if self.problem.biases is not None:
                self._whole_b = self._whole(self.problem.biases.b)
        restored = getattr(self, "restored_from_step", None) is not None  # these factors are of an earlier check
        if getattr(self, "_last_point", self.global_step) < self.global_step and not restored:  # ended off the grid
            self.grid.add(self.global_step, self.recorder.curve_metrics(metrics))
        held_out = {k: v for k, v in metrics.items() if k.startswith("val/")}
        if held_out and getattr(self, "_last_val_point", self.global_step) < self.global_step and not restored:
            self.grid.add(self.global_step, held_out)  # the last validation check came before the end
        self.grid.flush(self.loggers)
        final = {k: float(v) for k, v in metrics.items()} | {"steps": int(self.global_step)}
        if rate is not None:
            final["updates_per_sec"] = rate
        if self.shard is not None and start is not None and self.global_step > first:
            final.update(self.shard.costs_since(self._comm_mark, self.global_step - first, time.perf_counter() - start))
        if self.spec.restarts > 1:
            final["best_restart"] = self._best()
        if self.consensus is not None:
            W, H, found = self.consensus
            error = relative_error(self.problem.sq_error(W, H).double(), self.problem.source.x_sq.to(W.device))
            final.update(consensus_relative_error=float(error), stability=found.stability, consensus_kept=found.kept)
        if self.rank_result is not None:
            final["rank"] = self.rank_result.rank
            final["rank_search"] = [row.as_dict() for row in self.rank_result.rows]
        self.final_metrics = final
        self.clamped = self.recorder.clamped(final)
        if self.clamped is not None and self.clamped.costly:
            warnings.warn(self.clamped.message(self.spec, CLI_WORDS), NMFWarning, stacklevel=2)
        elif self.clamped is not None:
            log.info(self.clamped.message(self.spec, CLI_WORDS))

    # ---------------------------------------------------------------- factors
    def final_metric_names(self, held_out: bool = False) -> set[str]:
        """Names of the numbers a run writes to metrics.json (checked before training)."""
        return final_names(self.spec, held_out) | ({"rank"} if self.rank_search is not None else set())

    def transform(self, X: np.ndarray | sp.spmatrix, solver: str | None = None, **options) -> np.ndarray:
        """W >= 0 for new rows X (same columns) with this model's H held fixed, on the model's loss.

        ``solver`` defaults to HALS for the Frobenius losses and MU for a beta-divergence; a
        biased model's transform returns W and the new rows' biases b.
        """
        if self.problem.beta is not None:
            options.setdefault("beta", self.problem.beta)
        if self.problem.biases is not None:  # W and each new row's bias b, with mu and c held fixed
            biases = self.problem.biases
            options.setdefault("biases", (float(biases.mu), to_numpy(biases.c)[0]))
        return transform(X, to_numpy(self.best_factors(local=True)[1]), solver, **options)

    def best_factors(self, restart: int | None = None, raw: bool = False, local: bool = False) -> tuple[Tensor, Tensor]:
        """W (n, k) and H (k, m) of the best (or the given) restart, detached, on their device.

        Clamped at 0 when training let them go negative (``project=false``), unless ``raw``.
        Under DDP, all of W once training has ended (gathered from every rank; before, see
        :meth:`whole_factors`); ``local`` gives this rank's rows.
        """
        if self.consensus is not None and restart is None:  # the factors of this run are the consensus
            return self.consensus[0], self.consensus[1]
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
        return (W, H) if raw else self.spec.reported(W, H)

    def bias_arrays(self) -> dict[str, np.ndarray]:
        """A biased model's ``mu`` (a number), ``b`` (n,) and ``c`` (m,) as numpy, all of b's rows; {} when unbiased."""
        biases = self.problem.biases if self.problem is not None else None
        if biases is None:
            return {}
        b = getattr(self, "_whole_b", None) if self.shard is not None else biases.b
        if b is None:
            raise RuntimeError("under DDP each rank holds its own rows of b until training ends.")
        return {"mu": to_numpy(biases.mu).reshape(()), "b": to_numpy(b)[:, 0], "c": to_numpy(biases.c)[0]}

    def whole_factors(self) -> tuple[Tensor, Tensor]:
        """The best restart's W and H, all of W's rows: under DDP every rank must call it (W is gathered)."""
        W, H = self.best_factors(local=True)
        return self._whole(W), H

    def _whole(self, W: Tensor) -> Tensor:
        """All rows of a W of this rank's rows (itself in one process); every rank calls it under DDP."""
        return W if self.shard is None else self.shard.gather_rows(W)

    def factors(self, restart: int | None = None, raw: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """W (n, k) and H (k, m) of the best (or the given) restart as numpy, in the trained dtype.

        Clamped at 0 under ``project=false`` unless ``raw``; bf16/fp16 factors come back as float32.
        """
        W, H = self.best_factors(restart, raw=raw)
        return to_numpy(W), to_numpy(H)
