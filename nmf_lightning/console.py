"""A quiet console and a complete train.log: log lines and warnings on lines of their own.

Warnings go through logging, so Hydra's handlers put each one on the console (above the
progress bar, never glued to it) and in the run's ``train.log``. nmf-lightning's own
warnings (:class:`NMFWarning`) are attributed to nmf-lightning, not to the Lightning
hook that happened to call the code raising them.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm

log = logging.getLogger("nmf_lightning")

#: library chatter that says nothing about the run (Lightning's pytree deprecation; its logging interval
#: counts batches, where nmf-lightning's counts updates; its checkpoint folder is this run's own, whose
#: folder was claimed before it started: a resumed run's, or one replaced with overwrite=true)
_NOISE = (
    r".*isinstance\(treespec, LeafSpec\).*",
    r"The number of training batches .* is smaller than the logging interval",
    r"Checkpoint directory .* exists and is not empty",
)
#: Lightning's info lines (GPU available, tips, "fit stopped"): the run's own log says these
_QUIET_LOGGERS = ("lightning.pytorch", "lightning.fabric")


class NMFWarning(UserWarning):
    """A warning about the run from nmf-lightning (not from a library it uses)."""


class TqdmHandler(logging.StreamHandler):
    """A console handler that prints above a progress bar instead of onto its line."""

    def emit(self, record: logging.LogRecord) -> None:  # noqa: D102
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)


def _show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    if issubclass(category, NMFWarning):
        log.warning("%s", message)
    else:
        log.warning("%s (%s: %s:%s)", message, category.__name__, filename, lineno)


@contextmanager
def run_console() -> Iterator[None]:
    """Route warnings to the log, drop library chatter, and restore everything afterwards."""
    levels = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    with warnings.catch_warnings():
        for pattern in _NOISE:
            warnings.filterwarnings("ignore", message=pattern)
        warnings.showwarning = _show
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
