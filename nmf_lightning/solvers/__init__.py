"""Closed-form NMF update rules, chosen like optimizers: ``optimizer=mu`` or ``optimizer=hals``.

Each rule is a set of pure functions in its own module: ``update_w(target, W, H, l1, l2)``
(row-local: a block of X's rows updates its rows of W), ``h_stats(target, W, H)`` (sums
over row blocks) and ``h_from_stats(stats, H, l1, l2)``, with ``update_h`` for a whole X
in memory. The classes here wrap them as ``torch.optim.Optimizer`` objects so Lightning
checkpoints and configures them like Adam, while the engine
(:class:`~nmf_lightning.engine.SolverUpdate`) drives them without gradients.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType

import torch
from torch import Tensor

from nmf_lightning.engine.target import Target
from nmf_lightning.solvers import als, hals, kaczmarz, mu


class Solver(torch.optim.Optimizer):
    """Base class: one update = a pass over W's rows, then H (no gradients, no lr)."""

    rule: ModuleType
    #: whether the rule can fit (row, col, value) ratings triplets, a dense mask, L1/L2 weights
    supports_triplets = True
    supports_mask = True
    supports_penalties = True
    #: whether H can be updated from sums over row blocks (X streamed in blocks of rows)
    supports_blocks = True

    def __init__(self, params: Iterable[Tensor], **defaults):
        super().__init__(params, defaults=defaults)

    def h_stats(self, target: Target, W: Tensor, H: Tensor) -> dict[str, Tensor]:
        """This block's part of the sums over rows that the H-update reads."""
        return self.rule.h_stats(target, W, H)

    def h_from_stats(self, stats: dict[str, Tensor], H: Tensor, l1: float = 0.0, l2: float = 0.0) -> Tensor:
        """The rule's new H from the statistics summed over all row blocks."""
        return self.rule.h_from_stats(stats, H, l1, l2)

    def update_h(self, target: Target, W: Tensor, H: Tensor, l1: float = 0.0, l2: float = 0.0) -> Tensor:
        """The rule's new H for fixed W."""
        return self.rule.update_h(target, W, H, l1, l2)

    def update_w(self, target: Target, W: Tensor, H: Tensor, l1: float = 0.0, l2: float = 0.0) -> Tensor:
        """The rule's new W for fixed H."""
        return self.rule.update_w(target, W, H, l1, l2)

    def step(self, closure=None):  # noqa: D102 - a solver has no gradient step
        raise RuntimeError(f"{type(self).__name__} is a closed-form solver: the engine calls its updates, not step().")


class MU(Solver):
    """Lee-Seung multiplicative updates (scikit-learn's ``solver='mu'``)."""

    rule = mu


class HALS(Solver):
    """Hierarchical ALS / exact coordinate descent (scikit-learn's ``solver='cd'`` family)."""

    rule = hals
    supports_triplets = False


class ALS(Solver):
    """Projected alternating least squares (the ALS notebook's method, made correct)."""

    rule = als

    def __init__(self, params: Iterable[Tensor], ridge: float = 1e-6):
        if ridge < 0:
            raise ValueError(f"optimizer.ridge must be >= 0, got {ridge}.")
        super().__init__(params, ridge=ridge)

    def update_h(self, target: Target, W: Tensor, H: Tensor, l1: float = 0.0, l2: float = 0.0) -> Tensor:  # noqa: D102
        return als.update_h(target, W, H, l1, l2, self.defaults["ridge"])

    def update_w(self, target: Target, W: Tensor, H: Tensor, l1: float = 0.0, l2: float = 0.0) -> Tensor:  # noqa: D102
        return als.update_w(target, W, H, l1, l2, self.defaults["ridge"])

    def h_from_stats(self, stats: dict[str, Tensor], H: Tensor, l1: float = 0.0, l2: float = 0.0) -> Tensor:  # noqa: D102
        return als.h_from_stats(stats, H, l1, l2, self.defaults["ridge"])


class Kaczmarz(Solver):
    """Randomized block Kaczmarz with projection (the ALS notebook's second method)."""

    rule = kaczmarz
    supports_triplets = False
    supports_mask = False
    supports_penalties = False
    supports_blocks = False  # its H-steps sample rows of X anywhere in the matrix

    def __init__(self, params: Iterable[Tensor], steps: int = 10, block: int = 32, seed: int = 0):
        if steps < 1 or block < 1:
            raise ValueError(f"optimizer.steps and optimizer.block must be >= 1, got {steps} and {block}.")
        super().__init__(params, steps=steps, block=block, seed=seed)
        self._generator: torch.Generator | None = None
        self._saved_state: Tensor | None = None  # generator state from a checkpoint

    def _gen(self, like: Tensor) -> torch.Generator:
        if self._generator is None or self._generator.device != like.device:
            self._generator = torch.Generator(device=like.device).manual_seed(self.defaults["seed"])
            if self._saved_state is not None:
                self._generator.set_state(self._saved_state)
                self._saved_state = None
        return self._generator

    def state_dict(self) -> dict:
        """The optimizer state plus the row sampler's, so a resumed run draws the same rows."""
        state = super().state_dict()
        if self._generator is not None:
            state["generator_state"] = self._generator.get_state()
        elif self._saved_state is not None:
            state["generator_state"] = self._saved_state
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the optimizer state and the row sampler's."""
        state_dict = dict(state_dict)
        saved = state_dict.pop("generator_state", None)
        super().load_state_dict(state_dict)
        self._generator = None
        self._saved_state = saved.cpu() if saved is not None else None

    def update_h(self, target: Target, W: Tensor, H: Tensor, l1: float = 0.0, l2: float = 0.0) -> Tensor:  # noqa: D102
        d = self.defaults
        return kaczmarz.update_h(target, W, H, self._gen(W), d["steps"], d["block"])

    def update_w(self, target: Target, W: Tensor, H: Tensor, l1: float = 0.0, l2: float = 0.0) -> Tensor:  # noqa: D102
        d = self.defaults
        return kaczmarz.update_w(target, W, H, self._gen(W), d["steps"], d["block"])


SOLVERS = {"mu": MU, "hals": HALS, "als": ALS, "kaczmarz": Kaczmarz}

__all__ = ["ALS", "HALS", "MU", "SOLVERS", "Kaczmarz", "Solver", "Target"]
