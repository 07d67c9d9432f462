"""Projected alternating least squares: solve for all of H, then all of W, then clip at 0.

The ALS notebook updated one random row/column below k per step and never enforced
W, H >= 0; here every row and column is solved at once through the k x k normal
equations (Cholesky, with a small ridge for stability) and then projected. Masked X
solves one small weighted system per column (per row for W), as recommender ALS does.
Not monotone in general (the projection can raise the loss), but fast per update.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nmf_lightning.solvers.products import Target, gram


def update_h(t: Target, W: Tensor, H: Tensor, l1_H: float = 0.0, l2_H: float = 0.0, ridge: float = 1e-6) -> Tensor:
    """H <- max(0, (W^T W + (l2_H + ridge) I)^-1 (W^T X - l1_H)); W (..., n, k), H (..., k, m)."""
    k = W.shape[-1]
    eye = torch.eye(k, dtype=W.dtype, device=W.device)
    rhs = t.WtX(W) - l1_H  # (..., k, m)
    if not t.masked:
        G = gram(W, left=True)
        G = G + (l2_H + ridge * G.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None].clamp_min(1.0)) * eye
        return _solve_psd(G, rhs).clamp_min(0)
    G = _masked_grams(t, W)  # (..., m, k, k)
    G = G + (l2_H + ridge * G.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None].clamp_min(1.0)) * eye
    return _solve_psd(G, rhs.mT[..., None]).squeeze(-1).mT.clamp_min(0)


def update_w(t: Target, W: Tensor, H: Tensor, l1_W: float = 0.0, l2_W: float = 0.0, ridge: float = 1e-6) -> Tensor:
    """W <- max(0, (X H^T - l1_W) (H H^T + ridge I)^-1), the mirror of :func:`update_h`."""
    from nmf_lightning.solvers.hals import _transposed

    return update_h(_transposed(t), H.mT, W.mT, l1_W, l2_W, ridge).mT


def _solve_psd(G: Tensor, B: Tensor) -> Tensor:
    """Solve G Y = B for symmetric positive definite G; fall back to lstsq if Cholesky fails."""
    L, info = torch.linalg.cholesky_ex(G)
    if bool((info == 0).all()):
        return torch.cholesky_solve(B, L)
    return torch.linalg.lstsq(G, B).solution


def _masked_grams(t: Target, W: Tensor) -> Tensor:
    """Per-column Grams W^T diag(M[:, c]) W, shape (..., m, k, k)."""
    if t.vals is not None:
        outer = W[..., t.rows, :, None] * W[..., t.rows, None, :]  # (..., n_obs, k, k)
        G = outer.new_zeros(*outer.shape[:-3], t.shape[1], *outer.shape[-2:])
        return G.index_add_(-3, t.cols, outer)
    M = t.mask.to(W.dtype)
    return torch.einsum("...nk,nm,...nl->...mkl", W, M, W)
