"""X as the engine reads it: one block of rows, dense, sparse, masked or as observed triplets.

Every product an update needs comes from here, for any layout: ``X H^T`` and ``W^T X``
(the two X-products), the model terms ``(M * (W H)) H^T`` and ``W^T (M * (W H))`` that
replace ``W (H H^T)`` and ``(W^T W) H`` when entries are missing, and the squared error
with its gradients. Factors may carry a leading restart dimension: W (..., b, k) holds
the block's rows of W, H (..., k, m) is all of H.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from nmf_lightning import divergence as beta_div
from nmf_lightning.objective import (
    frobenius_sq,
    gram_sq,
    matmul,
    predict_observed,
    sq_error_observed,
    sq_error_residual,
    transpose_sparse,
)

#: masked X with at most this fraction observed is kept as (row, col, value) triplets
OBSERVED_FRACTION = 0.1
#: the training dtype a precision names (Lightning's "-true" names and the short ones)
PRECISIONS = {
    "64": torch.float64,
    "64-true": torch.float64,
    "32": torch.float32,
    "32-true": torch.float32,
    "bf16": torch.bfloat16,
    "bf16-true": torch.bfloat16,
    "16": torch.float16,
    "16-true": torch.float16,
}


@dataclass
class Target:
    """A block of rows ``start .. start + shape[0]`` of X, with how its missing entries are marked.

    Exactly one form is set: ``X`` (dense or CSR, with ``Xt`` = its transpose as CSR when
    sparse, and an optional dense boolean ``mask``), or observed triplets ``rows``,
    ``cols``, ``vals`` (rows counted from the block's first row).
    """

    X: Tensor | None
    Xt: Tensor | None
    mask: Tensor | None
    rows: Tensor | None
    cols: Tensor | None
    vals: Tensor | None
    shape: tuple[int, int]
    start: int = 0
    _x_sq: Tensor | None = field(default=None, repr=False)
    _zeroed: bool = field(default=False, repr=False)  # X already holds 0 at its missing entries
    _buffers: dict = field(default_factory=dict, repr=False)  # scratch space of the dense beta updates

    def __post_init__(self) -> None:
        if self.mask is not None and not self._zeroed:  # whatever the missing entries hold, they must not count
            self.X = self.X * self.mask
        self._zeroed = True

    @property
    def stop(self) -> int:
        """One past the block's last row in X."""
        return self.start + self.shape[0]

    @property
    def masked(self) -> bool:
        """Whether some entries are missing."""
        return self.mask is not None or self.vals is not None

    @property
    def sparse(self) -> bool:
        """Whether X is a sparse (CSR) tensor."""
        return self.X is not None and self.X.layout == torch.sparse_csr

    @property
    def n_obs(self) -> int:
        """Number of observed entries."""
        if self.vals is not None:
            return len(self.vals)
        if self.mask is not None:
            return int(self.mask.sum())
        return self.shape[0] * self.shape[1]

    @property
    def x_sq(self) -> Tensor:
        """``||X||^2`` over observed entries, in float64 (computed once)."""
        if self._x_sq is None:
            self._x_sq = (self.vals.double() ** 2).sum() if self.vals is not None else frobenius_sq(self.X)
        return self._x_sq

    def transposed(self) -> Target:
        """X^T as a target: W's update is H's update on the transposed problem."""
        return Target(
            X=self.Xt if self.Xt is not None else (self.X.mT if self.X is not None else None),
            Xt=self.X if self.Xt is not None else None,
            mask=self.mask.mT if self.mask is not None else None,
            rows=self.cols,
            cols=self.rows,
            vals=self.vals,
            shape=(self.shape[1], self.shape[0]),
            _x_sq=self._x_sq,
            _zeroed=True,
        )

    def to(self, device: torch.device | str) -> Target:
        """The same block on another device."""
        move = {name: getattr(self, name) for name in ("X", "Xt", "mask", "rows", "cols", "vals")}
        moved = {k: v.to(device) if v is not None else None for k, v in move.items()}
        return replace(self, **moved, _buffers={})

    # ------------------------------------------------------------ products
    def XHt(self, H: Tensor) -> Tensor:
        """X H^T, (..., b, k)."""
        if self.vals is not None:
            return _scatter(self.rows, self.shape[0], self.vals[:, None] * H[..., :, self.cols].mT)
        return matmul(self.X, H.mT)

    def WtX(self, W: Tensor) -> Tensor:
        """W^T X, (..., k, m)."""
        if self.vals is not None:
            return _scatter(self.cols, self.shape[1], self.vals[:, None] * W[..., self.rows, :]).mT
        if self.Xt is None and not self.sparse:
            return W.mT @ self.X  # dense: one product in X's own layout
        return matmul(self.Xt, W).mT

    def model_Ht(self, W: Tensor, H: Tensor, HHt: Tensor | None = None) -> Tensor:
        """(M * (W H)) H^T: the model's part of the W-gradient, (..., b, k)."""
        if self.vals is not None:
            return _scatter(self.rows, self.shape[0], self._predict(W, H)[..., None] * H[..., :, self.cols].mT)
        if self.mask is not None:
            return (self.mask * (W @ H)) @ H.mT
        return W @ (gram(H, left=False) if HHt is None else HHt)

    def Wt_model(self, W: Tensor, H: Tensor, WtW: Tensor | None = None) -> Tensor:
        """W^T (M * (W H)): the model's part of the H-gradient, (..., k, m)."""
        if self.vals is not None:
            return _scatter(self.cols, self.shape[1], self._predict(W, H)[..., None] * W[..., self.rows, :]).mT
        if self.mask is not None:
            return W.mT @ (self.mask * (W @ H))
        return (gram(W, left=True) if WtW is None else WtW) @ H

    def _predict(self, W: Tensor, H: Tensor) -> Tensor:
        """(W H) at the observed triplets only, (..., n_obs)."""
        return predict_observed(self.rows, self.cols, W, H)

    # ------------------------------------------------------- squared error
    def sq_error(self, W: Tensor, H: Tensor, gram_form: bool = False) -> Tensor:
        """``||M * (X - W H)||^2`` of this block, (...,).

        ``gram_form`` (unmasked X only; always for sparse X) expands it as ``||X||^2 - 2<X H^T, W> + <W^T W, H H^T>``:
        no b x m temporary, but it loses precision once the error nears sqrt(eps) of ||X||.
        """
        if self.vals is not None:
            return sq_error_observed(self.rows, self.cols, self.vals, W, H)
        if (gram_form or self.sparse) and self.mask is None:  # a sparse X is never made dense here
            return self._gram_sq(W, H, self.XHt(H), gram(H, left=False))
        return sq_error_residual(self.X, W, H, self.mask)

    def _gram_sq(self, W: Tensor, H: Tensor, XHt: Tensor, HHt: Tensor) -> Tensor:
        return gram_sq(self.x_sq, XHt, W, gram(W, left=True), HHt)

    def sq_and_grads(self, W: Tensor, H: Tensor, gram_form: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """The block's squared error and its gradients: d/dW (..., b, k) and this block's part of d/dH.

        ``d/dW = 2 ((M * (W H)) H^T - X H^T)`` and ``d/dH = 2 (W^T (M * (W H)) - W^T X)``; the
        H-gradients of all blocks sum to the gradient of the whole matrix's error.
        """
        if self.vals is not None or self.mask is not None or gram_form:
            XHt, HHt = self.XHt(H), gram(H, left=False)
            WtW = None if self.masked else gram(W, left=True)
            sq = self.sq_error(W, H) if self.masked else gram_sq(self.x_sq, XHt, W, WtW, HHt)
            dW = (self.model_Ht(W, H, HHt) - XHt).mul_(2)
            dH = (self.Wt_model(W, H, WtW) - self.WtX(W)).mul_(2)
            return sq, dW, dH
        X = self.X.to_dense() if self.sparse else self.X
        R = X - W @ H
        return (R * R).sum(dim=(-2, -1)), -2 * R @ H.mT, -2 * W.mT @ R

    # ------------------------------------------------------ beta-divergence
    def divergence(self, W: Tensor, H: Tensor, beta: float) -> Tensor:
        """``D_beta(X | W H)`` of this block over its observed entries, (...,); see :mod:`~nmf_lightning.divergence`.

        A sparse X is read at its stored entries only: KL adds ``sum(W H)`` from W's column
        sums and H's row sums, O(nnz k); other betas add ``sum((W H)^beta) / beta`` densely.
        """
        if beta == 2:
            return 0.5 * self.sq_error(W, H)
        acc = beta_div.accumulator(W.dtype)  # summed in float32 at least, whatever the training dtype
        if self.vals is not None:
            return beta_div.elementwise(self.vals, self._predict(W, H), beta).sum(-1, dtype=acc)
        if self.sparse:
            stored = self._at_stored(W, H, lambda x, y: beta_div.at_stored(x, y, beta)[..., None]).squeeze(-1)
            if beta == 1:
                return stored + (W.sum(-2, dtype=acc) * H.sum(-1, dtype=acc)).sum(-1)
            return stored + ((W @ H) ** beta).sum(dim=(-2, -1), dtype=acc) / beta
        both = (-2, -1)
        if beta == 1:  # KL over scratch space: sum x log(x / y) - x + y, no n x m temporaries
            Y = torch.matmul(W, H, out=self._scratch("Y", (*W.shape[:-1], H.shape[-1]), W))
            y_sum = (Y if self.mask is None else Y * self.mask).sum(dim=both, dtype=acc)
            torch.div(self.X, Y.clamp_(min=beta_div.EPSILON), out=Y)
            return torch.xlogy(self.X, Y, out=Y).sum(dim=both, dtype=acc) - self.X.sum(dtype=acc) + y_sum
        d = beta_div.elementwise(self.X, W @ H, beta)
        return (d if self.mask is None else torch.where(self.mask, d, 0.0)).sum(dim=both, dtype=acc)

    def beta_terms(self, W: Tensor, H: Tensor, beta: float) -> tuple[Tensor, Tensor]:
        """The W-side MU terms of this block, ``(M * X * Y^(beta-2)) H^T`` and ``(M * Y^(beta-1)) H^T`` (Y = W H).

        Their difference is ``dD/dW``; on ``transposed()`` (with H^T, W^T) they give the
        H-side terms. Unmasked KL's second term is H's row sums, (..., 1, k), for any X.
        """
        if self.X is not None and not self.sparse:
            ratio, model = self._dense_mu_entries(W, H, beta)
            return ratio @ H.mT, H.sum(-1)[..., None, :] if model is None else model @ H.mT
        ratio = self._rows_product(W, H, lambda x, y: beta_div.mu_ratio(x, y, beta))
        if beta == 1 and not self.masked:
            return ratio, H.sum(-1)[..., None, :]
        if self.sparse:  # the model term reads every entry, the zeros of X too
            model = beta_div.mu_model(W @ H, beta) @ H.mT
        else:
            model = self._rows_product(W, H, lambda x, y: beta_div.mu_model(y, beta))
        return ratio, model

    def beta_terms_h(self, W: Tensor, H: Tensor, beta: float) -> tuple[Tensor, Tensor]:
        """The H-side MU terms ``W^T (M * X * Y^(beta-2))`` and ``W^T (M * Y^(beta-1))``, (..., k, m) or (..., k, 1).

        Dense X is read in its own layout (the transposed problem would stride across it).
        """
        if self.X is None or self.sparse:
            num, den = self.transposed().beta_terms(H.mT, W.mT, beta)
            return num.mT, den.mT
        ratio, model = self._dense_mu_entries(W, H, beta)
        return W.mT @ ratio, W.sum(-2)[..., :, None] if model is None else W.mT @ model

    def _dense_mu_entries(self, W: Tensor, H: Tensor, beta: float) -> tuple[Tensor, Tensor | None]:
        """``M * X * Y^(beta-2)`` and ``M * Y^(beta-1)`` (None for unmasked KL, whose is all ones) for dense X.

        They are written over scratch buffers kept on the target: allocating two fresh
        rows x columns tensors per half-update costs more than the arithmetic on a CPU.
        """
        Y = torch.matmul(W, H, out=self._scratch("Y", (*W.shape[:-1], H.shape[-1]), W))
        model = None
        if not (beta == 1 and self.mask is None):
            model = beta_div.mu_model_(self._scratch("model", Y.shape, Y).copy_(Y), beta)
            if self.mask is not None:
                model.mul_(self.mask)
        ratio = beta_div.mu_ratio_(self.X, Y, beta)
        if self.mask is not None:
            ratio.mul_(self.mask)
        return ratio, model

    def release(self) -> None:
        """Free the scratch buffers (a row block kept between passes should not hold a second copy of itself)."""
        self._buffers.clear()

    def _scratch(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A buffer of ``shape`` kept for reuse between updates (one per name)."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._buffers[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf

    def div_and_grads(self, W: Tensor, H: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
        """The block's beta-divergence, its gradient in W (..., b, k) and this block's part of the H-gradient."""
        if self.X is not None and not self.sparse:  # dense: one W H serves the value and both gradients
            Y = W @ H
            G, d = beta_div.derivative(self.X, Y, beta), beta_div.elementwise(self.X, Y, beta)
            if self.mask is not None:  # where, not a product: 0 * inf at a missing entry is NaN
                G, d = torch.where(self.mask, G, 0.0), torch.where(self.mask, d, 0.0)
            return d.sum(dim=(-2, -1), dtype=beta_div.accumulator(d.dtype)), G @ H.mT, W.mT @ G
        num_w, den_w = self.beta_terms(W, H, beta)
        num_h, den_h = self.beta_terms_h(W, H, beta)
        return self.divergence(W, H, beta), den_w - num_w, den_h - num_h

    def _rows_product(self, W: Tensor, H: Tensor, fn) -> Tensor:
        """``V H^T`` (..., b, k) for ``V = fn(x, W H)`` at the observed triplets or a sparse X's stored entries.

        (Dense X takes :meth:`_dense_mu_entries`, over scratch buffers.)
        """
        if self.vals is not None:
            v = fn(self.vals, self._predict(W, H))
            return _scatter(self.rows, self.shape[0], v[..., None] * H[..., :, self.cols].mT)
        return self._at_stored(W, H, fn, H)

    def _at_stored(self, W: Tensor, H: Tensor, fn, B: Tensor | None = None) -> Tensor:
        """For a sparse X: ``fn(x, W H)`` at the stored entries only (one sampled product), times ``B^T`` when given.

        Without ``B``, ``fn`` reduces the values to a (..., 1) tensor per restart.
        """
        X = self.X
        out = []
        for r in range(W.shape[0] if W.dim() == 3 else 1):
            Wr, Hr = (W[r], H[r]) if W.dim() == 3 else (W, H)
            Br = None if B is None else (B[r] if B.dim() == 3 else B)
            y = torch.sparse.sampled_addmm(X, Wr, Hr, beta=0.0).values()
            v = fn(X.values(), y)
            out.append(v if Br is None else csr_from_parts(X.crow_indices(), X.col_indices(), v, X.shape) @ Br.mT)
        return torch.stack(out) if W.dim() == 3 else out[0]


def _scatter(index: Tensor, size: int, values: Tensor) -> Tensor:
    """Sum per-entry rows (..., n_obs, k) into ``size`` rows by ``index``: (..., size, k)."""
    out = values.new_zeros(*values.shape[:-2], size, values.shape[-1])
    return out.index_add_(-2, index, values)


def gram(A: Tensor, left: bool) -> Tensor:
    """W^T W (``left``) or H H^T, (..., k, k)."""
    return A.mT @ A if left else A @ A.mT


def eps_for(A: Tensor) -> float:
    """Division guard: scikit-learn's EPSILON for float64, scaled to the dtype."""
    return float(torch.finfo(A.dtype).eps)


def matrix_to_tensor(X: np.ndarray | sp.spmatrix, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """Dense X with NaN -> (X with 0 at NaN, observed mask); sparse X -> CSR tensor, no mask."""
    if sp.issparse(X):
        return csr_tensor(sp.csr_matrix(X), dtype), None
    Xn = np.asarray(X, dtype=np.float64)
    missing = np.isnan(Xn)
    if missing.any():
        return torch.from_numpy(np.where(missing, 0.0, Xn)).to(dtype), torch.from_numpy(~missing)
    return torch.from_numpy(Xn).to(dtype), None


def dense_layout(X: np.ndarray | sp.spmatrix) -> tuple[bool, bool]:
    """Whether :func:`to_target` would keep X masked, and as observed triplets (its NaN entries decide)."""
    if sp.issparse(X):
        return False, False
    missing = np.isnan(X)
    masked = bool(missing.any())
    return masked, masked and 1.0 - float(missing.mean()) <= OBSERVED_FRACTION


def to_numpy(A: Tensor) -> np.ndarray:
    """A tensor as a numpy array on the host; bf16/fp16 come back as float32 (numpy has no bf16)."""
    A = A.detach()
    if A.dtype in (torch.bfloat16, torch.float16):
        A = A.float()
    return A.cpu().numpy()


def csr_tensor(X: sp.csr_matrix, dtype: torch.dtype) -> Tensor:
    """A scipy CSR matrix as a torch CSR tensor (canonical: sorted, no duplicates)."""
    X = X.copy() if not X.has_canonical_format else X
    X.sum_duplicates()
    return csr_from_parts(
        torch.from_numpy(X.indptr.astype(np.int64)),
        torch.from_numpy(X.indices.astype(np.int64)),
        torch.from_numpy(X.data).to(dtype),
        X.shape,
    )


def csr_from_parts(indptr: Tensor, indices: Tensor, data: Tensor, shape: tuple[int, int]) -> Tensor:
    """A torch CSR tensor from canonical CSR arrays, without torch's beta warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(indptr, indices, data, size=tuple(shape), check_invariants=False)


def to_target(
    X: np.ndarray | sp.spmatrix,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    unstored_missing: bool = False,
    start: int = 0,
    triplets: bool | None = None,
    masked: bool = False,
) -> Target:
    """A numpy or scipy block of X as a :class:`Target` on ``device``.

    NaN marks missing entries of a dense X; ``unstored_missing`` makes the unstored entries
    of a sparse X missing (ratings). Ratings, and dense X with at most ``OBSERVED_FRACTION``
    observed, are kept as observed triplets (``triplets`` forces the choice). ``masked``
    keeps a dense X masked with nothing missing (a block of an X that has missing entries elsewhere).
    """
    Xt_, mask = matrix_to_tensor(X, dtype)
    shape = tuple(X.shape)
    if masked and mask is None and Xt_.layout == torch.strided:
        mask = torch.ones(shape, dtype=torch.bool)
    if Xt_.layout == torch.sparse_csr and unstored_missing:
        counts = Xt_.crow_indices().diff()
        rows = torch.repeat_interleave(torch.arange(shape[0]), counts)
        return Target(None, None, None, rows, Xt_.col_indices(), Xt_.values(), shape, start).to(device)
    observed = mask.float().mean() if mask is not None else 1.0
    if mask is not None and (triplets if triplets is not None else observed <= OBSERVED_FRACTION):
        rows, cols = mask.nonzero(as_tuple=True)
        return Target(None, None, None, rows, cols, Xt_[rows, cols], shape, start).to(device)
    Xt_ = Xt_.to(device)
    T = transpose_sparse(Xt_) if Xt_.layout == torch.sparse_csr else None
    mask = mask.to(device) if mask is not None else None
    return Target(Xt_, T, mask, None, None, None, shape, start, _zeroed=True)  # NaN became 0 above
