"""Lee-Seung multiplicative updates for the (masked) Frobenius loss with L1 penalties.

Each factor is multiplied by a ratio of non-negative terms, so W, H stay >= 0 and the
objective 1/2 ||M * (X - WH)||^2 + l1 |.|_1 + l2/2 ||.||^2 (per factor) never increases;
the penalties enter the denominators as in scikit-learn. The H-update reads W^T X and
the model term W^T (M * WH) (W^T W H without missing entries), sums over row blocks;
the W-update is the H-update on the transposed problem.
Ref: Lee & Seung, "Algorithms for non-negative matrix factorization", NIPS 2001.
"""

from __future__ import annotations

from torch import Tensor

from nmf_lightning.engine.target import Target, eps_for, gram


def update_h(t: Target, W: Tensor, H: Tensor, l1_H: float = 0.0, l2_H: float = 0.0) -> Tensor:
    """H <- H * (W^T X) / (W^T (M * WH) + l1_H + l2_H H); shapes W (..., n, k), H (..., k, m)."""
    return h_from_stats(h_stats(t, W, H), H, l1_H, l2_H)


def update_w(t: Target, W: Tensor, H: Tensor, l1_W: float = 0.0, l2_W: float = 0.0) -> Tensor:
    """W <- W * (X H^T) / ((M * WH) H^T + l1_W + l2_W W): :func:`update_h` on the transposed problem."""
    return update_h(t.transposed(), H.mT, W.mT, l1_W, l2_W).mT


def h_stats(t: Target, W: Tensor, H: Tensor) -> dict[str, Tensor]:
    """The sums over row blocks the H-update reads: W^T X and W^T W (W^T (M * WH) when masked)."""
    if t.masked:
        return {"WtX": t.WtX(W), "model": t.Wt_model(W, H)}
    return {"WtX": t.WtX(W), "WtW": gram(W, left=True)}


def h_from_stats(stats: dict[str, Tensor], H: Tensor, l1_H: float = 0.0, l2_H: float = 0.0) -> Tensor:
    """The H-update from :func:`h_stats` summed over all row blocks."""
    model = stats["model"] if "model" in stats else stats["WtW"] @ H
    return H * stats["WtX"] / (model + l1_H + l2_H * H).clamp_min(eps_for(H))
