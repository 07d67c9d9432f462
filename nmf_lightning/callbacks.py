"""Callbacks that read NMF training the way its users count it: in optimizer updates."""

from __future__ import annotations

import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO

from nmf_lightning.atomic import atomic_path, write_text
from nmf_lightning.consensus import distance_image
from nmf_lightning.hparams import write_hparams, write_layout
from nmf_lightning.internals import Tqdm, has_train_bar, save_last_checkpoint
from nmf_lightning.linalg import to_numpy
from nmf_lightning.pictures import component_grid, heatmap, topics_markdown
from nmf_lightning.recorder import metric_tag
from nmf_lightning.validation import NMFInputError


def next_multiple(step: int, every: int) -> int:
    """The first multiple of ``every`` after update ``step``: when a periodic action is next due."""
    return (step // every + 1) * every


class UpdateProgressBar(TQDMProgressBar):
    """One bar for the run: updates done out of ``trainer.max_steps``, loss, relative error, updates/s.

    A Lightning step holds a whole block of updates and an epoch is a pass over X, so
    Lightning's batch and epoch bars would say little; this bar advances by updates and
    lasts the whole run (resumed runs start at their update).
    """

    #: progress-bar names of the logged metrics
    NAMES = {
        "train/loss": "loss",
        "train/relative_error": "rel_error",
        "val/relative_error": "val_rel_error",
        "online/loss": "online_loss",
        "online/relative_error": "online_rel_error",
    }

    #: seconds between two writes of the bar when the console is not a terminal (a log file, a pipe)
    LOG_EVERY = 5.0

    def init_train_tqdm(self) -> Tqdm:
        """The run's bar, counted in updates."""
        self._interactive = sys.stdout.isatty()
        self._written = time.monotonic()
        steps = self.trainer.max_steps
        return Tqdm(
            desc="updates",
            unit=" updates",
            total=steps if steps and steps > 0 else None,
            initial=self.trainer.global_step,
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    def on_train_start(self, trainer: L.Trainer, *_: Any) -> None:
        """Open the bar at the run's first update, sized to its updates."""
        self.train_progress_bar = self.init_train_tqdm()

    def on_train_epoch_start(self, *_: Any) -> None:
        """An epoch is a pass over X, not a stage of the run: the bar goes on."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Keep the bar open across passes over X."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        """Show the updates done so far and the latest metrics."""
        bar = self.train_progress_bar
        if bar is None or bar.disable or self.refresh_rate == 0:
            return
        bar.n = trainer.global_step
        if not self._interactive:  # a log keeps every write: one every LOG_EVERY seconds, and the last
            if time.monotonic() - self._written < self.LOG_EVERY:
                return
            self._written = time.monotonic()
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Close the bar on the final numbers."""
        bar = self.train_progress_bar
        if bar is not None and not bar.disable:
            bar.n = trainer.global_step
            done = getattr(pl_module, "stop_signal", None) is None  # (not a run a signal cut short)
            if done and bar.total is not None and bar.n < bar.total:  # stopped early (tol, early stopping): done
                bar.total = bar.n
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        super().on_train_end(trainer, pl_module)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The run's numbers under short names (no Lightning version number)."""
        metrics = super().get_metrics(trainer, pl_module)
        return {self.NAMES[k]: v for k, v in metrics.items() if k in self.NAMES}

    def on_validation_start(self, *_: Any) -> None:
        """Validation scores a few held-out entries in one tick: no bar of its own."""

    def on_validation_batch_start(self, *_: Any, **__: Any) -> None:
        """No validation bar."""

    def on_validation_batch_end(self, *_: Any, **__: Any) -> None:
        """No validation bar."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Show the new ``val/*`` values on the training bar."""
        if has_train_bar(self) and trainer.state.fn == "fit":
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)


class FactorPictures(L.Callback):
    """Pictures of W and H in TensorBoard every ``every_n_steps`` updates and at the end.

    Always heatmaps of W and H (``factors/W``, ``factors/H``); for image data (the matrix
    has an ``image_shape``, e.g. digits) each component of H as an image
    (``components/H``); for text data (column names, e.g. the 20 newsgroups vocabulary)
    the top ``n_words`` words of each component as a text panel (``topics``) and, at the
    end, ``topics.md`` in ``dirpath``.
    """

    def __init__(self, every_n_steps: int = 1000, n_words: int = 10, max_side: int = 512, dirpath: str | None = None):
        if every_n_steps < 0 or n_words < 1 or max_side < 1:
            raise NMFInputError(
                "callbacks.factor_pictures: every_n_steps must be >= 0 (0 = only at the end), "
                f"n_words and max_side >= 1; got {every_n_steps}, {n_words}, {max_side}."
            )
        self.every_n_steps = every_n_steps
        self.n_words = n_words
        self.max_side = max_side
        self.dirpath = dirpath
        self._next = every_n_steps

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Schedule the next pictures after the current update (also when resuming)."""
        if self.every_n_steps:
            self._next = next_multiple(trainer.global_step, self.every_n_steps)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        """Draw once a block of updates has passed the next multiple of ``every_n_steps``."""
        if self.every_n_steps and trainer.global_step >= self._next:
            self.draw(trainer, pl_module)
            self._next = next_multiple(trainer.global_step, self.every_n_steps)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Final pictures, and topics.md for text data."""
        text = self.topics(pl_module)
        self.draw(trainer, pl_module, text)
        if text is not None and self.dirpath and trainer.is_global_zero:
            path = Path(self.dirpath) / "topics.md"
            path.parent.mkdir(parents=True, exist_ok=True)
            matrix, rank = pl_module.matrix, pl_module.hparams.rank
            write_text(path, f"# Topics of {matrix.name} (rank {rank}, after {trainer.global_step} updates)\n\n{text}")

    def topics(self, pl_module: L.LightningModule) -> str | None:
        """The top words of each component (Markdown), for a matrix with column names."""
        names = pl_module.matrix.col_names
        if not names:
            return None
        H = pl_module.best_factors(local=True)[1]  # whole on every rank under DDP
        return topics_markdown(to_numpy(H), names, self.n_words)

    def draw(self, trainer: L.Trainer, pl_module: L.LightningModule, text: str | None = None) -> None:
        """Send the pictures of the current (best-restart) factors to every TensorBoard logger.

        ``text`` is the topics table when the caller already has it.
        """
        writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not writers:
            return
        W, H = pl_module.whole_factors()  # (under DDP every rank gathers W; rank 0 draws)
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        images = {"factors/W": heatmap(W, self.max_side, "W"), "factors/H": heatmap(H, self.max_side, "H")}
        matrix = pl_module.matrix
        if matrix.image_shape is not None:
            images["components/H"] = component_grid(H, matrix.image_shape)
        if getattr(pl_module, "consensus", None) is not None:  # cNMF's clustered distances of the restarts
            images["consensus/distances"] = distance_image(pl_module.H.detach(), pl_module.consensus[2].labels)
        text = text if text is not None else self.topics(pl_module)
        for writer in writers:
            for tag, image in images.items():
                writer.add_image(tag, image, step, dataformats="HWC")
            if text is not None:
                writer.add_text("topics", text, step)
            writer.flush()


class RestoreBestFactors(L.Callback):
    """Keep the factors of the best validation check and put them back when training ends.

    With early stopping the run goes on for ``patience`` checks past its best; this makes
    factors.npz, metrics.json, the last checkpoint and the final pictures hold the best
    check's factors instead.
    """

    def __init__(self, monitor: str = "val/relative_error", mode: str = "min"):
        if mode not in ("min", "max"):
            raise NMFInputError(f"callbacks.restore_best.mode must be min or max, got {mode!r}.")
        self.monitor = monitor
        self.mode = mode
        self.best: float | None = None
        self.best_step: int | None = None
        self._factors: tuple[Any, Any] | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Copy W and H (on their device) when the monitored metric improves."""
        value = trainer.callback_metrics.get(self.monitor)
        if value is None or trainer.sanity_checking:
            return
        value = float(value)
        if math.isnan(value):  # NaN never counts as an improvement
            return
        better = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        if better:
            self.best, self.best_step = value, trainer.global_step
            self._factors = (pl_module.W.detach().clone(), pl_module.H.detach().clone())

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Put the best factors back as training ends (before the last checkpoint, pictures and metrics).

        Only the epoch that ends training counts.
        """
        ending = trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step
        if self._factors is None or self.best_step == trainer.global_step or not ending:
            return
        with torch.no_grad():
            pl_module.W.copy_(self._factors[0])
            pl_module.H.copy_(self._factors[1])
        pl_module.restored_from_step = self.best_step


class UpdateCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, saving ``last.ckpt`` every ``every_n_updates`` updates and ``every_n_minutes``.

    Lightning's own triggers count batches and never fire under the fused blocks of
    updates; these are checked where a block ends (each update a whole pass over X, so the
    state is always consistent), and ``last.ckpt`` is also saved when training ends.
    A re-run into the same folder replaces ``last.ckpt`` rather than writing ``last-v1.ckpt``;
    :class:`AtomicCheckpointIO` writes each file whole, then renames it.
    """

    def __init__(self, every_n_updates: int = 0, every_n_minutes: float = 0.0, **kwargs: Any):
        if isinstance(every_n_updates, bool) or int(every_n_updates) < 0 or float(every_n_minutes) < 0:
            raise NMFInputError(
                "callbacks.model_checkpoint: every_n_updates and every_n_minutes must be >= 0 (0 = off), "
                f"got {every_n_updates} and {every_n_minutes}."
            )
        kwargs.setdefault("save_last", True)
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(**kwargs)
        self.every_n_updates = int(every_n_updates)
        self.every_n_minutes = float(every_n_minutes)
        self._clock = time.monotonic()
        self._next = self.every_n_updates

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Count the triggers from this run's first update (a resumed run's too)."""
        super().on_train_start(trainer, pl_module)
        self._clock = time.monotonic()
        if self.every_n_updates:
            self._next = next_multiple(trainer.global_step, self.every_n_updates)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any, **__: Any) -> None:
        """Save ``last.ckpt`` when a trigger is due at the end of a block of updates."""
        step = trainer.global_step
        by_updates = bool(self.every_n_updates) and step >= self._next
        by_clock = bool(self.every_n_minutes) and time.monotonic() - self._clock >= 60 * self.every_n_minutes
        shard = getattr(pl_module, "shard", None)
        if self.every_n_minutes and shard is not None:  # saving gathers W from every rank: all must agree
            by_clock = shard.any(by_clock, pl_module.W.device)
        if not (by_updates or by_clock) or not save_last_checkpoint(self, trainer):
            return
        self._clock = time.monotonic()
        if self.every_n_updates:
            self._next = next_multiple(step, self.every_n_updates)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """``last.ckpt`` where training ends (or a stop signal ends it), not at every epoch.

        Lightning's own trigger would rewrite the checkpoint after every block of updates,
        whatever ``every_n_minutes`` says.
        """
        if trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step:
            super().on_train_epoch_end(trainer, pl_module)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written whole to a temporary file, then renamed: a killed run never leaves half a ``last.ckpt``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically."""
        with atomic_path(path) as part:
            super().save_checkpoint(checkpoint, part, storage_options)


#: signals that stop a run gracefully, and the exit code each ends it with (128 + the signal)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StoppedAtOnceError(Exception):
    """A second Ctrl+C ended a run in the middle of an update: nothing consistent to save."""


class GracefulStop(L.Callback):
    """SIGTERM, SIGINT (Ctrl+C) and SIGUSR1 (a scheduler's pre-emption notice) stop a run cleanly.

    The update under way finishes (a streamed X: the pass under way), training ends as
    if ``max_steps`` were reached (final metrics, ``last.ckpt``), and the run reports
    ``interrupted``; ``ckpt_path=last`` continues exactly. A second Ctrl+C stops at once.
    Replaces Lightning's SIGTERM handler, which would stop between blocks without saving.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Take the stop signals for this run (Lightning restores the previous handlers at teardown)."""
        pl_module.stop_signal = None

        def handle(signum: int, _frame: Any) -> None:
            if pl_module.stop_signal is not None and signum == signal.SIGINT:  # asked twice: stop now
                raise StoppedAtOnceError(
                    f"stopped at once by a second Ctrl+C at update {trainer.global_step}: nothing was saved since "
                    "the last checkpoint (continue from it with ckpt_path=last and this run's hydra.run.dir)"
                )
            pl_module.stop_signal = signum

        try:
            for signum in STOP_SIGNALS:
                signal.signal(signum, handle)
        except ValueError:  # not the main thread: signals stay as they were
            pass


class RunHparams(L.Callback):
    """The run's hyperparameters in every logger, and TensorBoard's HPARAMS row and chart layout.

    Written as training starts (rank 0), once the module has checked X against its solver:
    a run refused while setting up leaves no empty run in TensorBoard. ``metrics`` are the
    final metrics the HPARAMS table has columns for, ``shown`` the hyperparameters it opens on.
    """

    def __init__(
        self, params: dict[str, Any], shown: list[str], metrics: tuple[str, ...], online: bool, negatives: bool
    ):
        self.params, self.shown, self.metrics = params, shown, metrics
        self.online, self.negatives = online, negatives

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log the hyperparameters; declare the HPARAMS columns and lay out the charts."""
        if not trainer.is_global_zero:
            return
        params = dict(self.params)
        if params.get("lr") == "auto" and trainer.optimizers:  # the step lr=auto chose, set up by now
            params["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        for logger in trainer.loggers:
            logger.log_hyperparams(params)
            if isinstance(logger, TensorBoardLogger):
                write_hparams(logger.experiment, params, [metric_tag(k) for k in self.metrics], self.shown)
                write_layout(logger.experiment, self.online, self.negatives, pl_module.spec.restarts > 1)
