"""The LightningDataModule that loads one matrix and feeds it to training.

Each item of the training dataloader is a tick that asks the module for its next block
of updates. By default X is held whole on the training device. With ``batch_rows=B``
the rows of X are the samples: :meth:`NMFDataModule.block_loader` yields blocks of B rows
(read from disk a block at a time, prefetched by a worker, pinned for the GPU), and one
pass over them is one update of W and H, run inside the module's step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader

from nmf_lightning.data.holdout import Holdout, check_holdout, split_holdout
from nmf_lightning.data.rows import OnDisk, RowBlocks, RowSummary, in_memory, materialize, scan
from nmf_lightning.data.sources import Matrix
from nmf_lightning.engine import Block, Source, Spec, from_batch
from nmf_lightning.params import CLI_WORDS, Integer, check_params, one_of
from nmf_lightning.validation import NMFInputError, check_matrix, require_memory

if TYPE_CHECKING:
    from nmf_lightning.distributed import RowShard


class _Ticks:
    """``n`` ticks, one per ``training_step``.

    They carry no data, so resuming anywhere is exact: the (empty) state_dict tells
    Lightning the loader is resumable.
    """

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (torch.tensor(i) for i in range(self.n))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


class NMFDataModule(L.LightningDataModule):
    """Load X once with ``loader(**options)``, check it, and feed it to the trainer.

    ``loader`` is any callable returning a :class:`Matrix` (the Hydra configs in
    ``configs/data/`` name one per data set); ``options`` are its keyword arguments,
    so ``data.archive=PATH`` on the command line reaches the loader directly.
    ``holdout`` > 0 hides that fraction of the observed entries from training (drawn
    with ``holdout_seed``, fixed by default so every job of a sweep holds out the same
    entries); the module reports ``val/*`` metrics on them. ``batch_rows`` streams X in
    blocks of that many rows (``null``: X whole on the device); ``num_workers`` worker
    processes read the next blocks while the device works on this one (``auto``: one when
    training on a GPU, none on a CPU, whose cores the worker would take from the math).
    ``rating_range`` ``[low, high]`` is the scale of X's values (ratings 1 to 5): predictions
    of held-out entries are clipped to it before they are scored.
    """

    def __init__(
        self,
        loader: Callable[..., Matrix],
        holdout: float = 0.0,
        holdout_seed: int = 0,
        batch_rows: int | None = None,
        num_workers: int | str = "auto",
        rating_range: list[float] | None = None,
        **options: Any,
    ):
        super().__init__()
        check_params({"rating_range": rating_range, "batch_rows": batch_rows}, name=CLI_WORDS)
        own = {"holdout_seed": Integer(), "num_workers": one_of("auto", Integer(0))}
        check_params({"holdout_seed": holdout_seed, "num_workers": num_workers}, own, CLI_WORDS)
        check_holdout(holdout)
        self.loader = loader
        self.options = options
        self.holdout_fraction = holdout
        self.holdout_seed = holdout_seed
        self.batch_rows = None if batch_rows is None else int(batch_rows)
        self.rating_range = None if rating_range is None else (float(rating_range[0]), float(rating_range[1]))
        self.num_workers = num_workers if num_workers == "auto" else int(num_workers)
        self.matrix: Matrix | None = None
        self.holdout: Holdout | None = None
        self._loader: Iterable[dict[str, Any]] | None = None  # the row blocks of a streamed X, made once
        self.summary: RowSummary | None = None
        self.dtype = torch.float32  # of the streamed blocks; the module sets it to its own
        self.shard: Any = None  # under DDP, this rank's rows (a RowShard, set by the module)

    @property
    def streamed(self) -> bool:
        """Whether X reaches training as row blocks (``batch_rows`` set)."""
        return self.batch_rows is not None

    def setup(self, stage: str | None = None) -> None:
        """Load and check X; later calls reuse it."""
        if self.matrix is not None:
            return
        matrix = self.loader(**self.options)
        if not isinstance(matrix, Matrix):
            raise TypeError(f"data loader {self.loader} returned {type(matrix).__name__}, expected a Matrix.")
        if not self.streamed:
            _check_fits(matrix.X)
            matrix.X = materialize(matrix.X)
        elif self.holdout_fraction and not in_memory(matrix.X):
            raise NMFInputError(
                "data.holdout needs X in host memory to mark the held-out entries missing, but this X is read "
                "from disk block by block (data.batch_rows with a .npy or HDF5 file); hold out rows "
                "instead (train on a subset and transform the rest), or load X whole with data.batch_rows=null."
            )
        if self.holdout_fraction:  # the held-out entries are drawn from a checked X
            check_matrix(matrix.X)
            matrix, self.holdout = split_holdout(matrix, self.holdout_fraction, self.holdout_seed)
        # check what is trained on block by block (X whole when it is not streamed), and sum it
        name = "X without its held-out entries" if self.holdout_fraction else "X"
        self.summary = scan(matrix.X, self.batch_rows or max(matrix.shape[0], 1), matrix.unstored_missing, name)
        self.matrix = matrix

    def summarized(self, ranks: int = 1) -> Source:
        """What the scan of X says about it, as the engine's source (no blocks yet): enough to check a run."""
        X = self.matrix.X
        sparse = sp.issparse(X) or bool(getattr(X, "sparse", False))
        options = {"sparse": sparse, "unstored_missing": self.matrix.unstored_missing, "streamed": self.streamed}
        return Source.summarized(self.summary, self.matrix.shape, ranks=ranks, **options)

    def source(self, spec: Spec, dtype: torch.dtype, device: torch.device, shard: RowShard | None = None) -> Source:
        """X as the engine reads it: one block on ``device``, or passes over the row blocks moved there as they come.

        Under DDP (``shard``) this process's rows. X held whole on a GPU is checked to fit there first.
        """
        matrix = self.matrix
        if not self.streamed:
            options = {"unstored_missing": matrix.unstored_missing, "observed": spec.info.observed, "shard": shard}
            options["biased"] = spec.biases
            source = Source.in_memory(matrix.X, dtype, "cpu", **options)
            source.check_memory(device, spec.rank, spec.restarts, torch.empty((), dtype=dtype).element_size())
            return source.to(device)
        self.dtype, offset = dtype, 0 if shard is None else shard.start

        on_cpu = torch.device(device).type == "cpu"

        def blocks() -> Iterator[Block]:  # one pass over this process's row blocks
            for batch in self.block_loader():
                if not batch.get("empty"):
                    if not on_cpu:
                        batch = {k: _to(v, device) for k, v in batch.items()}
                    yield from_batch(batch, dtype, matrix.unstored_missing, offset)

        rows = None if shard is None else shard.rows  # this rank's rows of W
        return dataclasses.replace(self.summarized(1 if shard is None else shard.world), blocks=blocks, rows=rows)

    def row_blocks(self, transposes: bool = True) -> RowBlocks:
        """The row blocks of X in order (a map-style dataset: item i is block i); under DDP, this rank's.

        ``transposes``: CSR blocks come with their transposes (read ahead for a GPU).
        """
        rows = length = None
        if self.shard is not None:
            rows, length = (self.shard.start, self.shard.stop), self.shard.blocks_per_rank
        X, missing = self.matrix.X, self.matrix.unstored_missing
        options = {"rows": rows, "length": length, "transposes": transposes}
        return RowBlocks(X, self.batch_rows, self.summary, self.dtype, missing, **options)

    def block_loader(self) -> Iterable[dict[str, Any]]:
        """The row blocks of a pass, read ahead by ``num_workers`` and pinned for a GPU (made once, reused).

        Without workers or a GPU to pin for, the blocks are read in turn from the dataset
        itself: a DataLoader would only add its fetch and conversion to every block.
        """
        if self._loader is None:
            workers = self.num_workers
            device = self.trainer.strategy.root_device.type if self.trainer is not None else "cpu"
            on_gpu = device == "cuda"
            if workers == "auto":
                workers = 1 if on_gpu else 0
            if not workers and device == "cpu":
                self._loader = self.row_blocks(transposes=False)
                return self._loader
            self._loader = DataLoader(
                self.row_blocks(transposes=device != "cpu"),  # a CPU multiplies by X^T in X's layout
                batch_size=None,
                shuffle=False,  # exact passes: the same order every time, sequential reads
                num_workers=workers,
                pin_memory=on_gpu,  # (pinning on a CPU run would start a CUDA context for nothing)
                persistent_workers=workers > 0,
                prefetch_factor=2 if workers else None,
            )
        return self._loader

    def train_dataloader(self) -> Iterable[Any]:
        """One tick per ``training_step`` (enough for ``max_steps``): each runs a block of updates.

        An update is a pass over X: over its one block in memory, or over the row blocks
        of :meth:`block_loader`, read inside the step (no trainer hooks per block). Each tick
        runs at least one update, so ``max_steps`` ticks always suffice; the trainer stops
        as soon as ``max_steps`` updates are done.
        """
        trainer = self.trainer
        max_steps = trainer.max_steps if trainer is not None and trainer.max_steps > 0 else 10**9
        module = trainer.lightning_module if trainer is not None else None
        if module is not None and getattr(module.hparams, "inner_steps", "auto") != "auto":
            max_steps = math.ceil(max_steps / int(module.hparams.inner_steps))
        return _Ticks(max_steps)

    def val_dataloader(self) -> Iterable[torch.Tensor]:
        """One tick per validation run when entries are held out; none otherwise."""
        return _Ticks(1 if self.holdout_fraction else 0)


def _check_fits(X: object) -> None:
    """A dense matrix on disk must fit in memory (as read, and as float32 for training) to load it whole."""
    if not isinstance(X, OnDisk) or getattr(X, "sparse", False) or len(X.shape) != 2:
        return
    n, m = X.shape
    itemsize = np.dtype(getattr(X, "dtype", np.float64)).itemsize
    require_memory(
        n * m * (itemsize + 4),
        f"X ({n} x {m}, {itemsize}-byte values) needs about {{need}} GiB to load whole",
        lambda free: (
            f"stream it in row blocks with data.batch_rows={max(1, int(free / 8 / max(m, 1) / (itemsize + 4)))}"
            " (or fewer), which never holds X at once."
        ),
    )


def _to(value: Any, device: torch.device) -> Any:
    """A block's tensor on ``device``, copied while the device works; its other fields as they are."""
    return value.to(device, non_blocking=True) if torch.is_tensor(value) else value
