"""What a fit's parameters may be, declared once, and which solvers fit which data.

:data:`CONSTRAINTS` is the one table of allowed values (scikit-learn declares the same
in ``_parameter_constraints``); :func:`check_params` checks values against it and
:func:`check_compatible` checks a solver against the data, loss, precision and mode of a
run. ``nmf-train``, the estimator and ``nmf-transform`` call both before any work starts,
each naming parameters in its own words (:class:`Words`), so a message points at what the
user typed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nmf_lightning.init import INITS, SVD_INITS
from nmf_lightning.objective import LOSSES
from nmf_lightning.solvers import registry
from nmf_lightning.solvers.registry import SolverInfo
from nmf_lightning.validation import NMFInputError


class Constraint:
    """An allowed set of values, with the words that describe it."""

    def ok(self, value: Any) -> bool:
        """Whether ``value`` is allowed."""
        raise NotImplementedError

    def describe(self) -> str:
        """The allowed values in words ("an integer >= 1")."""
        raise NotImplementedError


@dataclass(frozen=True)
class Integer(Constraint):
    """An integer (never a bool) in ``[low, high]``."""

    low: int | None = None
    high: int | None = None

    def ok(self, value: Any) -> bool:  # noqa: D102
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            return False
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)

    def describe(self) -> str:  # noqa: D102
        return "an integer" + _bounds(self.low, self.high, False)


@dataclass(frozen=True)
class Real(Constraint):
    """A finite real number (never a bool) from ``low`` to ``high``; ``open_low`` leaves ``low`` out."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False

    def ok(self, value: Any) -> bool:  # noqa: D102
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.open_low else value >= self.low)
        return above and (self.high is None or value <= self.high)

    def describe(self) -> str:  # noqa: D102
        return "a finite number" + _bounds(self.low, self.high, self.open_low)


@dataclass(frozen=True)
class Options(Constraint):
    """One of a few values (names, ``None``)."""

    values: tuple[Any, ...]

    def ok(self, value: Any) -> bool:  # noqa: D102
        return any(value is v if v is None or isinstance(v, bool) else value == v for v in self.values)

    def describe(self) -> str:  # noqa: D102
        shown = [repr(v) if isinstance(v, str) else str(v) for v in self.values]
        return shown[0] if len(shown) == 1 else f"one of {', '.join(shown)}"


@dataclass(frozen=True)
class Boolean(Constraint):
    """True or False (numpy's bools too)."""

    def ok(self, value: Any) -> bool:  # noqa: D102
        return isinstance(value, (bool, np.bool_))

    def describe(self) -> str:  # noqa: D102
        return "True or False"


@dataclass(frozen=True)
class Kind(Constraint):
    """An instance of ``kinds``, or (``callable``) anything callable; ``what`` describes it."""

    what: str
    kinds: tuple[type, ...] = ()
    callable: bool = False

    def ok(self, value: Any) -> bool:  # noqa: D102
        return callable(value) if self.callable else isinstance(value, self.kinds)

    def describe(self) -> str:  # noqa: D102
        return self.what


@dataclass(frozen=True)
class Scale(Constraint):
    """A pair ``[low, high]`` of finite numbers with low < high (a rating scale)."""

    def ok(self, value: Any) -> bool:  # noqa: D102
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            return False
        pair = list(value)
        return len(pair) == 2 and all(Real().ok(v) for v in pair) and pair[0] < pair[1]

    def describe(self) -> str:  # noqa: D102
        return "a pair [low, high] of finite numbers with low < high"


@dataclass(frozen=True)
class AnyOf(Constraint):
    """Any one of several constraints (``auto`` or a number > 0)."""

    parts: tuple[Constraint, ...]

    def ok(self, value: Any) -> bool:  # noqa: D102
        return any(part.ok(value) for part in self.parts)

    def describe(self) -> str:  # noqa: D102
        words = [part.describe() for part in self.parts]
        return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _bounds(low: float | None, high: float | None, open_low: bool) -> str:
    parts = [] if low is None else [f"{'>' if open_low else '>='} {_number(low)}"]
    parts += [] if high is None else [f"<= {_number(high)}"]
    return (" " + " and ".join(parts)) if parts else ""


