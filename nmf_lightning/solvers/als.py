"""Projected alternating least squares: solve for all of H, then all of W, then clip at 0.

The ALS notebook updated one random row/column below k per step and never enforced
W, H >= 0; here every row and column is solved at once through the k x k normal
equations (Cholesky, with a small ridge for stability) and then projected. Masked X
solves one small weighted system per column (per row for W), as recommender ALS does.
The H-update reads W^T W and W^T X (per-column Grams when masked), sums over row blocks.
Not monotone in general (the projection can raise the loss), but fast per update.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from nmf_lightning.linalg import floor_for, gram, per_column

if TYPE_CHECKING:
    from nmf_lightning.engine.blocks import Block


def update_h(
    t: Block, W: Tensor, H: Tensor, l1_H: float = 0.0, l2_H: float | Tensor = 0.0, ridge: float = 1e-6
) -> Tensor:
    """H <- max(0, (W^T W + (l2_H + ridge) I)^-1 (W^T X - l1_H)); W (..., n, k), H (..., k, m)."""
    return h_from_stats(h_stats(t, W, H), H, l1_H, l2_H, ridge)


def update_w(
    t: Block, W: Tensor, H: Tensor, l1_W: float = 0.0, l2_W: float | Tensor = 0.0, ridge: float = 1e-6
) -> Tensor:
    """W <- max(0, (X H^T - l1_W) (H H^T + ridge I)^-1), the mirror of :func:`update_h`."""
    return update_h(t.transposed(), H.mT, W.mT, l1_W, l2_W, ridge).mT


def h_stats(t: Block, W: Tensor, H: Tensor) -> dict[str, Tensor]:
    """The sums over row blocks the H-update reads: W^T X, and W^T W (per-column Grams when masked)."""
    if t.masked:
        return {"WtX": t.WtX(W), "grams": t.col_grams(W)}
    return {"WtX": t.WtX(W), "WtW": gram(W, left=True)}


def h_from_stats(
    stats: dict[str, Tensor], H: Tensor, l1_H: float = 0.0, l2_H: float | Tensor = 0.0, ridge: float = 1e-6
) -> Tensor:
    """The H-update from :func:`h_stats` summed over all row blocks.

    ``l2_H`` may weigh each column (``(..., 1, m)``, :func:`~nmf_lightning.linalg.per_column`):
    only the per-column systems of a masked X can take that.
    """
    rhs = stats["WtX"] - l1_H  # (..., k, m)
    G = stats["grams"] if "grams" in stats else stats["WtW"]  # (..., m, k, k) or (..., k, k)
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    tiny = torch.finfo(G.dtype).tiny  # the ridge follows W^T W's scale: the same solve at any scale of X
    l2 = torch.as_tensor(per_column(l2_H), dtype=G.dtype, device=G.device)[..., None, None]  # one per column's system
    scale = G.diagonal(dim1=-2, dim2=-1).mean(-1)  # (..., m) or (...)
    if "grams" in stats:  # a column with no observed entry (G = 0) takes eps of the others' scale: it solves to 0
        scale = torch.maximum(scale, floor_for(scale))
    G = G + (l2 + ridge * scale[..., None, None].clamp_min(tiny)) * eye
    if "grams" not in stats:
        return _solve_psd(G, rhs).clamp_min(0)
    return _solve_psd(G, rhs.mT[..., None]).squeeze(-1).mT.clamp_min(0)


def _solve_psd(G: Tensor, B: Tensor) -> Tensor:
    """Solve G Y = B for symmetric positive semi-definite G, by Cholesky in float32 at least.

    Under autocast (bf16-mixed) the Grams come in half precision, which Cholesky has no
    kernels for. A G that is not positive definite (a dead component with ``ridge=0``, a
    column of ratings with fewer entries than k) takes the pseudo-inverse, in float64:
    ``lstsq`` on a GPU assumes full rank, and float32's eigensolver fails on a batch of
    ill-conditioned systems. Only the systems Cholesky refused take it; one holding NaN or
    infinity (factors that diverged) solves to NaN, for the fit's divergence check to name.
    """
    dtype = torch.promote_types(G.dtype, torch.float32)
    with torch.autocast(G.device.type, enabled=False):
        G, B = G.to(dtype), B.to(dtype)
        L, info = torch.linalg.cholesky_ex(G)
        if bool((info == 0).all()):  # one host sync per solve
            return torch.cholesky_solve(B, L)
        k, p = G.shape[-1], B.shape[-1]
        G, B, bad = G.reshape(-1, k, k), B.reshape(-1, k, p), (info != 0).reshape(-1)
        Y = torch.cholesky_solve(B, L.reshape(-1, k, k))  # (the refused systems' rows are replaced)
        finite = torch.isfinite(G).all(-1).all(-1)
        Y[bad & ~finite] = torch.nan
        bad &= finite
        Y[bad] = (torch.linalg.pinv(G[bad].double(), hermitian=True) @ B[bad].double()).to(dtype)
        return Y.reshape(*info.shape, k, p)
