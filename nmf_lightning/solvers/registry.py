"""Every solver and gradient optimizer by name, with what it supports: the one list the project reads.

``optimizer=hals`` on the command line, ``NMF(solver="cd")``, ``nmf-transform --solver``,
the compatibility checks and the help texts all look solvers up here, so a new rule or
a new capability is declared once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from nmf_lightning.solvers import ALS, HALS, MU, Kaczmarz, Solver


@dataclass(frozen=True)
class SolverInfo:
    """A solver's names and what it can fit.

    ``factory`` builds it over [W, H]: a :class:`~nmf_lightning.solvers.Solver` (a closed-form
    rule, checkpointed like an optimizer) or a ``torch.optim.Optimizer``.
    """

    name: str
    factory: type
    aliases: tuple[str, ...] = ()
    #: H from running sums after every block of rows (``model.online``, ``partial_fit``)
    online: bool = False
    #: any beta-divergence (KL, Itakura-Saito), not just the Frobenius loss
    beta: bool = True
    #: a dense mask of missing entries (NaN, ``data.holdout``)
    missing: bool = True
    #: X kept as observed (row, column, value) triplets (ratings, mostly-missing X)
    observed: bool = True
    #: a sparse (CSR) X, never made dense
    sparse: bool = True
    #: X in row blocks: streamed (``data.batch_rows``) or sharded over processes (``trainer=ddp``)
    blocks: bool = True
    #: bfloat16 factors (solving k x k systems needs float32 at least)
    half: bool = True
    #: the L1 and L2 penalties of W and H
    penalties: bool = True
    #: the L2,1 penalty of H (a gradient's term only; no closed form)
    l21: bool = True
    #: a step moves an entry by about ``lr`` whatever the gradient's size (Adam-like)
    adaptive: bool = False

    @property
    def closed_form(self) -> bool:
        """Whether it is a closed-form rule (no learning rate; W, H >= 0 by construction)."""
        return isinstance(self.factory, type) and issubclass(self.factory, Solver)


def _rule(name: str, factory: type[Solver], aliases: tuple[str, ...] = (), **supports: bool) -> SolverInfo:
    return SolverInfo(name, factory, aliases, blocks=factory.rule_class.sums, l21=False, **supports)


#: the solvers, closed-form rules first (the estimator's ``solver``, ``nmf-transform --solver``)
SOLVERS: tuple[SolverInfo, ...] = (
    _rule("hals", HALS, ("cd",), online=True, beta=False, observed=False),
    _rule("mu", MU, online=True),
    _rule("als", ALS, beta=False, half=False),
    _rule("kaczmarz", Kaczmarz, beta=False, missing=False, observed=False, penalties=False),
    SolverInfo("adam", torch.optim.Adam, adaptive=True),
    SolverInfo("adamw", torch.optim.AdamW, adaptive=True),
    SolverInfo("rmsprop", torch.optim.RMSprop, adaptive=True),
    SolverInfo("sgd", torch.optim.SGD),
)
#: other torch optimizers whose steps are about lr in size whatever the gradient
_ADAPTIVE = (torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adagrad, torch.optim.Adadelta)


def names(closed_form: bool | None = None) -> list[str]:
    """The solvers' names (and aliases), optionally only the closed-form ones or only the gradient ones."""
    picked = [s for s in SOLVERS if closed_form is None or s.closed_form == closed_form]
    return [name for s in picked for name in (s.name, *s.aliases)]


def lookup(name: str) -> SolverInfo | None:
    """The solver of a name or alias (``cd`` is HALS), or None."""
    return next((s for s in SOLVERS if name == s.name or name in s.aliases), None)


def for_fixed_components(fro: bool, observed: bool = False) -> SolverInfo:
    """The closed-form rule that solves W for fixed H: HALS (each row's exact NNLS) on the Frobenius loss, else MU.

    MU also takes X kept as observed triplets, which HALS does not.
    """
    return lookup("hals" if fro and not observed else "mu")


def of_factory(factory: Any) -> SolverInfo:
    """The solver a factory builds (a class, or a ``functools.partial`` of one, as Hydra's ``_partial_`` gives).

    A torch optimizer not listed is a gradient solver with the generic capabilities.
    """
    target = factory.func if isinstance(factory, partial) else factory
    for info in SOLVERS:
        if target is info.factory:
            return info
    if isinstance(target, type) and issubclass(target, Solver):
        raise TypeError(f"{target.__name__} is a closed-form solver missing from the registry")
    name = getattr(target, "__name__", str(target)).lower()
    return SolverInfo(name, target, adaptive=isinstance(target, type) and issubclass(target, _ADAPTIVE))


def of_target(target: str) -> SolverInfo | None:
    """The solver a config's ``_target_`` names (``nmf_lightning.solvers.HALS``, ``torch.optim.Adam``), or None."""
    for info in SOLVERS:
        if target in (f"{info.factory.__module__}.{info.factory.__qualname__}", _public_path(info.factory)):
            return info
    return None


def _public_path(cls: type) -> str:
    """Where a config names a class: ``torch.optim.Adam``, ``nmf_lightning.solvers.HALS``."""
    package = "torch.optim" if cls.__module__.startswith("torch.optim") else "nmf_lightning.solvers"
    return f"{package}.{cls.__qualname__}"
