"""HALS: exact coordinate descent on one row of H (column of W) at a time.

For row j of H, holding the rest fixed, the minimiser of
1/2 ||X - WH||^2 + l1_H |H|_1 + l2_H/2 ||H||^2 over H[j] >= 0 is (with l2_H added to
the diagonal of W^T W, as scikit-learn does)
``max(0, H[j] + ((W^T X)[j] - (W^T W H)[j] - l1_H) / (W^T W)[j, j])``; a pass over
j = 1..k uses each updated row at once (scikit-learn's ``cd`` solver, Gram form).
Masked X uses the weighted form with per-column denominators.
Ref: Cichocki & Phan, "Fast local algorithms for large scale NMF", IEICE 2009.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nmf_lightning.solvers.products import Target, eps_for, gram


def update_h(t: Target, W: Tensor, H: Tensor, l1_H: float = 0.0, l2_H: float = 0.0) -> Tensor:
    """One HALS pass over the k rows of H; W (..., n, k), H (..., k, m)."""
    H = H.clone()
    eps = eps_for(H)
    if t.masked:
        return _masked_pass(t, W, H, l1_H, l2_H, eps)
    WtX = t.WtX(W)  # (..., k, m)
    WtW = _add_diag(gram(W, left=True), l2_H)  # (..., k, k)
    for j in range(H.shape[-2]):
        step = (WtX[..., j, :] - (WtW[..., j, None, :] @ H).squeeze(-2) - l1_H) / WtW[..., j, j, None].clamp_min(eps)
        H[..., j, :] = (H[..., j, :] + step).clamp_min(0)
    return H


def update_w(t: Target, W: Tensor, H: Tensor, l1_W: float = 0.0, l2_W: float = 0.0) -> Tensor:
    """One HALS pass over the k columns of W, as :func:`update_h` on the transposed problem."""
    W = W.clone()
    eps = eps_for(W)
    if t.masked:
        return _masked_pass(_transposed(t), H.mT, W.mT.clone(), l1_W, l2_W, eps).mT
    XHt = t.XHt(H)  # (..., n, k)
    HHt = _add_diag(gram(H, left=False), l2_W)  # (..., k, k)
    for j in range(W.shape[-1]):
        step = (XHt[..., :, j] - (W @ HHt[..., :, j, None]).squeeze(-1) - l1_W) / HHt[..., j, j, None].clamp_min(eps)
        W[..., :, j] = (W[..., :, j] + step).clamp_min(0)
    return W


def _add_diag(G: Tensor, value: float) -> Tensor:
    return G + value * torch.eye(G.shape[-1], dtype=G.dtype, device=G.device) if value else G


def _masked_pass(t: Target, W: Tensor, H: Tensor, l1: float, l2: float, eps: float) -> Tensor:
    """Weighted HALS for a dense mask M: row j of H solves sum_i M_ic (R_ic + W_ij H_jc - W_ij h)^2."""
    if t.mask is None:
        raise NotImplementedError("masked HALS runs on a dense mask; ratings triplets use optimizer=mu")
    M = t.mask.to(W.dtype)
    R = M * (t.X - W @ H)  # (..., n, m) residual at observed entries
    for j in range(H.shape[-2]):
        w = W[..., :, j, None]  # (..., n, 1)
        num = (w * R).sum(-2) + (w * w * M).sum(-2) * H[..., j, :] - l1
        den = ((w * w * M).sum(-2) + l2).clamp_min(eps)
        new = (num / den).clamp_min(0)
        R = R - M * (w * (new - H[..., j, :])[..., None, :])
        H[..., j, :] = new
    return H


def _transposed(t: Target) -> Target:
    return Target(
        X=t.X.mT if t.X is not None else None,
        Xt=None,
        mask=t.mask.mT if t.mask is not None else None,
        rows=t.cols,
        cols=t.rows,
        vals=t.vals,
        shape=(t.shape[1], t.shape[0]),
    )
