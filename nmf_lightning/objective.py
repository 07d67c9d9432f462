"""Reconstruction terms and penalties of the NMF objective, as pure functions of tensors.

Shapes: X (n, m), W (..., n, k), H (..., k, m); a leading batch dimension (r restarts)
gives one value per restart. `mask` is a boolean (n, m) tensor, True where X is
observed. Missing entries of X are stored as 0 and masked out.

The squared error ``||X - WH||^2`` has two forms. The residual form builds the n x m
residual; the Gram form expands it as ``||X||^2 - 2<X H^T, W> + <W^T W, H H^T>`` and
needs only X H^T, W^T X and k x k products (sparse-friendly, no n x m temporary), but
loses precision once the relative error nears sqrt(eps) of the dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from nmf_lightning.distributed import RowShard

#: the Frobenius family (read a squared error), then the beta-divergences (read D_beta itself)
LOSSES = ("fro", "fro2", "rmse", "kl", "is", "beta")
BETA_LOSSES = ("kl", "is", "beta")


#: the residual form works through X in row chunks of at most this many entries
RESIDUAL_CHUNK = 2**22


def sq_error_residual(X: Tensor, W: Tensor, H: Tensor, mask: Tensor | None = None) -> Tensor:
    """Sum of squared residuals over observed entries, via the explicit residual.

    Rows are taken in chunks, so the temporary stays small (an n x m residual of a large
    X would cost more in allocation than in arithmetic).
    """
    if _is_sparse(X):
        X = X.to_dense()
    step = max(1, RESIDUAL_CHUNK // max(1, X.shape[-1]))
    total = None
    for start in range(0, X.shape[-2], step):
        rows = slice(start, start + step)
        R = X[rows] - W[..., rows, :] @ H  # (..., chunk, m)
        if mask is not None:
            R = R * mask[rows]
        part = (R * R).sum(dim=(-2, -1))
        total = part if total is None else total + part
    return total


class _GramSqError(torch.autograd.Function):
    """``||X - WH||_F^2`` in the Gram form with hand-written gradients.

    Forward needs X H^T (n, k) and two k x k Grams; backward needs W^T X, taken as
    (X^T W)^T so a sparse X is multiplied in its stored layout.
    """

    @staticmethod
    def forward(ctx, W: Tensor, H: Tensor, X: Tensor, Xt: Tensor, X_sq: Tensor) -> Tensor:
        XHt = matmul(X, H.mT)  # (..., n, k)
        WtW = W.mT @ W  # (..., k, k)
        HHt = H @ H.mT  # (..., k, k)
        ctx.save_for_backward(W, H, Xt, XHt, WtW, HHt)
        return gram_sq(X_sq, XHt, W, WtW, HHt)

    @staticmethod
    def backward(ctx, g: Tensor):
        W, H, Xt, XHt, WtW, HHt = ctx.saved_tensors
        g2 = 2 * g[..., None, None]
        dW = dH = None
        if ctx.needs_input_grad[0]:
            dW = g2 * (W @ HHt - XHt)
        if ctx.needs_input_grad[1]:
            WtX = matmul(Xt, W).mT  # (..., k, m)
            dH = g2 * (WtW @ H - WtX)
        return dW, dH, None, None, None


def gram_sq(X_sq: Tensor, A: Tensor, B: Tensor, WtW: Tensor, HHt: Tensor) -> Tensor:
    """``||X||^2 - 2<A, B> + <W^T W, H H^T>``, clamped at 0: the Gram form of ``||X - W H||^2``.

    The cross term ``<X H^T, W>`` equals ``<W^T X, H>``: pass whichever pair is at hand.
    """
    dtype = torch.promote_types(WtW.dtype, torch.float32)
    if WtW.dtype != dtype:  # half precision would overflow or round ||X||^2: the sums run in float32
        A, B, WtW, HHt = (T.to(dtype) for T in (A, B, WtW, HHt))
    sq = X_sq.to(dtype) - 2 * (A * B).sum(dim=(-2, -1)) + (WtW * HHt).sum(dim=(-2, -1))
    return sq.clamp_min(0)


def matmul(X: Tensor, B: Tensor) -> Tensor:
    """X @ B for a dense or sparse X (n, m) and B (m, k) or a batch (r, m, k).

    Sparse kernels take no batch, so a batch is laid side by side as one (m, r k) matrix:
    one pass over X's non-zeros serves every restart.
    """
    if not _is_sparse(X) or B.dim() == 2:
        return X @ B
    r, m, k = B.shape
    if r == 1:
        return (X @ B[0]).unsqueeze(0)
    out = X @ B.permute(1, 0, 2).reshape(m, r * k)  # (n, r k)
    return out.reshape(X.shape[0], r, k).permute(1, 0, 2)


def predict_observed(rows: Tensor, cols: Tensor, W: Tensor, H: Tensor) -> Tensor:
    """(W H) at the listed entries (rows[i], cols[i]) only, (..., n_obs): O(|obs| k), never an n x m product."""
    return (W[..., rows, :] * H[..., :, cols].mT).sum(dim=-1)


def sq_error_observed(rows: Tensor, cols: Tensor, vals: Tensor, W: Tensor, H: Tensor) -> Tensor:
    """Sum of squared residuals at the listed observed entries only, O(|obs| k).

    For ratings-like data with few observed entries: predictions are made at
    (rows[i], cols[i]) alone, as recommender ALS does, never as a full n x m product.
    """
    R = vals - predict_observed(rows, cols, W, H)
    return (R * R).sum(dim=-1)


def sq_error_gram(X: Tensor, W: Tensor, H: Tensor, X_sq: Tensor | None = None, Xt: Tensor | None = None) -> Tensor:
    """Sum of squared residuals of an unmasked X in the Gram form (no n x m temporary).

    ``X_sq`` (= ||X||^2) and ``Xt`` (X transposed, stored row-major when sparse) may be
    precomputed once per run; they are derived from X when omitted.
    """
    if X_sq is None:
        X_sq = frobenius_sq(X).to(W.dtype)
    if Xt is None:
        Xt = transpose_sparse(X) if _is_sparse(X) else X.T
    return _GramSqError.apply(W, H, X, Xt, X_sq)


def reconstruction(sq: Tensor, n_obs: int, loss: str) -> Tensor:
    """Turn the data term into the configured reconstruction term.

    ``fro`` = ||X - WH||_F (the 20 newsgroups notebook), ``fro2`` = 1/2 ||X - WH||_F^2
    (scikit-learn's objective), ``rmse`` = sqrt(mean over observed entries) (the
    masked notebook), from a sum of squared residuals; ``kl``, ``is`` and ``beta`` are
    the beta-divergence D_beta(X | WH) itself (see :mod:`~nmf_lightning.divergence`).
    """
    if loss in BETA_LOSSES:
        return sq
    if loss == "fro":
        return _safe_sqrt(sq)
    if loss == "fro2":
        return 0.5 * sq
    if loss == "rmse":
        return _safe_sqrt(sq / n_obs)
    raise ValueError(f"model.loss={loss!r} is not a known loss; choose one of {LOSSES}.")


def _safe_sqrt(x: Tensor) -> Tensor:
    # sqrt has an infinite derivative at 0 (an exact fit); keep the gradient finite.
    return torch.sqrt(x.clamp_min(torch.finfo(x.dtype).tiny))


def negativity_penalty(W: Tensor, H: Tensor) -> Tensor:
    """``mean(clamp(-W, 0)) + mean(clamp(-H, 0))``: the notebooks' soft non-negativity term."""
    return torch.clamp(-W, min=0).mean(dim=(-2, -1)) + torch.clamp(-H, min=0).mean(dim=(-2, -1))


