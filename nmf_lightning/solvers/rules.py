"""Closed-form update rules as plain objects: the engine's view of a solver.

A rule holds its options (ALS's ridge, Kaczmarz's sampler) and calls its module's pure
functions. It is not a ``torch.optim.Optimizer``: building one costs nothing, while the
first optimizer a process builds imports TorchDynamo (seconds). The optimizers Lightning
checkpoints (:class:`~nmf_lightning.solvers.Solver`) wrap these rules.
"""

from __future__ import annotations

import warnings
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from nmf_lightning.console import NMFWarning
from nmf_lightning.solvers import als, hals, kaczmarz, mu
from nmf_lightning.validation import NMFInputError

if TYPE_CHECKING:
    from nmf_lightning.engine.blocks import Block


class Rule:
    """An update rule: ``update_w`` (row-local), ``h_stats`` summed over row blocks, ``h_from_stats``.

    A rule's options (MU's beta, HALS's sweeps, ALS's ridge) reach its module's functions
    as keywords: :meth:`options` for the updates, :meth:`stats_options` for ``h_stats``.
    """

    module: ModuleType
    #: whether H is updated from sums over row blocks (so X may come in blocks of rows, or
    #: sharded over processes); what each rule supports is in :mod:`~nmf_lightning.solvers.registry`
    sums = True
    #: whether the rule's sums for a complete block are ``W^T X`` and ``W^T W`` (the Gram form),
    #: and its W-update is its H-update on the transposed problem's sums
    gram_form = False

    def options(self) -> dict:
        """Keywords of the module's ``update_h``, ``update_w`` and ``h_from_stats``."""
        return {}

    def stats_options(self) -> dict:
        """Keywords of the module's ``h_stats``."""
        return {}

    def h_stats(self, target: Block, W: Tensor, H: Tensor) -> dict[str, Tensor]:
        """This block's part of the sums over rows that the H-update reads."""
        return self.module.h_stats(target, W, H, **self.stats_options())

    def h_from_stats(self, stats: dict[str, Tensor], H: Tensor, l1: float = 0.0, l2: float | Tensor = 0.0) -> Tensor:
        """The rule's new H from the statistics summed over all row blocks."""
        return self.module.h_from_stats(stats, H, l1, l2, **self.options())

    def update_h(self, target: Block, W: Tensor, H: Tensor, l1: float = 0.0, l2: float | Tensor = 0.0) -> Tensor:
        """The rule's new H for fixed W."""
        return self.module.update_h(target, W, H, l1, l2, **self.options())

    def update_w(self, target: Block, W: Tensor, H: Tensor, l1: float = 0.0, l2: float | Tensor = 0.0) -> Tensor:
        """The rule's new W for fixed H."""
        return self.module.update_w(target, W, H, l1, l2, **self.options())


class MURule(Rule):
    """Multiplicative updates (scikit-learn's ``solver='mu'``) for the beta-divergence: 2 Frobenius, 1 KL, 0 IS."""

    module = mu

    def __init__(self, beta: float = 2.0):
        self.beta = float(beta)

    @property
    def gram_form(self) -> bool:  # noqa: D102
        return self.beta == 2

    def options(self) -> dict:  # noqa: D102
        return {"beta": self.beta}

    def stats_options(self) -> dict:  # noqa: D102
        return {"beta": self.beta}


class HALSRule(Rule):
    """Hierarchical ALS / exact coordinate descent (scikit-learn's ``solver='cd'`` family).

    ``sweeps`` > 1 is accelerated HALS: up to that many passes per X product.
    """

    module = hals
    gram_form = True

    def __init__(self, sweeps: int = 1):
        if isinstance(sweeps, bool) or int(sweeps) < 1:
            raise NMFInputError(f"optimizer.sweeps must be an integer >= 1, got {sweeps!r}.")
        self.sweeps = int(sweeps)

    def options(self) -> dict:  # noqa: D102
        return {"sweeps": self.sweeps}


class ALSRule(Rule):
    """Projected alternating least squares with a small ridge."""

    module = als
    gram_form = True

    def __init__(self, ridge: float = 1e-6):
        if ridge < 0:
            raise NMFInputError(f"optimizer.ridge must be >= 0, got {ridge}.")
        self.ridge = ridge

    def options(self) -> dict:  # noqa: D102
        return {"ridge": self.ridge}


class KaczmarzRule(Rule):
    """Randomized block Kaczmarz with projection; its row sampler is seeded and can be saved."""

    module = kaczmarz
    sums = False  # its H-steps sample rows of X anywhere in the matrix

    def __init__(self, steps: int = 10, block: int = 32, seed: int = 0):
        if steps < 1 or block < 1:
            raise NMFInputError(f"optimizer.steps and optimizer.block must be >= 1, got {steps} and {block}.")
        self.steps, self.block, self.seed = steps, block, seed
        self._generator: torch.Generator | None = None
        self._saved_state: Tensor | None = None  # generator state from a checkpoint

    def _gen(self, like: Tensor) -> torch.Generator:
        if self._generator is None or self._generator.device != like.device:
            self._generator = torch.Generator(device=like.device).manual_seed(self.seed)
            if self._saved_state is not None:
                if self._saved_state.numel() == self._generator.get_state().numel():
                    self._generator.set_state(self._saved_state)
                else:  # CPU and CUDA generators keep states of different kinds
                    warnings.warn(
                        f"the checkpoint's row sampler was saved on another kind of device than {like.device}; "
                        "the resumed run samples rows afresh from optimizer.seed (W and H carry over).",
                        NMFWarning,
                        stacklevel=2,
                    )
                self._saved_state = None
        return self._generator

    def generator_state(self) -> Tensor | None:
        """The row sampler's state (None before the first update), so a resumed run draws the same rows."""
        return self._generator.get_state() if self._generator is not None else self._saved_state

    def set_generator_state(self, state: Tensor | None) -> None:
        """Restore the row sampler's state (applied on the device of the next update)."""
        self._generator = None
        self._saved_state = state.cpu() if state is not None else None

    def update_h(self, target: Block, W: Tensor, H: Tensor, l1: float = 0.0, l2: float | Tensor = 0.0) -> Tensor:  # noqa: D102
        return kaczmarz.update_h(target, W, H, self._gen(W), self.steps, self.block)

    def update_w(self, target: Block, W: Tensor, H: Tensor, l1: float = 0.0, l2: float | Tensor = 0.0) -> Tensor:  # noqa: D102
        return kaczmarz.update_w(target, W, H, self._gen(W), self.steps, self.block)
