"""Lee-Seung multiplicative updates for the (masked) Frobenius loss with L1 penalties.

Each factor is multiplied by a ratio of non-negative terms, so W, H stay >= 0 and the
objective 1/2 ||M * (X - WH)||^2 + l1 |.|_1 + l2/2 ||.||^2 (per factor) never increases;
the penalties enter the denominators as in scikit-learn.
Ref: Lee & Seung, "Algorithms for non-negative matrix factorization", NIPS 2001.
"""

from __future__ import annotations

from torch import Tensor

from nmf_lightning.solvers.products import Target, eps_for, gram


def update_h(t: Target, W: Tensor, H: Tensor, l1_H: float = 0.0, l2_H: float = 0.0) -> Tensor:
    """H <- H * (W^T X) / (W^T (M * WH) + l1_H + l2_H H); shapes W (..., n, k), H (..., k, m)."""
    denom = t.Wt_model(W, H, gram(W, left=True)) + l1_H + l2_H * H
    return H * t.WtX(W) / denom.clamp_min(eps_for(H))


def update_w(t: Target, W: Tensor, H: Tensor, l1_W: float = 0.0, l2_W: float = 0.0) -> Tensor:
    """W <- W * (X H^T) / ((M * WH) H^T + l1_W + l2_W W); the mirror image of :func:`update_h`."""
    denom = t.model_Ht(W, H, gram(H, left=False)) + l1_W + l2_W * W
    return W * t.XHt(H) / denom.clamp_min(eps_for(W))