def l1(A: Tensor) -> Tensor:
    """Entry-wise L1 norm ``sum |A|``, which pushes entries of A to exactly zero."""
    return A.abs().sum(dim=(-2, -1))


def l2(A: Tensor) -> Tensor:
    """Half the squared Frobenius norm ``1/2 ||A||_F^2`` (ridge), scikit-learn's L2 term."""
    return 0.5 * (A * A).sum(dim=(-2, -1))


def l21(H: Tensor) -> Tensor:
    """L2,1 norm of H as in the masked notebook: mean over columns of each column's L2 norm.

    Penalising it switches whole columns of H off, i.e. it sparsifies the loadings.
    """
    return torch.linalg.vector_norm(H, dim=-2).mean(dim=-1)


def relative_error(sq: Tensor, X_sq: Tensor) -> Tensor:
    """``||X - WH||_F / ||X||_F`` over observed entries (the ALS notebook's headline metric)."""
    return torch.sqrt(sq.clamp_min(0) / X_sq)


def frobenius_sq(X: Tensor, mask: Tensor | None = None) -> Tensor:
    """``||X||_F^2`` over observed entries, accumulated in float64 for an honest denominator."""
    if _is_sparse(X):
        values = X.coalesce().values() if X.is_sparse else X.values()
        return (values.double() ** 2).sum()
    total = X.new_zeros((), dtype=torch.float64)
    rows = max(1, (1 << 22) // max(X.shape[-1], 1))  # float64 copies of a few MB at a time, not of all of X
    for lo in range(0, X.shape[0], rows):
        Xd = X[lo : lo + rows].double()
        if mask is not None:
            Xd = Xd * mask[lo : lo + rows]
        total += (Xd * Xd).sum()
    return total


def transpose_sparse(X: Tensor) -> Tensor:
    """X^T as a row-compressed (CSR) tensor, so X^T @ W runs as a row-major sparse product."""
    return X.t().to_sparse_csr() if X.layout == torch.sparse_csr else X.t().coalesce()


def _is_sparse(X: Tensor) -> bool:
    return X.is_sparse or X.layout == torch.sparse_csr


@dataclass(frozen=True)
class Objective:
    """reconstruction(loss) + lam * negativity + l1/l2 weights * |W|, |H| + l21_H * L2,1(H).

    A pure function of (data term, W, H): the engine's gradient updates and the module's
    metrics both call it, so the trained and the logged loss are one formula. The data
    term is the squared error, or the beta-divergence when ``beta`` is set (``kl``,
    ``is``, ``beta`` losses).

    When W's rows are sharded over processes, ``sum_rows`` completes a sum over this
    rank's rows of W with the other ranks' (its gradient stays this rank's) and ``n_rows``
    is W's whole number of rows, so W's penalties are those of the whole factor.
    """

    loss: str = "fro"
    beta: float | None = None
    n_obs: int = 1
    lam: float = 0.0
    l1_W: float = 0.0
    l1_H: float = 0.0
    l2_W: float = 0.0
    l2_H: float = 0.0
    l21_H: float = 0.0
    sum_rows: Callable[[Tensor], Tensor] | None = field(default=None, compare=False)
    n_rows: int | None = None

    def penalties(self, W: Tensor, H: Tensor) -> list[tuple[str, float, Callable[[], Tensor]]]:
        """(name, weight, value) of every penalty term; values are computed when called."""
        whole = self.sum_rows or (lambda value: value)  # W's rows sharded: its terms summed over every rank

        def negativity() -> Tensor:
            if self.sum_rows is None:
                return negativity_penalty(W, H)
            w = whole(torch.clamp(-W, min=0).sum(dim=(-2, -1))) / (self.n_rows * W.shape[-1])
            return w + torch.clamp(-H, min=0).mean(dim=(-2, -1))

        return [
            ("penalty", self.lam, negativity),
            ("l1_W", self.l1_W, lambda: whole(l1(W))),
            ("l1_H", self.l1_H, lambda: l1(H)),
            ("l2_W", self.l2_W, lambda: whole(l2(W))),
            ("l2_H", self.l2_H, lambda: l2(H)),
            ("l21_H", self.l21_H, lambda: l21(H)),
        ]

    def __call__(self, sq: Tensor, W: Tensor, H: Tensor) -> Tensor:
        """The total loss, one value per restart; terms of weight 0 are not computed."""
        total = reconstruction(sq, self.n_obs, self.loss)
        for _, weight, value in self.penalties(W, H):
            if weight:
                total = total + weight * value()
        return total

    def terms(self, sq: Tensor, W: Tensor, H: Tensor, zero_weights: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        """The total and every unweighted term, for logging (those of weight 0 too, unless not ``zero_weights``)."""
        terms = {"reconstruction": reconstruction(sq, self.n_obs, self.loss)}
        total = terms["reconstruction"]
        for name, weight, value in self.penalties(W, H):
            if weight or zero_weights:
                terms[name] = value()
            if weight:
                total = total + weight * terms[name]
        return total, terms


def factor_stats(A: Tensor, reported: Tensor, shard: RowShard | None = None) -> dict[str, Tensor]:
    """Share and mean size of A's negative entries, and the sparsity of the factor a user gets (one per restart).

    ``shard``: A holds this rank's rows of a row-sharded factor; the statistics are the whole factor's.
    """
    both = (-2, -1)
    top = reported.abs().amax(dim=both, keepdim=True)
    if shard is not None:
        top = shard.max(top)
    counts = {
        "neg_fraction": (A < 0).sum(dim=both, dtype=torch.float64),
        "neg_mean": torch.clamp(-A, min=0).sum(dim=both, dtype=torch.float64),
        "sparsity": (reported.abs() <= 1e-6 * top).sum(dim=both, dtype=torch.float64),
    }
    size = A.shape[-2] * A.shape[-1]
    if shard is not None:
        counts = shard.sum(counts)
        size = shard.n * A.shape[-1]
    return {name: (value / size).float() for name, value in counts.items()}
