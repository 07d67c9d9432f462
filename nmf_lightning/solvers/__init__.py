"""Closed-form NMF update rules, chosen like optimizers: ``optimizer=mu`` or ``optimizer=hals``.

Each rule is a pair of pure functions ``update_h(target, W, H, l1)`` and
``update_w(target, W, H, l1)`` in its own module; the classes here wrap them as
``torch.optim.Optimizer`` objects so Lightning checkpoints and configures them like Adam,
while :class:`~nmf_lightning.module.NMFModule` drives them without gradients.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType

import torch
from torch import Tensor

from nmf_lightning.solvers import hals, mu
from nmf_lightning.solvers.products import Target


class Solver(torch.optim.Optimizer):
    """Base class: one ``update`` = one pass over H, then one over W (no gradients, no lr)."""

    rule: ModuleType
    #: whether the rule can fit (row, col, value) ratings triplets
    supports_triplets = True

    def __init__(self, params: Iterable[Tensor]):
        super().__init__(params, defaults={})

    @torch.no_grad()
    def update(self, target: Target, W: Tensor, H: Tensor, l1_W: float = 0.0, l1_H: float = 0.0) -> None:
        """Replace H, then W, in place by the rule's exact updates."""
        H.copy_(self.rule.update_h(target, W, H, l1_H))
        W.copy_(self.rule.update_w(target, W, H, l1_W))

    def step(self, closure=None):  # noqa: D102 - a solver has no gradient step
        raise RuntimeError(f"{type(self).__name__} is a closed-form solver: NMFModule calls update(), not step().")


class MU(Solver):
    """Lee-Seung multiplicative updates (scikit-learn's ``solver='mu'``)."""

    rule = mu


class HALS(Solver):
    """Hierarchical ALS / exact coordinate descent (scikit-learn's ``solver='cd'`` family)."""

    rule = hals
    supports_triplets = False


__all__ = ["HALS", "MU", "Solver", "Target"]
