"""Closed-form NMF update rules, chosen like optimizers: ``optimizer=mu`` or ``optimizer=hals``.

Each rule is a set of pure functions in its own module: ``update_w(target, W, H, l1, l2)``
(row-local: a block of X's rows updates its rows of W), ``h_stats(target, W, H)`` (sums
over row blocks) and ``h_from_stats(stats, H, l1, l2)``, with ``update_h`` for a whole X
in memory. :mod:`~nmf_lightning.solvers.rules` holds them with their options as plain
objects, which the engine (:class:`~nmf_lightning.engine.SolverUpdate`) drives without
gradients; the classes here wrap those as ``torch.optim.Optimizer`` objects so Lightning
checkpoints and configures them like Adam. :mod:`~nmf_lightning.solvers.registry` lists
every solver, these and the gradient optimizers, with what each supports.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from nmf_lightning.solvers import als, hals, kaczmarz, mu
from nmf_lightning.solvers.rules import ALSRule, HALSRule, KaczmarzRule, MURule, Rule


class Solver(torch.optim.Optimizer):
    """Base class: one update = a pass over W's rows, then H (no gradients, no lr).

    The update itself is ``rule``'s (a :class:`~nmf_lightning.solvers.rules.Rule`, which
    the engine drives); being an optimizer lets Lightning configure and checkpoint it like Adam.
    """

    rule_class: type[Rule]

    def __init__(self, params: Iterable[Tensor], **options):
        self.rule = self.rule_class(**options)
        super().__init__(params, defaults=options)

    def step(self, closure=None):  # noqa: D102 - a solver has no gradient step
        raise RuntimeError(f"{type(self).__name__} is a closed-form solver: the engine calls its updates, not step().")


class MU(Solver):
    """Lee-Seung multiplicative updates (scikit-learn's ``solver='mu'``)."""

    rule_class = MURule


class HALS(Solver):
    """Hierarchical ALS / exact coordinate descent (scikit-learn's ``solver='cd'`` family); ``sweeps``: see HALSRule."""

    rule_class = HALSRule

    def __init__(self, params: Iterable[Tensor], sweeps: int = 1):
        super().__init__(params, sweeps=sweeps)


class ALS(Solver):
    """Projected alternating least squares (the ALS notebook's method, made correct)."""

    rule_class = ALSRule

    def __init__(self, params: Iterable[Tensor], ridge: float = 1e-6):
        super().__init__(params, ridge=ridge)


class Kaczmarz(Solver):
    """Randomized block Kaczmarz with projection (the ALS notebook's second method)."""

    rule_class = KaczmarzRule

    def __init__(self, params: Iterable[Tensor], steps: int = 10, block: int = 32, seed: int = 0):
        super().__init__(params, steps=steps, block=block, seed=seed)

    def state_dict(self) -> dict:
        """The optimizer state plus the row sampler's, so a resumed run draws the same rows."""
        state = super().state_dict()
        saved = self.rule.generator_state()
        if saved is not None:
            state["generator_state"] = saved
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the optimizer state and the row sampler's."""
        state_dict = dict(state_dict)
        saved = state_dict.pop("generator_state", None)
        super().load_state_dict(state_dict)
        self.rule.set_generator_state(saved)


__all__ = [
    "ALS",
    "HALS",
    "MU",
    "Kaczmarz",
    "Rule",
    "Solver",
    "als",
    "hals",
    "kaczmarz",
    "mu",
]