def _number(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def one_of(*parts: Constraint | Any) -> Constraint:
    """A constraint from constraints and plain values (``None``, ``"auto"``)."""
    made = tuple(p if isinstance(p, Constraint) else Options((p,)) for p in parts)
    return made[0] if len(made) == 1 else AnyOf(made)


PENALTY = Real(0)
PENALTY_KEYS = ("l1_W", "l1_H", "l2_W", "l2_H")
#: the engine's parameters, by the names of :class:`~nmf_lightning.engine.problem.Spec` (and the run's steps)
CONSTRAINTS: dict[str, Constraint] = {
    "rank": Integer(1),
    "loss": Options(LOSSES),
    "beta": one_of(None, Real()),
    "lam": PENALTY,
    "l1_W": PENALTY,
    "l1_H": PENALTY,
    "l2_W": PENALTY,
    "l2_H": PENALTY,
    "l2_scale": Options(("none", "count")),
    "l21_H": PENALTY,
    "biases": Boolean(),
    "l2_bias": PENALTY,
    "project": Boolean(),
    "lam_growth": Real(1),
    "neg_tol": Real(0, 1, open_low=True),
    "lam_every": Integer(1),
    "init": Options(INITS),
    "init_scale": Real(0, open_low=True),
    "loss_form": Options(("auto", "residual", "gram")),
    "restarts": Integer(1),
    "consensus": Boolean(),
    "density_threshold": Real(0, open_low=True),
    "neighbors": Real(0, 1, open_low=True),
    "consensus_refine": Integer(0),
    "rank_min": Integer(1),
    "rank_max": Integer(1),
    "rank_holdout": Real(0, 0.5, open_low=True),
    "rank_rule": Options(("min", "1se")),
    "seed": Integer(),
    "tol": one_of(None, Real(0)),
    "tol_window": Integer(1),
    "online": Boolean(),
    "forget": Real(0, 1, open_low=True),
    "compile": Boolean(),
    "lr": one_of("auto", Real(0, open_low=True)),
    "steps": Integer(1),
    "batch_rows": one_of(Integer(1), None),
    "rating_range": one_of(None, Scale()),
}
#: why a value matters, where the bare constraint would not say (shown after it)
PURPOSE = {name: "a penalty weight" for name in ("lam", "l1_W", "l1_H", "l2_W", "l2_H", "l21_H")} | {
    "lam_growth": "the factor lam is multiplied by; 1 keeps it fixed",
    "neg_tol": "the factors' negative mass the penalty schedule aims below",
    "lam_every": "updates between the schedule's checks",
    "steps": "the number of updates",
    "batch_rows": "rows per block",
    "rating_range": "the scale predictions are clipped to",
    "l2_bias": "the biases' shrinkage: a row with n entries keeps n / (n + l2_bias) of its mean residual",
    "l2_scale": "what l2_W and l2_H are multiplied by: 1, or each row's and column's observed entries",
}


def check_params(
    values: Mapping[str, Any],
    constraints: Mapping[str, Constraint] = CONSTRAINTS,
    name: Callable[[str], str] | Words = str,
) -> None:
    """Raise on the first value not allowed by its constraint; ``name`` spells a parameter as the user does.

    The message reads ``<name> must be <allowed> (<purpose>), got <value>.``; a front end's
    :class:`Words` for a config (not Python's literals) writes None as YAML's ``null``.
    """
    yaml = isinstance(name, Words) and not name.quote
    spell = name.name if isinstance(name, Words) else name
    for key, value in values.items():
        rule = constraints.get(key)
        if rule is None or rule.ok(value):
            continue
        purpose = f" ({PURPOSE[key]})" if key in PURPOSE else ""
        allowed = rule.describe().replace("None", "null") if yaml else rule.describe()
        raise NMFInputError(f"{spell(key)} must be {allowed}{purpose}, got {value!r}.")


@dataclass(frozen=True)
class Words:
    """How a front end names its parameters, so a message names what the user typed.

    ``params`` maps the engine's names to the user's (``rank`` -> ``model.rank``);
    ``show(name, value)`` writes a setting (``model.loss=kl``, ``beta_loss='kullback-leibler'``);
    ``solver(name)`` a solver choice (``optimizer=hals``, ``solver='cd'``), ``aliases`` the
    user's names for registry names (``hals`` -> ``cd``).
    """

    params: Mapping[str, str] = field(default_factory=dict)
    quote: bool = False
    solver_key: str = "optimizer"
    aliases: Mapping[str, str] = field(default_factory=dict)
    #: what the user sets for row blocks, for DDP ranks, for online updates (None: this front end has none)
    blocks: str | None = "data.batch_rows"
    online: str = "model.online=true"
    precision_fix: str = "trainer.precision=32-true"
    #: the user's value for the KL loss, which takes zeros
    kl: Any = "kl"
    #: the user's own spelling of a setting's value (``beta_loss``'s name rather than the engine's loss)
    values: Mapping[str, Any] = field(default_factory=dict)
    #: whether this front end offers the gradient solvers too
    gradient: bool = True
    #: where this front end's missing entries come from
    missing: str = "NaN entries"
    #: how this front end reads a sparse X's unstored entries as missing
    unstored: str = "give X dense, with NaN at the missing entries"

    def name(self, key: str) -> str:
        """The user's name of an engine parameter."""
        return self.params.get(key, key)

    def show(self, key: str, value: Any) -> str:
        """A setting as the user writes it (``model.project=true``, ``beta_loss='kullback-leibler'``)."""
        return self.show_raw(self.name(key), self.values.get(key, value))

    def solver(self, name: str) -> str:
        """A solver choice as the user writes it."""
        return self.show_raw(self.solver_key, self.aliases.get(name, name))

    def show_raw(self, key: str, value: Any) -> str:
        """``key=value`` in the front end's spelling: Python's literals, or YAML's for a config."""
        if isinstance(value, float):
            shown = f"{value:g}"
        elif isinstance(value, bool):
            shown = repr(value) if self.quote else str(value).lower()
        else:
            shown = repr(value) if self.quote else str(value)
        return f"{key}={shown}"

    def solvers(self, names: Iterable[str], gradient: bool = False) -> str:
        """A choice of solvers: ``optimizer=hals, mu or als``, ``solver='cd', 'mu' or 'als'``.

        ``gradient``: the gradient solvers would do too, where this front end has them.
        """
        shown = [repr(self.aliases.get(n, n)) if self.quote else self.aliases.get(n, n) for n in names]
        listed = shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"
        return f"{self.solver_key}={listed}" + (", or a gradient solver" if gradient and self.gradient else "")


#: the engine's own words: a Spec's field names, in Python's spelling
ENGINE_WORDS = Words(quote=True, solver_key="optimizer")
#: nmf-train's words: the config keys
CLI_WORDS = Words(
    missing="NaN entries, entries held out by data.holdout, or unstored ones with data.unstored=missing",
    unstored="set data.unstored=missing to read them as missing (ratings)",
    params={key: f"model.{key}" for key in CONSTRAINTS}
    | {
        "lr": "optimizer.lr",
        "steps": "trainer.max_steps",
        "batch_rows": "data.batch_rows",
        "rating_range": "data.rating_range",
        "precision": "trainer.precision",
        "seed": "seed",  # (model.seed is ${seed}: the user sets seed)
        "holdout_seed": "data.holdout_seed",
        "num_workers": "data.num_workers",
    },
)


def _closed_form_with(need: str) -> list[str]:
    """The closed-form solvers that support ``need`` (a :class:`SolverInfo` flag), by name."""
    return [s.name for s in registry.SOLVERS if s.closed_form and getattr(s, need)]


@dataclass(frozen=True)
class Layout:
    """What a fit's X is like, as far as a solver cares."""

    missing: bool = False  # some entries are missing (a dense mask or observed triplets)
    observed: bool = False  # kept as observed triplets only (ratings)
    sparse: bool = False  # a sparse matrix (CSR)
    streamed: bool = False  # in row blocks (data.batch_rows), H from sums over them
    on_disk: bool = False  # read from where it lies a block at a time, never held whole
    ranks: int = 1  # processes sharing X's rows (trainer=ddp)


def check_compatible(
    info: SolverInfo,
    words: Words,
    *,
    layout: Layout = Layout(),
    beta: float | None = None,
    loss: str = "fro",
    project: bool = True,
    online: bool = False,
    half: bool = False,
    precision: str | None = None,
    penalties: bool = False,
    l21: bool = False,
    biases: bool = False,
) -> None:
    """Refuse a solver that cannot fit this run (its loss, data layout, precision, mode), naming the way out.

    ``half``: the factors are bfloat16 (or float16); a 16-bit ``precision`` (``bf16-mixed``
    too) computes X's products in 16 bits, which sparse kernels do not.
    """
    solver = words.solver(info.name)
    loss_shown = words.show("loss", loss)
    if beta is not None and not project:
        raise NMFInputError(
            f"{loss_shown} is a beta-divergence, defined for W H >= 0 only; it trains with "
            f"{words.show('project', True)} (the default)."
        )
    adam = words.solvers(["adam"])
    gradient = f", or a gradient solver such as {adam}" if words.gradient else ""
    if beta is not None and not info.beta:
        raise NMFInputError(
            f"{solver} fits the Frobenius loss only, not {loss_shown}; use {words.solvers(['mu'])} "
            f"(multiplicative updates for any beta){gradient}."
        )
    if beta is not None and online:
        raise NMFInputError(
            f"{words.online} fits the Frobenius loss only; {loss_shown} needs updates of H once per pass."
        )
    if l21 and not info.l21:
        raise NMFInputError(
            f"{solver} has no closed form for the L2,1 penalty ({words.name('l21_H')}); use a gradient "
            f"solver such as {adam}."
        )
    if penalties and not info.penalties:
        raise NMFInputError(
            f"{solver} takes no L1/L2 penalty ({', '.join(dict.fromkeys(words.name(k) for k in PENALTY_KEYS))}); "
            f"use {words.solvers(_closed_form_with('penalties'))}."
        )
    if biases and not info.observed:
        raise NMFInputError(
            f"{solver} cannot fit {words.show('biases', True)}: a biased model reads X as its observed entries "
            f"only; use {words.solvers(_closed_form_with('observed'), gradient=True)}."
        )
    if biases and layout.sparse and not layout.observed:
        raise NMFInputError(
            f"{words.show('biases', True)} predicts ratings at the observed entries, but X is sparse with its "
            f"unstored entries observed zeros; {words.unstored}."
        )
    if layout.observed and not info.observed:
        raise NMFInputError(
            f"{solver} needs a dense mask, but X is kept as its observed entries only (ratings); "
            f"use {words.solvers(_closed_form_with('observed'), gradient=True)}."
        )
    if layout.sparse and not info.sparse:
        raise NMFInputError(
            f"{solver} needs X dense, and X is sparse; use {words.solvers(_closed_form_with('sparse'), gradient=True)}."
        )
    if layout.missing and not info.missing:
        raise NMFInputError(
            f"{solver} cannot skip missing entries ({words.missing}), and X has some; "
            f"use {words.solvers(_closed_form_with('missing'), gradient=True)}."
        )
    if half and not info.half:
        raise NMFInputError(
            f"{solver} solves k x k systems, which {words.show('precision', precision)} cannot; use "
            f"{words.precision_fix} (or {words.solvers(['hals', 'mu'])})."
        )
    if (half or "16" in str(precision or "")) and layout.sparse:
        raise NMFInputError(
            f"{words.show('precision', precision)} has no sparse matrix kernels; X is sparse, so use "
            f"{words.precision_fix}."
        )
    if online and not info.online:
        raise NMFInputError(
            f"{words.online} updates H from running sums after every block of rows, which "
            f"{words.solvers(_closed_form_with('online'))} have; got {solver}."
        )
    if online and not layout.streamed:
        raise NMFInputError(
            f"{words.online} updates H after every row block, so it needs X in row blocks: {words.blocks}=B "
            f"(with {words.solvers(_closed_form_with('online'))})."
        )
    if not info.blocks and (layout.streamed or layout.ranks > 1):
        where = (
            f"which trainer=ddp with {layout.ranks} ranks splits between processes"
            if layout.ranks > 1
            else f"so it cannot take X in row blocks ({words.blocks})"
        )
        raise NMFInputError(
            f"{solver} samples rows anywhere in X for every update, {where}; "
            f"use {words.solvers(_closed_form_with('blocks'))} (their H-updates read sums over the blocks)."
        )
    if online and layout.ranks > 1:
        raise NMFInputError(
            f"{words.online} updates H after every row block, but under trainer=ddp with {layout.ranks} ranks "
            "each rank holds other blocks; H is updated once per pass there."
        )


def check_biases(biases: bool, beta: float | None, restarts: int, online: bool, words: Words) -> None:
    """A biased model (mu + b_i + c_j + (W H)_ij) is fit on the squared error, one start, H once per pass."""
    if not biases:
        return
    setting = words.show("biases", True)
    if beta is not None:
        raise NMFInputError(
            f"{setting} adds unconstrained biases to W H, which the {words.show('loss', words.kl)} family of "
            f"losses (defined for W H >= 0) cannot take; use the squared error: {words.show('loss', 'fro2')}."
        )
    if restarts > 1:
        raise NMFInputError(
            f"{setting} trains one start, but {words.show('restarts', restarts)}; set {words.show('restarts', 1)}."
        )
    if online:
        raise NMFInputError(
            f"{setting} takes its column biases' step from a whole pass's sums, and {words.online} updates H "
            "after every block; train it without online updates."
        )


def check_schedule(growth: float, lam: float, clamps: bool, words: Words) -> None:
    """A growing penalty weight needs a penalty to grow, on factors free to go negative (``clamps``)."""
    if growth == 1:
        return
    setting = words.show("lam_growth", growth)
    if not clamps:
        raise NMFInputError(
            f"{setting} grows the clamp penalty of a run that lets the factors go negative: it needs "
            f"{words.show('project', False)} and a gradient solver (projected and closed-form solvers keep W, H >= 0 "
            "by themselves)."
        )
    if not lam:
        raise NMFInputError(f"{setting} grows {words.name('lam')}, which is 0; start it above 0 (e.g. 10).")


def check_restarts(init: str, restarts: int, words: Words) -> None:
    """Restarts need starts that differ: the user's own factors are one start.

    (A deterministic SVD init starts restart 0 and the others draw random starts.)
    """
    if restarts > 1 and init == "custom":
        raise NMFInputError(
            f"{words.show('init', init)} gives the same start every time, so {words.show('restarts', restarts)} "
            f"would train identical copies; use {words.show('init', 'random')}, nndsvda or nndsvdar."
        )


def check_consensus(consensus: bool, restarts: int, words: Words) -> None:
    """A consensus needs restarts to agree on: cNMF clusters tens to hundreds of them."""
    if consensus and restarts < 2:
        raise NMFInputError(
            f"{words.show('consensus', True)} clusters the components of many restarts, but "
            f"{words.show('restarts', restarts)}; train several (e.g. {words.show('restarts', 50)})."
        )


def check_init(init: str, rank: int, shape: tuple[int, int], words: Words, whole: bool = True) -> None:
    """An init must fit the rank, and ``whole``: one process reads all of X, when it needs an SVD.

    (See :func:`check_restarts` too.) A streamed X's SVD takes a few passes over its blocks.
    """
    n, m = shape
    if init in SVD_INITS and rank > min(n, m):
        raise NMFInputError(
            f"{words.show('init', init)} needs {words.name('rank')} <= min(n, m) = {min(n, m)} for X of shape "
            f"{n}x{m}, got {rank}; lower the rank or use {words.show('init', 'random')}."
        )
    if init in SVD_INITS and not whole:
        raise NMFInputError(
            f"{words.show('init', init)} reads X's singular vectors, which X split over processes never "
            f"holds in one; use {words.show('init', 'random')}."
        )
