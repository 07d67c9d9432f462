"""Multiplicative updates for the (masked) beta-divergence with L1/L2 penalties.

Each factor is multiplied by a ratio of non-negative terms, so W, H stay >= 0 and the
objective D_beta(M * X | M * WH) + l1 |.|_1 + l2/2 ||.||^2 (per factor) never increases;
the penalties enter the denominators as in scikit-learn. A target that may be negative
(ratings less their biases) is split as X = X+ - X-: W^T X- joins the denominator, as a
penalty does, and the updates stay >= 0 and monotone. For the Frobenius loss (beta = 2,
Lee & Seung) the H-update reads W^T X and the model term W^T (M * WH) (W^T W H without
missing entries); for other betas (Fevotte & Idier) ``W^T (M * X * (WH)^(beta-2))`` and
``W^T (M * (WH)^(beta-1))``, with the ratio raised to gamma(beta). All are sums over row
blocks; the W-update is the H-update on the transposed problem.
Refs: Lee & Seung, NIPS 2001; Fevotte & Idier, Neural Computation 23(9), 2011.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from nmf_lightning.divergence import mu_exponent
from nmf_lightning.linalg import floor_for, gram

if TYPE_CHECKING:
    from nmf_lightning.engine.blocks import Block

#: below this an entry is set to 0 for beta <= 1, as scikit-learn does for stability
_ZERO = float(torch.finfo(torch.float64).eps)


def update_h(
    t: Block, W: Tensor, H: Tensor, l1_H: float = 0.0, l2_H: float | Tensor = 0.0, beta: float = 2.0
) -> Tensor:
    """H <- H * (W^T X) / (W^T (M * WH) + l1_H + l2_H H) (beta = 2); shapes W (..., n, k), H (..., k, m)."""
    return h_from_stats(h_stats(t, W, H, beta), H, l1_H, l2_H, beta)


def update_w(
    t: Block, W: Tensor, H: Tensor, l1_W: float = 0.0, l2_W: float | Tensor = 0.0, beta: float = 2.0
) -> Tensor:
    """W <- W * (X H^T) / ((M * WH) H^T + l1_W + l2_W W): :func:`update_h` on the transposed problem."""
    if beta == 2:
        return _multiply(h_stats(t.transposed(), H.mT, W.mT), W.mT, l1_W, l2_W, beta).mT
    num, den = t.beta_terms(W, H, beta)  # in X's own layout (the transposed problem would stride across X)
    l2_W = l2_W.mT if isinstance(l2_W, Tensor) else l2_W  # a weight per row of W: (b, 1) in W's own layout
    W = _multiply({"num": num, "den": den}, W, l1_W, l2_W, beta)
    return W.masked_fill(W < _ZERO, 0.0) if beta < 1 else W  # scikit-learn: W's for beta < 1, H's for beta <= 1


def h_stats(t: Block, W: Tensor, H: Tensor, beta: float = 2.0) -> dict[str, Tensor]:
    """The sums over row blocks the H-update reads: W^T X and W^T W (W^T (M * WH) when masked); the beta terms."""
    if beta != 2:
        num, den = t.beta_terms_h(W, H, beta)
        return {"num": num, "den": den}
    if t.signed:  # ratings less their biases: the part below 0 pulls down as the model term does
        below = t.negative_part().WtX(W)  # W^T (M * X^-); W^T X = W^T X^+ - W^T X^-
        return {"WtX": t.WtX(W) + below, "model": t.Wt_model(W, H) + below}
    if t.masked:
        return {"WtX": t.WtX(W), "model": t.Wt_model(W, H)}
    return {"WtX": t.WtX(W), "WtW": gram(W, left=True)}


def h_from_stats(
    stats: dict[str, Tensor], H: Tensor, l1_H: float = 0.0, l2_H: float | Tensor = 0.0, beta: float = 2.0
) -> Tensor:
    """The H-update from :func:`h_stats` summed over all row blocks."""
    H = _multiply(stats, H, l1_H, l2_H, beta)
    return H.masked_fill(H < _ZERO, 0.0) if beta <= 1 else H


def _multiply(stats: dict[str, Tensor], H: Tensor, l1: float, l2: float | Tensor, beta: float) -> Tensor:
    """H times the ratio of the summed terms (to the power gamma(beta)).

    The denominator is formed in place and penalties of weight 0 are skipped: on small
    matrices each elementwise op costs more in dispatch than in arithmetic. The summed
    terms themselves are left as they are (online mode keeps them).
    """
    if "num" in stats:
        num, den = stats["num"], _denominator(stats["den"] + 0.0, H, l1, l2)  # den may broadcast: a copy
        ratio = torch.div(num, den, out=den) if den.shape == num.shape else num / den
        gamma = mu_exponent(beta)
        return ratio.mul_(H) if gamma == 1 else ratio.pow_(gamma).mul_(H)
    den = stats["WtW"] @ H if "model" not in stats else stats["model"].clone()
    return torch.div(stats["WtX"], _denominator(den, H, l1, l2), out=den).mul_(H)


def _denominator(den: Tensor, H: Tensor, l1: float, l2: float | Tensor) -> Tensor:
    """``den + l1 + l2 H``, kept above eps of its largest entry (a 0 denominator), written over ``den``.

    ``l2`` may weigh each column of H, broadcasting against it (``model.l2_scale=count``).
    """
    if l1:
        den.add_(l1)
    if isinstance(l2, Tensor):
        den = den.add_(H * l2) if den.shape == H.shape else den + H * l2
    elif l2:  # a broadcast den (KL's sums) grows to H's shape here
        den = den.add_(H, alpha=l2) if den.shape == H.shape else torch.add(den, H, alpha=l2)
    return torch.maximum(den, floor_for(den, (-2, -1), nonnegative=True), out=den)  # eps of its largest: any scale
