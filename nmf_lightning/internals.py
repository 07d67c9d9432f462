"""The private APIs of Lightning and of TensorBoard's writer that nmf-lightning uses, all in this one file.

Each is used only where no public hook does the job, and was checked against lightning
2.6.6 and torch 2.13 (``torch.utils.tensorboard``); a release that moves one breaks it
here. Nothing is imported until asked for: the estimator, which writes TensorBoard
curves through :func:`file_writer`, never imports Lightning. The one exception in
place rather than here: :class:`~nmf_lightning.distributed.ShardedDDP` replaces the
launcher of DDP's child ranks (``_configure_launcher``, ``_call_children_scripts``, the
:data:`SubprocessScriptLauncher` below), checked against the same release.
"""

from __future__ import annotations

from typing import Any


def count_updates(trainer: Any, n: int) -> None:
    """Count ``n`` optimizer updates in ``trainer.global_step``.

    Manual optimization counts a step when ``LightningOptimizer.step`` runs; the engine
    updates W and H itself, many times per ``training_step`` and with solvers that have no
    ``step``, so the updates are added to the progress tracker ``global_step`` reads.
    """
    progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
    for tracker in (progress.total, progress.current):
        tracker.ready += n
        tracker.completed += n


def save_last_checkpoint(callback: Any, trainer: Any) -> bool:
    """Save ``last.ckpt`` now, as a ``ModelCheckpoint`` does at its own triggers; False where it would skip.

    Its triggers count batches and epochs, which a block of updates (or a pass over a
    streamed X) is not; ``UpdateCheckpoint`` saves at update-based triggers through this.
    """
    if callback._should_skip_saving_checkpoint(trainer):
        return False
    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))
    return True


def has_train_bar(callback: Any) -> bool:
    """Whether a ``TQDMProgressBar`` has its training bar open (its ``train_progress_bar`` raises otherwise)."""
    return callback._train_progress_bar is not None


def file_writer(writer: Any) -> Any:
    """The event-file writer behind a ``SummaryWriter``: the one way to log a point with its own wall time."""
    return writer._get_file_writer()


def __getattr__(name: str) -> Any:
    if name == "Tqdm":  # the progress bar class Lightning's TQDMProgressBar builds its bars from
        from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

        return Tqdm
    if name == "SubprocessScriptLauncher":  # the launcher of DDP's child ranks, which ShardedDDP replaces
        from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

        return _SubprocessScriptLauncher
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
