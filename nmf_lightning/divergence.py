"""The beta-divergence D_beta(X | WH) as pure functions of tensors, in scikit-learn's definition.

    d(x, y) = (x^b + (b - 1) y^b - b x y^(b - 1)) / (b (b - 1))

with the limits b = 1, the generalized Kullback-Leibler divergence ``x log(x / y) - x + y``
(Poisson likelihood: counts), and b = 0, the Itakura-Saito divergence
``x / y - log(x / y) - 1`` (scale-invariant: power spectra); b = 2 is ``(x - y)^2 / 2``.
The values equal ``sklearn.decomposition._nmf._beta_divergence`` for the same X, W, H, so
numbers compare directly: ``y`` is floored at scikit-learn's EPSILON (1.2e-7) where
``x > 0``. (scikit-learn's function also counts entries with ``0 < x <= EPSILON`` as zeros,
which for IS turns their term into -1; here every positive entry counts as itself.)

Only the entries of X that are stored (sparse X) or observed (missing entries) are read
as ``x``; a sparse X's unstored zeros enter KL through ``sum(WH) = <1^T W, H 1>`` alone,
which is what keeps sparse KL at O(nnz k).
"""

from __future__ import annotations

import torch
from torch import Tensor

from nmf_lightning.validation import NMFInputError

#: scikit-learn's EPSILON: the floor of WH where x > 0, and the guard of the MU denominators
EPSILON = float(torch.finfo(torch.float32).eps)
#: the losses named for their beta
NAMED_BETAS = {"kl": 1.0, "is": 0.0}


def loss_beta(loss: str, beta: float | None = None) -> float | None:
    """The beta of ``model.loss`` (``kl`` 1, ``is`` 0, ``beta`` the given one); None for the Frobenius losses."""
    if loss in NAMED_BETAS:
        if beta is not None and float(beta) != NAMED_BETAS[loss]:
            raise NMFInputError(
                f"model.loss={loss} is the beta-divergence with beta={NAMED_BETAS[loss]:g}, but model.beta={beta}; "
                f"drop model.beta, or use model.loss=beta model.beta={beta}."
            )
        return NAMED_BETAS[loss]
    if loss == "beta":
        if beta is None:
            raise NMFInputError("model.loss=beta needs model.beta (2 = Frobenius, 1 = KL, 0 = Itakura-Saito).")
        return float(beta)
    if beta is not None:
        raise NMFInputError(f"model.beta={beta} applies to model.loss=beta only, and model.loss={loss}.")
    return None


def mu_exponent(beta: float) -> float:
    """gamma(beta) of Fevotte & Idier (2011): the MU exponent that makes the updates monotone."""
    if beta < 1:
        return 1.0 / (2.0 - beta)
    if beta > 2:
        return 1.0 / (beta - 1.0)
    return 1.0


def floor(y: Tensor, x: Tensor | None = None) -> Tensor:
    """WH floored at EPSILON (where ``x > 0`` when ``x`` is given), as scikit-learn does before dividing."""
    low = y.clamp_min(EPSILON)
    return low if x is None else torch.where(x > 0, low, y)


def elementwise(x: Tensor, y: Tensor, beta: float) -> Tensor:
    """d(x, y) entry by entry (dense x, y of one shape; y floored where x > 0, everywhere for beta <= 0)."""
    y = floor(y) if beta <= 0 else floor(y, x)
    if beta == 2:
        return 0.5 * (x - y) ** 2
    pos = x > 0
    xs = torch.where(pos, x, torch.ones_like(x))  # 1 where x = 0: log and powers stay finite
    ratio = xs / y
    if beta == 1:
        return torch.where(pos, x * torch.log(ratio) - x + y, y)
    if beta == 0:  # x > 0 everywhere (checked before training)
        return ratio - torch.log(ratio) - 1
    zero = y**beta / beta  # d(0, y) for beta > 0
    full = (x**beta + (beta - 1) * y**beta - beta * x * y ** (beta - 1)) / (beta * (beta - 1))
    return torch.where(pos, full, zero)


def accumulator(dtype: torch.dtype) -> torch.dtype:
    """The dtype a divergence is summed in: at least float32 (a bf16 sum of n m terms is rounding noise)."""
    return torch.promote_types(dtype, torch.float32)


def at_stored(x: Tensor, y: Tensor, beta: float) -> Tensor:
    """The part of D over stored entries that differs from their d(0, y), summed on the last axis.

    For a sparse X: D = this + sum over all entries of d(0, WH), which for KL is sum(WH)
    (no n x m product) and for beta > 0 is ``sum(WH^beta) / beta``.
    """
    y, acc = floor(y), accumulator(y.dtype)
    if beta == 1:
        return (torch.xlogy(x, x / y) - x).sum(-1, dtype=acc)  # a stored 0 adds nothing
    return ((x**beta - beta * x * y ** (beta - 1)) / (beta * (beta - 1))).sum(-1, dtype=acc)


def derivative(x: Tensor, y: Tensor, beta: float) -> Tensor:
    """d/dy d(x, y) = y^(beta - 1) - x y^(beta - 2), entry by entry, with the MU terms' floors."""
    if beta == 2:
        return y - x
    return mu_model(y, beta) - mu_ratio(x, y, beta)


def mu_ratio(x: Tensor, y: Tensor, beta: float) -> Tensor:
    """The entries ``x y^(beta - 2)`` the MU numerators multiply by (y floored as scikit-learn does)."""
    if beta == 2:
        return x
    if beta == 1:
        return x / floor(y)
    return x * floor(y) ** (beta - 2)


def mu_model(y: Tensor, beta: float) -> Tensor:
    """y^(beta - 1): the entries the MU denominators multiply by (y floored for beta < 1)."""
    if beta == 1:
        return torch.ones_like(y)
    return (floor(y) if beta < 1 else y) ** (beta - 1)


def mu_ratio_(x: Tensor, y: Tensor, beta: float) -> Tensor:
    """:func:`mu_ratio` written over ``y`` (a scratch W H): no allocation of an n x m temporary."""
    y.clamp_(min=EPSILON)
    if beta == 1:
        return torch.div(x, y, out=y)
    return y.pow_(beta - 2).mul_(x)


def mu_model_(y: Tensor, beta: float) -> Tensor:
    """:func:`mu_model` written over ``y`` (a scratch W H)."""
    if beta == 1:
        return y.fill_(1.0)
    if beta < 1:
        y.clamp_(min=EPSILON)
    return y.pow_(beta - 1)
