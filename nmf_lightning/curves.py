"""Training curves on a fixed grid of updates, whatever the sizes of the blocks that ran them.

A block of updates runs without a host sync; the values of the grid's points inside it
stay on the device until the block ends, then go to the host in one copy and to the
loggers with their true update numbers and the wall time each point was reached (a
CUDA event per point on a GPU, whose work runs behind the host). A curve of 2000
updates logged every 10 has the same 200 points on a fast machine and a slow one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import torch
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from nmf_lightning.internals import file_writer
from nmf_lightning.validation import NMFInputError


def check_every(every: object) -> int:
    """``trainer.log_every_n_steps`` as the grid's spacing: an integer >= 1."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise NMFInputError(
            f"trainer.log_every_n_steps must be an integer >= 1 (a curve point every so many updates), got {every!r}."
        )
    return every


class BlockSizer:
    """How many updates each Lightning ``training_step`` runs: ``inner_steps`` of them, or sized by the clock.

    ``auto`` sizes blocks to take about ``seconds`` each, so Lightning's per-step cost and
    the metrics' read-back stay a small share of the time however fast an update is, and
    ends a block on the curves' grid where it can (block ends are points with all their
    metrics). Block sizes change only where metrics are logged, never the factors.
    """

    def __init__(self, inner_steps: int | str, every: int, seconds: float = 1.0):
        self.auto, self.every, self.seconds = inner_steps == "auto", every, seconds
        self.size = 1 if self.auto else int(inner_steps)

    def next(self, start: int, max_steps: int) -> int:
        """Updates of the block starting after update ``start`` (at most up to ``max_steps``, when > 0)."""
        n = self.size
        if self.auto:  # end on the grid where that leaves an update to run
            aligned = (start + n) // self.every * self.every
            n = aligned - start if aligned > start else n
        return min(n, max_steps - start) if max_steps > 0 else n

    def measured(self, n: int, seconds: float | None) -> None:
        """A block of ``n`` updates took ``seconds`` (None: the first, whose warm-up says nothing: grow)."""
        if not self.auto:
            return
        if seconds is None:
            self.size = 10 * n
        elif seconds > 0:
            self.size = int(min(max(n * self.seconds / seconds, 1), 10 * n, 100_000))


class UpdateGrid:
    """The points of a run's curves: every ``every`` updates, plus the run's last update."""

    def __init__(self, every: int):
        self.every = check_every(every)
        self._points: dict[int, dict[str, Tensor]] = {}
        self._times: dict[int, float | tuple[torch.cuda.Event, torch.cuda.Event, float]] = {}
        self._origin: tuple[torch.cuda.Event, float] | None = None
        self._last: dict[str, tuple[int, float]] = {}  # each curve's last point written

    def due(self, step: int) -> bool:
        """Whether update ``step`` is a point of the grid."""
        return step > 0 and step % self.every == 0

    def start(self, device: torch.device) -> None:
        """A block starts on an idle ``device``: the origin of its points' CUDA times."""
        self._origin = None
        if device.type == "cuda":
            origin = torch.cuda.Event(enable_timing=True)
            origin.record()
            self._origin = (origin, time.time())

    def add(self, step: int, values: dict[str, Tensor]) -> None:
        """Keep ``values`` (device tensors, one per restart or a scalar) for the point at ``step``, and when."""
        if step not in self._times:
            if self._origin is not None:
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                self._times[step] = (*self._origin, event)
            else:
                self._times[step] = time.time()
        self._points.setdefault(step, {}).update(values)

    def ends_at(self, tag: str, step: int, value: float) -> bool:
        """Whether the curve ``tag`` was written up to ``step`` and ends there at ``value`` (to float32 rounding)."""
        last = self._last.get(tag)
        return last is not None and last[0] == step and math.isclose(last[1], value, rel_tol=1e-6)

    def __len__(self) -> int:
        return len(self._points)

    def flush(self, loggers: Iterable) -> dict[int, dict[str, float]]:
        """Write the kept points to every logger, in update order, and forget them.

        With restarts each point reports its best restart, the one of lowest
        ``train/loss`` at that point. One device-to-host copy for all points.
        """
        points, self._points = self._points, {}
        times, self._times = self._times, {}
        if not points:
            return {}
        keys: list[tuple[int, str]] = []
        values: list[Tensor] = []
        for step in sorted(points):
            point = points[step]
            best = _best(point.get("train/loss"))
            for key, value in point.items():
                value = value.detach()
                if value.dim() == 1 and best is not None:
                    value = value[best]
                keys.append((step, key))
                values.append(value.to(torch.float64).reshape(()))
        host = torch.stack([v.to(values[0].device) for v in values]).cpu().tolist()
        out: dict[int, dict[str, float]] = {}
        for (step, key), value in zip(keys, host, strict=True):
            out.setdefault(step, {})[key] = value
        walls = {step: _wall(when) for step, when in times.items()}
        for step, metrics in out.items():
            self._last.update({key: (step, value) for key, value in metrics.items()})
        for logger in loggers:
            writer = _writer(logger)
            for step, metrics in out.items():
                if writer is not None:  # one event per point, with when it was reached
                    values = [Summary.Value(tag=key, simple_value=value) for key, value in metrics.items()]
                    file_writer(writer).add_summary(Summary(value=values), step, walls[step])
                else:
                    logger.log_metrics(metrics, step=step)
        return out


def _wall(when: float | tuple) -> float:
    """Wall time of a point: taken on the host, or its CUDA event's time after the block's origin."""
    if isinstance(when, float):
        return when
    origin, origin_wall, event = when
    return origin_wall + origin.elapsed_time(event) / 1000


def _best(loss: Tensor | None) -> Tensor | None:
    """Index of the restart of lowest finite loss (None without restarts)."""
    if loss is None or loss.dim() == 0:
        return None
    return torch.nan_to_num(loss.detach(), nan=float("inf")).argmin()


def restart_curves(loggers: Iterable, step: int) -> None:
    """A resumed run's curves go on from ``step``: TensorBoard hides what a killed run logged past it.

    The killed run may have logged points after its last checkpoint; the resumed run logs
    them again, and TensorBoard's restart marker drops the old ones (no step twice).
    """
    for logger in loggers:
        writer = _writer(logger)
        if writer is not None:
            file_writer(writer).add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))


def _writer(logger: object) -> SummaryWriter | None:
    """The logger's TensorBoard writer (a writer is its own), or None for another kind of logger."""
    writer = logger if isinstance(logger, SummaryWriter) else getattr(logger, "experiment", None)
    return writer if isinstance(writer, SummaryWriter) else None
