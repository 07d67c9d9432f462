"""The X-products every closed-form update needs, for dense, sparse, masked and ratings X.

All take factors with an optional leading restart dimension: W (..., n, k), H (..., k, m).
Missing entries enter through the model term: ``(M * (W H)) H^T`` instead of ``W (H H^T)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nmf_lightning.objective import matmul


@dataclass
class Target:
    """What a solver fits: X (0 at missing entries) and how its missing entries are marked.

    Exactly one form is set: ``X`` (dense or CSR, with ``Xt`` for CSR and an optional
    dense ``mask``), or observed triplets ``rows``, ``cols``, ``vals`` of an (n, m) matrix.
    """

    X: Tensor | None
    Xt: Tensor | None
    mask: Tensor | None
    rows: Tensor | None
    cols: Tensor | None
    vals: Tensor | None
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        if self.mask is not None:  # whatever the missing entries hold, they must not count
            self.X = self.X * self.mask

    @property
    def masked(self) -> bool:
        """Whether some entries are missing."""
        return self.mask is not None or self.vals is not None

    def XHt(self, H: Tensor) -> Tensor:
        """X H^T, (..., n, k)."""
        if self.vals is not None:
            return _scatter_rows(self, self.vals[:, None] * H[..., :, self.cols].mT)
        return matmul(self.X, H.mT)

    def WtX(self, W: Tensor) -> Tensor:
        """W^T X, (..., k, m)."""
        if self.vals is not None:
            return _scatter_cols(self, self.vals[:, None] * W[..., self.rows, :]).mT
        Xt = self.Xt if self.Xt is not None else self.X.mT
        return matmul(Xt, W).mT

    def model_Ht(self, W: Tensor, H: Tensor, HHt: Tensor) -> Tensor:
        """(M * (W H)) H^T: the model's part of the W-gradient, (..., n, k)."""
        if self.vals is not None:
            pred = (W[..., self.rows, :] * H[..., :, self.cols].mT).sum(-1)  # (..., n_obs)
            return _scatter_rows(self, pred[..., None] * H[..., :, self.cols].mT)
        if self.mask is not None:
            return (self.mask * (W @ H)) @ H.mT
        return W @ HHt

    def Wt_model(self, W: Tensor, H: Tensor, WtW: Tensor) -> Tensor:
        """W^T (M * (W H)): the model's part of the H-gradient, (..., k, m)."""
        if self.vals is not None:
            pred = (W[..., self.rows, :] * H[..., :, self.cols].mT).sum(-1)
            return _scatter_cols(self, pred[..., None] * W[..., self.rows, :]).mT
        if self.mask is not None:
            return W.mT @ (self.mask * (W @ H))
        return WtW @ H


def _scatter_rows(t: Target, values: Tensor) -> Tensor:
    """Sum per-entry rows (..., n_obs, k) into their matrix rows: (..., n, k)."""
    out = values.new_zeros(*values.shape[:-2], t.shape[0], values.shape[-1])
    return out.index_add_(-2, t.rows, values)


def _scatter_cols(t: Target, values: Tensor) -> Tensor:
    """Sum per-entry rows (..., n_obs, k) into their matrix columns: (..., m, k)."""
    out = values.new_zeros(*values.shape[:-2], t.shape[1], values.shape[-1])
    return out.index_add_(-2, t.cols, values)


def gram(A: Tensor, left: bool) -> Tensor:
    """W^T W (``left``) or H H^T, (..., k, k)."""
    return A.mT @ A if left else A @ A.mT


def eps_for(A: Tensor) -> float:
    """Division guard: scikit-learn's EPSILON for float64, scaled to the dtype."""
    return float(torch.finfo(A.dtype).eps)
