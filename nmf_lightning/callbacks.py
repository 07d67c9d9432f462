"""Callbacks that read NMF training the way its users count it: in optimizer updates."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class UpdateProgressBar(TQDMProgressBar):
    """Lightning's progress bar, counting optimizer updates out of ``trainer.max_steps``.

    A Lightning step holds a whole block of updates, so batches would say little about
    how far a run is; this bar advances by the updates each block ran.
    """

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        """Size the bar to the run's updates."""
        super().on_train_epoch_start(trainer)
        if trainer.max_steps and trainer.max_steps > 0:
            self.train_progress_bar.total = trainer.max_steps
        self.train_progress_bar.initial = trainer.global_step
        self.train_progress_bar.set_description("updates")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        """Show the updates done so far and the latest metrics."""
        bar = self.train_progress_bar
        if bar is None or bar.disable or self.refresh_rate == 0:
            return
        bar.n = trainer.global_step
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()

    def on_validation_start(self, *_: Any) -> None:
        """Validation scores a few held-out entries in one tick: no bar of its own."""

    def on_validation_batch_start(self, *_: Any, **__: Any) -> None:
        """No validation bar."""

    def on_validation_batch_end(self, *_: Any, **__: Any) -> None:
        """No validation bar."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Show the new ``val/*`` values on the training bar."""
        if self._train_progress_bar is not None and trainer.state.fn == "fit":
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
