"""The LightningDataModule that loads one matrix and paces the training loop.

NMF trains on the whole matrix at every update, so X is not batched: the module keeps
X on its device, and each item of the training dataloader is just a tick that asks the
module for its next block of updates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import lightning as L
import torch

from nmf_lightning.data.holdout import Holdout, split_holdout
from nmf_lightning.data.sources import Matrix
from nmf_lightning.validation import check_matrix


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
    """Load X once with ``loader(**options)``, check it, and feed ticks to the trainer.

    ``loader`` is any callable returning a :class:`Matrix` (the Hydra configs in
    ``configs/data/`` name one per data set); ``options`` are its keyword arguments,
    so ``data.archive=PATH`` on the command line reaches the loader directly.
    ``holdout`` > 0 hides that fraction of the observed entries from training (drawn
    with ``holdout_seed``, fixed by default so every job of a sweep holds out the same
    entries); the module reports ``val/*`` metrics on them.
    """

    def __init__(
        self,
        loader: Callable[..., Matrix],
        holdout: float = 0.0,
        holdout_seed: int = 0,
        **options: Any,
    ):
        super().__init__()
        self.loader = loader
        self.options = options
        self.holdout_fraction = holdout
        self.holdout_seed = holdout_seed
        self.matrix: Matrix | None = None
        self.holdout: Holdout | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load and check X; later calls reuse it."""
        if self.matrix is not None:
            return
        matrix = self.loader(**self.options)
        if not isinstance(matrix, Matrix):
            raise TypeError(f"data loader {self.loader} returned {type(matrix).__name__}, expected a Matrix.")
        check_matrix(matrix.X)
        if self.holdout_fraction:
            matrix, self.holdout = split_holdout(matrix, self.holdout_fraction, self.holdout_seed)
            check_matrix(matrix.X, name="X without its held-out entries")
        self.matrix = matrix

    def train_dataloader(self) -> Iterable[torch.Tensor]:
        """One tick per ``training_step``: enough for ``max_steps`` updates in one epoch.

        Each tick runs at least one update, so ``max_steps`` ticks always suffice; the
        trainer stops as soon as ``max_steps`` updates are done.
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
