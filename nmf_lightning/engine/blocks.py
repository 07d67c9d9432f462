"""X as the engine reads it: blocks of rows, one small class per layout.

Every product an update needs comes from a block, whatever the layout: ``X H^T`` and
``W^T X`` (the two X-products), the model terms ``(M * (W H)) H^T`` and ``W^T (M * (W H))``
that replace ``W (H H^T)`` and ``(W^T W) H`` when entries are missing, the squared error
with its gradients, and the beta-divergence with its multiplicative-update terms.

- :class:`DenseBlock`: every entry observed, a strided tensor.
- :class:`MaskedBlock`: a dense X with a boolean mask of observed entries (0 stored elsewhere).
- :class:`SparseBlock`: a CSR tensor (with its transpose as CSR), unstored entries are zeros.
- :class:`ObservedBlock`: only the observed (row, column, value) triplets (ratings, mostly-missing X).

Factors may carry a leading restart dimension: W (..., b, k) holds the block's rows of
W, H (..., k, m) is all of H.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from nmf_lightning import divergence as beta_div
from nmf_lightning.linalg import (
    cols_at,
    csr_from_parts,
    csr_rows,
    csr_tensor,
    frobenius_sq,
    gram,
    gram_sq,
    matmul,
    predict_observed,
    rows_at,
    scatter_rows,
    scipy_multiplies,
    sq_error_observed,
    sq_error_residual,
    t_matmul,
    transpose_sparse,
)

#: masked X with at most this fraction observed is kept as (row, col, value) triplets
OBSERVED_FRACTION = 0.1


class Block:
    """Rows ``start .. start + shape[0]`` of X; the subclasses hold them in one layout each."""

    #: whether some entries are missing (the model terms read only the observed ones)
    masked = False
    #: whether X is a sparse (CSR) tensor, never made dense
    sparse = False
    #: whether entries may be negative (ratings less their biases): MU splits such a target
    signed = False

    def __init__(self, shape: tuple[int, int], start: int = 0, x_sq: Tensor | None = None):
        self.shape, self.start, self._x_sq = (int(shape[0]), int(shape[1])), int(start), x_sq
        self._buffers: dict[str, Tensor] = {}  # scratch space of the dense beta updates

    @property
    def stop(self) -> int:
        """One past the block's last row in X."""
        return self.start + self.shape[0]

    @property
    def n_obs(self) -> int:
        """Number of observed entries."""
        return self.shape[0] * self.shape[1]

    @property
    def x_sq(self) -> Tensor:
        """``||X||^2`` over observed entries, in float64 (computed once)."""
        if self._x_sq is None:
            self._x_sq = self._sum_sq()
        return self._x_sq

    def _sum_sq(self) -> Tensor:
        raise NotImplementedError

    def values_sum(self) -> Tensor:
        """The sum of the observed entries, in float64 (the random init's scale)."""
        raise NotImplementedError

    def counts(self) -> tuple[Tensor, Tensor]:
        """Each row's and each column's number of observed entries, (b,) and (m,) in float64.

        Every entry of a dense or sparse X is observed (a sparse X's unstored ones are zeros).
        """
        b, m = self.shape
        device = self.device
        return torch.full((b,), float(m), dtype=torch.float64, device=device), torch.full(
            (m,), float(b), dtype=torch.float64, device=device
        )

    def tensors(self) -> tuple[Tensor, ...]:
        """The tensors the block holds (their bytes are its size in memory)."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes the block's tensors hold."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of X's values."""
        return self.tensors()[-1].dtype if self.sparse else self.tensors()[0].dtype

    @property
    def device(self) -> torch.device:
        """Where the block is held."""
        return self.tensors()[0].device

    def transposed(self) -> Block:
        """X^T as a block: W's update is H's update on the transposed problem."""
        raise NotImplementedError

    def observed(self) -> ObservedBlock:
        """The block's observed entries as (row, column, value) triplets (a biased model reads them so)."""
        X, mask = self.for_svd()
        if mask is None:
            if self.sparse:
                raise NotImplementedError("a sparse X's unstored entries are observed zeros: it has no triplets")
            mask = torch.ones(self.shape, dtype=torch.bool, device=X.device)
        rows, cols = mask.nonzero(as_tuple=True)
        return ObservedBlock(rows, cols, X[rows, cols], self.shape, self.start, self._x_sq)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Block:
        """The same block on another device (with its values in ``dtype``, when given)."""
        raise NotImplementedError

    def _kept_x_sq(self, dtype: torch.dtype | None) -> Tensor | None:
        """``||X||^2`` carries over to a moved block, not to one whose values are rounded to another dtype."""
        return self._x_sq if dtype is None or dtype == self.dtype else None

    def release(self) -> None:
        """Free the scratch buffers (a row block kept between passes should not hold a second copy of itself)."""
        self._buffers.clear()

    def _scratch(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A buffer of ``shape`` kept for reuse between updates (one per name)."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._buffers[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf

    # ------------------------------------------------------------ products
    def XHt(self, H: Tensor) -> Tensor:
        """X H^T, (..., b, k)."""
        raise NotImplementedError

    def WtX(self, W: Tensor) -> Tensor:
        """W^T X, (..., k, m)."""
        raise NotImplementedError

    def model_Ht(self, W: Tensor, H: Tensor, HHt: Tensor | None = None) -> Tensor:
        """(M * (W H)) H^T: the model's part of the W-gradient, (..., b, k)."""
        return W @ (gram(H, left=False) if HHt is None else HHt)

    def Wt_model(self, W: Tensor, H: Tensor, WtW: Tensor | None = None) -> Tensor:
        """W^T (M * (W H)): the model's part of the H-gradient, (..., k, m)."""
        return (gram(W, left=True) if WtW is None else WtW) @ H

    def col_grams(self, W: Tensor) -> Tensor:
        """Per-column Grams ``W^T diag(M[:, c]) W``, (..., m, k, k): the H-update's systems when entries are missing."""
        raise NotImplementedError(f"{type(self).__name__} has no missing entries: its columns share W^T W")

    def dense_rows(self, idx: Tensor) -> Tensor:
        """Rows ``idx`` of X as a dense (b, m) tensor (a Kaczmarz step's sample)."""
        raise NotImplementedError(f"{type(self).__name__} cannot give dense rows")

    def for_svd(self) -> tuple[Tensor, Tensor | None]:
        """X with 0 at missing entries (dense, or a sparse tensor) and the mask of observed ones, for an SVD."""
        raise NotImplementedError

    # ------------------------------------------------------- squared error
    def sq_error(self, W: Tensor, H: Tensor, gram_form: bool = False) -> Tensor:
        """``||M * (X - W H)||^2`` of this block, (...,).

        ``gram_form`` (unmasked X only; always for sparse X) expands it as
        ``||X||^2 - 2<X H^T, W> + <W^T W, H H^T>``: no b x m temporary, but it loses
        precision once the error nears sqrt(eps) of ||X||.
        """
        return gram_sq(self.x_sq, self.XHt(H), W, gram(W, left=True), gram(H, left=False))

    def sq_and_grads(self, W: Tensor, H: Tensor, gram_form: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """The block's squared error and its gradients: d/dW (..., b, k) and this block's part of d/dH.

        ``d/dW = 2 ((M * (W H)) H^T - X H^T)`` and ``d/dH = 2 (W^T (M * (W H)) - W^T X)``; the
        H-gradients of all blocks sum to the gradient of the whole matrix's error.
        """
        XHt, HHt = self.XHt(H), gram(H, left=False)
        WtW = None if self.masked else gram(W, left=True)
        sq = self.sq_error(W, H) if self.masked else gram_sq(self.x_sq, XHt, W, WtW, HHt)
        dW = (self.model_Ht(W, H, HHt) - XHt).mul_(2)
        dH = (self.Wt_model(W, H, WtW) - self.WtX(W)).mul_(2)
        return sq, dW, dH

    # ------------------------------------------------------ beta-divergence
    def divergence(self, W: Tensor, H: Tensor, beta: float) -> Tensor:
        """``D_beta(X | W H)`` of this block over its observed entries, (...,); see :mod:`~nmf_lightning.divergence`."""
        raise NotImplementedError

    def beta_terms(self, W: Tensor, H: Tensor, beta: float) -> tuple[Tensor, Tensor]:
        """The W-side MU terms of this block, ``(M * X * Y^(beta-2)) H^T`` and ``(M * Y^(beta-1)) H^T`` (Y = W H).

        Their difference is ``dD/dW``; on ``transposed()`` (with H^T, W^T) they give the
        H-side terms. Unmasked KL's second term is H's row sums, (..., 1, k), for any X.
        """
        raise NotImplementedError

    def beta_terms_h(self, W: Tensor, H: Tensor, beta: float) -> tuple[Tensor, Tensor]:
        """The H-side MU terms ``W^T (M * X * Y^(beta-2))`` and ``W^T (M * Y^(beta-1))``, (..., k, m) or (..., k, 1)."""
        num, den = self.transposed().beta_terms(H.mT, W.mT, beta)
        return num.mT, den.mT

    def div_and_grads(self, W: Tensor, H: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
        """The block's beta-divergence, its gradient in W (..., b, k) and this block's part of the H-gradient."""
        num_w, den_w = self.beta_terms(W, H, beta)
        num_h, den_h = self.beta_terms_h(W, H, beta)
        return self.divergence(W, H, beta), den_w - num_w, den_h - num_h


class DenseBlock(Block):
    """Every entry observed, X a strided (b, m) tensor."""

    #: the mask of observed entries (None: all of them); :class:`MaskedBlock` sets one
    mask: Tensor | None = None

    def __init__(self, X: Tensor, start: int = 0, x_sq: Tensor | None = None):
        super().__init__(tuple(X.shape), start, x_sq)
        self.X = X

    def _sum_sq(self) -> Tensor:
        return frobenius_sq(self.X)

    def values_sum(self) -> Tensor:  # noqa: D102
        return self.X.sum(dtype=torch.float64)  # accumulated in float64, no copy of X

    def tensors(self) -> tuple[Tensor, ...]:  # noqa: D102
        return (self.X,)

    def transposed(self) -> DenseBlock:  # noqa: D102
        return DenseBlock(self.X.mT, x_sq=self._x_sq)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> DenseBlock:  # noqa: D102
        return DenseBlock(self.X.to(device, dtype), self.start, self._kept_x_sq(dtype))

    def XHt(self, H: Tensor) -> Tensor:  # noqa: D102
        return self.X @ H.mT

    def WtX(self, W: Tensor) -> Tensor:  # noqa: D102
        return W.mT @ self.X  # one product in X's own layout

    def dense_rows(self, idx: Tensor) -> Tensor:  # noqa: D102
        return self.X[idx]

    def for_svd(self) -> tuple[Tensor, Tensor | None]:  # noqa: D102
        return self.X, self.mask

    def sq_error(self, W: Tensor, H: Tensor, gram_form: bool = False) -> Tensor:  # noqa: D102
        if gram_form and self.mask is None:
            return super().sq_error(W, H)
        return sq_error_residual(self.X, W, H, self.mask)

    def sq_and_grads(self, W: Tensor, H: Tensor, gram_form: bool = False) -> tuple[Tensor, Tensor, Tensor]:  # noqa: D102
        if gram_form or self.masked:
            return super().sq_and_grads(W, H, gram_form)
        R = self.X - W @ H
        return (R * R).sum(dim=(-2, -1)), -2 * R @ H.mT, -2 * W.mT @ R

    def divergence(self, W: Tensor, H: Tensor, beta: float) -> Tensor:  # noqa: D102
        if beta == 2:
            return 0.5 * self.sq_error(W, H)
        acc, both = beta_div.accumulator(W.dtype), (-2, -1)  # summed in float32 at least
        if beta == 1:  # KL over scratch space: sum x log(x / y) - x + y, no n x m temporaries
            Y = torch.matmul(W, H, out=self._scratch("Y", (*W.shape[:-1], H.shape[-1]), W))
            y_sum = (Y if self.mask is None else Y * self.mask).sum(dim=both, dtype=acc)
            torch.div(self.X, Y.clamp_(min=beta_div.EPSILON), out=Y)
            return torch.xlogy(self.X, Y, out=Y).sum(dim=both, dtype=acc) - self.X.sum(dtype=acc) + y_sum
        d = beta_div.elementwise(self.X, W @ H, beta)
        return (d if self.mask is None else torch.where(self.mask, d, 0.0)).sum(dim=both, dtype=acc)

    def beta_terms(self, W: Tensor, H: Tensor, beta: float) -> tuple[Tensor, Tensor]:  # noqa: D102
        ratio, model = self._mu_entries(W, H, beta)
        return ratio @ H.mT, H.sum(-1)[..., None, :] if model is None else model @ H.mT

    def beta_terms_h(self, W: Tensor, H: Tensor, beta: float) -> tuple[Tensor, Tensor]:
        """The H-side MU terms, with X read in its own layout (the transposed problem would stride across it)."""
        ratio, model = self._mu_entries(W, H, beta)
        return W.mT @ ratio, W.sum(-2)[..., :, None] if model is None else W.mT @ model

    def _mu_entries(self, W: Tensor, H: Tensor, beta: float) -> tuple[Tensor, Tensor | None]:
        """``M * X * Y^(beta-2)`` and ``M * Y^(beta-1)`` (None for unmasked KL, whose is all ones).

        They are written over scratch buffers kept on the block: allocating two fresh
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

    def div_and_grads(self, W: Tensor, H: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
        """One W H serves the value and both gradients."""
        Y = W @ H
        G, d = beta_div.derivative(self.X, Y, beta), beta_div.elementwise(self.X, Y, beta)
        if self.mask is not None:  # where, not a product: 0 * inf at a missing entry is NaN
            G, d = torch.where(self.mask, G, 0.0), torch.where(self.mask, d, 0.0)
        return d.sum(dim=(-2, -1), dtype=beta_div.accumulator(d.dtype)), G @ H.mT, W.mT @ G


class MaskedBlock(DenseBlock):
    """A dense X whose entries outside ``mask`` are missing; X holds 0 there (set here unless ``zeroed``)."""

    masked = True

    def __init__(self, X: Tensor, mask: Tensor, start: int = 0, x_sq: Tensor | None = None, zeroed: bool = False):
        super().__init__(X if zeroed else X * mask, start, x_sq)  # missing entries must not count
        self.mask = mask

    @property
    def n_obs(self) -> int:  # noqa: D102
        return int(self.mask.sum())

    def values_sum(self) -> Tensor:  # noqa: D102
        return self.X.sum(dtype=torch.float64)  # 0 at the missing entries

    def counts(self) -> tuple[Tensor, Tensor]:  # noqa: D102
        return self.mask.sum(-1, dtype=torch.float64), self.mask.sum(-2, dtype=torch.float64)

    def tensors(self) -> tuple[Tensor, ...]:  # noqa: D102
        return (self.X, self.mask)

    def transposed(self) -> MaskedBlock:  # noqa: D102
        return MaskedBlock(self.X.mT, self.mask.mT, x_sq=self._x_sq, zeroed=True)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> MaskedBlock:  # noqa: D102
        X, mask = self.X.to(device, dtype), self.mask.to(device)
        return MaskedBlock(X, mask, self.start, self._kept_x_sq(dtype), zeroed=True)

    def dense_rows(self, idx: Tensor) -> Tensor:  # noqa: D102
        raise NotImplementedError("a masked X has no rows to sample whole")

    def model_Ht(self, W: Tensor, H: Tensor, HHt: Tensor | None = None) -> Tensor:  # noqa: D102
        return (self.mask * (W @ H)) @ H.mT

    def Wt_model(self, W: Tensor, H: Tensor, WtW: Tensor | None = None) -> Tensor:  # noqa: D102
        return W.mT @ (self.mask * (W @ H))

    def col_grams(self, W: Tensor) -> Tensor:  # noqa: D102
        return torch.einsum("...nk,nm,...nl->...mkl", W, self.mask.to(W.dtype), W)


class SparseBlock(Block):
    """A CSR X; unstored entries are 0.

    ``Xt``, its transpose as CSR, lets both products run row-major on any device. It is
    formed when first needed: a row block streamed to a CPU multiplies by X^T in X's own
    layout instead (:func:`~nmf_lightning.linalg.t_matmul`), which costs less than a
    transpose per block per pass.
    """

    sparse = True

    def __init__(self, X: Tensor, Xt: Tensor | None = None, start: int = 0, x_sq: Tensor | None = None):
        super().__init__(tuple(X.shape), start, x_sq)
        self.X, self._Xt = X, Xt

    @property
    def Xt(self) -> Tensor:
        """X^T as a CSR tensor (formed once, when first read)."""
        if self._Xt is None:
            self._Xt = transpose_sparse(self.X)
        return self._Xt

    def _sum_sq(self) -> Tensor:
        return frobenius_sq(self.X)

    def values_sum(self) -> Tensor:  # noqa: D102
        return self.X.values().sum(dtype=torch.float64)

    def tensors(self) -> tuple[Tensor, ...]:
        """X's parts (and X^T's, once formed); X's values last."""
        X, Xt = self.X, self._Xt
        held = () if Xt is None else (Xt.crow_indices(), Xt.col_indices(), Xt.values())
        return (X.crow_indices(), X.col_indices(), *held, X.values())

    def transposed(self) -> SparseBlock:  # noqa: D102
        return SparseBlock(self.Xt, self.X, x_sq=self._x_sq)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> SparseBlock:  # noqa: D102
        Xt = None if self._Xt is None else self._Xt.to(device, dtype)
        return SparseBlock(self.X.to(device, dtype), Xt, self.start, self._kept_x_sq(dtype))

    def XHt(self, H: Tensor) -> Tensor:  # noqa: D102
        return matmul(self.X, H.mT)

    def WtX(self, W: Tensor) -> Tensor:  # noqa: D102
        if self._Xt is None and scipy_multiplies(self.X, W):  # (elsewhere X^T is formed once and kept)
            return t_matmul(self.X, W).mT
        return matmul(self.Xt, W).mT

    def dense_rows(self, idx: Tensor) -> Tensor:  # noqa: D102
        return csr_rows(self.X, idx)

    def for_svd(self) -> tuple[Tensor, Tensor | None]:  # noqa: D102
        return self.X, None

    def sq_and_grads(self, W: Tensor, H: Tensor, gram_form: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """The Gram form, or (``model.loss_form=residual``) the residual of X made dense."""
        if gram_form:
            return super().sq_and_grads(W, H)
        return DenseBlock(self.X.to_dense(), self.start, self._x_sq).sq_and_grads(W, H, gram_form=False)

    def divergence(self, W: Tensor, H: Tensor, beta: float) -> Tensor:
        """Read at X's stored entries only: KL adds ``sum(W H)`` from W's column sums and H's row sums, O(nnz k).

        Other betas add ``sum((W H)^beta) / beta`` densely.
        """
        if beta == 2:
            return 0.5 * self.sq_error(W, H)
        acc = beta_div.accumulator(W.dtype)
        stored = self._at_stored(W, H, lambda x, y: beta_div.at_stored(x, y, beta)[..., None]).squeeze(-1)
        if beta == 1:
            return stored + (W.sum(-2, dtype=acc) * H.sum(-1, dtype=acc)).sum(-1)
        return stored + ((W @ H) ** beta).sum(dim=(-2, -1), dtype=acc) / beta

    def beta_terms(self, W: Tensor, H: Tensor, beta: float) -> tuple[Tensor, Tensor]:  # noqa: D102
        ratio = self._at_stored(W, H, lambda x, y: beta_div.mu_ratio(x, y, beta), H)
        if beta == 1:
            return ratio, H.sum(-1)[..., None, :]
        return ratio, beta_div.mu_model(W @ H, beta) @ H.mT  # the model term reads every entry, the zeros too

    def _at_stored(self, W: Tensor, H: Tensor, fn: Callable[[Tensor, Tensor], Tensor], B: Tensor | None = None):
        """``fn(x, W H)`` at the stored entries only (one sampled product), times ``B^T`` when given.

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


class ObservedBlock(Block):
    """Only the observed entries, as triplets ``vals[i]`` at (``rows[i]``, ``cols[i]``); rows from the block's first.

    Predictions are made at the observed entries alone, O(|obs| k), as recommender ALS does:
    never an n x m product.
    """

    masked = True

    def __init__(
        self,
        rows: Tensor,
        cols: Tensor,
        vals: Tensor,
        shape: tuple[int, int],
        start: int = 0,
        x_sq: Tensor | None = None,
        signed: bool = False,
    ):
        super().__init__(shape, start, x_sq)
        self.rows, self.cols, self.vals, self.signed = rows, cols, vals, signed

    def observed(self) -> ObservedBlock:  # noqa: D102
        return self

    def shifted(self, offsets: Tensor) -> ObservedBlock:
        """The same entries less ``offsets`` (n_obs,): a target that may be negative (``signed``).

        ``||X||^2`` stays X's own: errors relative to X are still read against it.
        """
        return ObservedBlock(self.rows, self.cols, self.vals - offsets, self.shape, self.start, self._x_sq, True)

    def negative_part(self) -> ObservedBlock:
        """``max(-X, 0)`` at the same entries: where a signed target lies below 0."""
        return ObservedBlock(self.rows, self.cols, (-self.vals).clamp_min(0), self.shape, self.start)

    @property
    def n_obs(self) -> int:  # noqa: D102
        return len(self.vals)

    def _sum_sq(self) -> Tensor:
        return (self.vals.double() ** 2).sum()

    def values_sum(self) -> Tensor:  # noqa: D102
        return self.vals.sum(dtype=torch.float64)

    def counts(self) -> tuple[Tensor, Tensor]:  # noqa: D102
        b, m = self.shape
        return torch.bincount(self.rows, minlength=b).double(), torch.bincount(self.cols, minlength=m).double()

    def tensors(self) -> tuple[Tensor, ...]:  # noqa: D102
        return (self.vals, self.rows, self.cols)

    def transposed(self) -> ObservedBlock:  # noqa: D102
        return ObservedBlock(self.cols, self.rows, self.vals, self.shape[::-1], x_sq=self._x_sq, signed=self.signed)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ObservedBlock:  # noqa: D102
        rows, cols, vals = self.rows.to(device), self.cols.to(device), self.vals.to(device, dtype)
        return ObservedBlock(rows, cols, vals, self.shape, self.start, self._kept_x_sq(dtype), self.signed)

    def for_svd(self) -> tuple[Tensor, Tensor | None]:
        """The SVD of the observed entries, zeros elsewhere."""
        X = torch.zeros(self.shape, dtype=self.vals.dtype, device=self.vals.device)
        X.index_put_((self.rows, self.cols), self.vals)
        mask = torch.zeros(self.shape, dtype=torch.bool, device=self.vals.device)
        mask.index_put_((self.rows, self.cols), torch.tensor(True, device=self.vals.device))
        return X, mask

    def _predict(self, W: Tensor, H: Tensor) -> Tensor:
        """(W H) at the observed triplets only, (..., n_obs)."""
        return predict_observed(self.rows, self.cols, W, H)

    def XHt(self, H: Tensor) -> Tensor:  # noqa: D102
        return scatter_rows(self.rows, self.shape[0], self.vals[:, None] * cols_at(H, self.cols))

    def WtX(self, W: Tensor) -> Tensor:  # noqa: D102
        return scatter_rows(self.cols, self.shape[1], self.vals[:, None] * rows_at(W, self.rows)).mT

    def model_Ht(self, W: Tensor, H: Tensor, HHt: Tensor | None = None) -> Tensor:  # noqa: D102
        return scatter_rows(self.rows, self.shape[0], self._predict(W, H)[..., None] * cols_at(H, self.cols))

    def Wt_model(self, W: Tensor, H: Tensor, WtW: Tensor | None = None) -> Tensor:  # noqa: D102
        return scatter_rows(self.cols, self.shape[1], self._predict(W, H)[..., None] * rows_at(W, self.rows)).mT

    def col_grams(self, W: Tensor) -> Tensor:
        """Per-column Grams as ``M^T (W * W)``: each row's outer product summed down the columns it is seen in.

        The outer products are formed once per row of W, (b, k^2), not once per entry, and the
        sum is one sparse product with the pattern of observed entries: MovieLens 100k at
        k = 20 took 124 ms per Gram as (n_obs, k, k) products and 7 ms so, on one CPU thread.
        """
        k = W.shape[-1]
        if W.dim() > 2:  # restarts: one product per entry (sparse kernels take no batch)
            outer = W[..., self.rows, :, None] * W[..., self.rows, None, :]  # (..., n_obs, k, k)
            G = outer.new_zeros(*outer.shape[:-3], self.shape[1], k, k)
            return G.index_add_(-3, self.cols, outer)
        outer = (W[:, :, None] * W[:, None, :]).reshape(W.shape[0], k * k)  # (b, k^2)
        return (self._pattern_t(W.dtype) @ outer).reshape(self.shape[1], k, k)

    def _pattern_t(self, dtype: torch.dtype) -> Tensor:
        """M^T: ones at the observed entries, as a (m, b) CSR tensor of ``dtype``."""
        b, m = self.shape
        order = torch.argsort(self.cols, stable=True)
        crow = torch.zeros(m + 1, dtype=torch.int64, device=self.cols.device)
        crow[1:] = torch.bincount(self.cols, minlength=m).cumsum(0)
        ones = torch.ones(len(order), dtype=dtype, device=self.cols.device)
        return csr_from_parts(crow, self.rows[order], ones, (m, b))

    def sq_error(self, W: Tensor, H: Tensor, gram_form: bool = False) -> Tensor:  # noqa: D102
        return sq_error_observed(self.rows, self.cols, self.vals, W, H)

    def divergence(self, W: Tensor, H: Tensor, beta: float) -> Tensor:  # noqa: D102
        if beta == 2:
            return 0.5 * self.sq_error(W, H)
        acc = beta_div.accumulator(W.dtype)
        return beta_div.elementwise(self.vals, self._predict(W, H), beta).sum(-1, dtype=acc)

    def beta_terms(self, W: Tensor, H: Tensor, beta: float) -> tuple[Tensor, Tensor]:  # noqa: D102
        y = self._predict(W, H)
        spread = cols_at(H, self.cols)
        ratio = scatter_rows(self.rows, self.shape[0], beta_div.mu_ratio(self.vals, y, beta)[..., None] * spread)
        model = scatter_rows(self.rows, self.shape[0], beta_div.mu_model(y, beta)[..., None] * spread)
        return ratio, model


# ----------------------------------------------------------------- building blocks
def dense_layout(X: np.ndarray | sp.spmatrix) -> tuple[bool, bool]:
    """Whether :func:`to_block` would keep X masked, and as observed triplets (its NaN entries decide)."""
    if sp.issparse(X):
        return False, False
    missing = np.isnan(X)
    masked = bool(missing.any())
    return masked, masked and 1.0 - float(missing.mean()) <= OBSERVED_FRACTION


def to_block(
    X: np.ndarray | sp.spmatrix,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    unstored_missing: bool = False,
    start: int = 0,
    triplets: bool | None = None,
    masked: bool = False,
) -> Block:
    """A numpy or scipy block of X as a :class:`Block` on ``device``.

    NaN marks missing entries of a dense X; ``unstored_missing`` makes the unstored entries
    of a sparse X missing (ratings). Ratings, and dense X with at most ``OBSERVED_FRACTION``
    observed, are kept as observed triplets (``triplets`` forces the choice: True keeps a
    complete dense X as triplets too, as a biased model reads it). ``masked``
    keeps a dense X masked with nothing missing (a block of an X that has missing entries elsewhere).
    """
    shape = tuple(X.shape)
    if sp.issparse(X):
        T = csr_tensor(sp.csr_matrix(X), dtype)
        if unstored_missing:
            rows = torch.repeat_interleave(torch.arange(shape[0]), T.crow_indices().diff())
            return ObservedBlock(rows, T.col_indices(), T.values(), shape, start).to(device)
        T = T.to(device)
        return SparseBlock(T, transpose_sparse(T), start)
    Xn = np.asarray(X, dtype=np.float64)
    missing = np.isnan(Xn)
    if not missing.any() and not masked and not triplets:
        # a read-only view (a pandas frame's values) is copied, once, rather than aliased by the block
        T = torch.from_numpy(Xn).to(dtype) if Xn.flags.writeable else torch.tensor(Xn, dtype=dtype)
        return DenseBlock(T.to(device), start)
    values, mask = torch.from_numpy(np.where(missing, 0.0, Xn)).to(dtype), torch.from_numpy(~missing)
    if triplets if triplets is not None else float(mask.float().mean()) <= OBSERVED_FRACTION:
        rows, cols = mask.nonzero(as_tuple=True)
        return ObservedBlock(rows, cols, values[rows, cols], shape, start).to(device)
    return MaskedBlock(values.to(device), mask.to(device), start, zeroed=True)  # NaN became 0 above


def from_batch(batch: dict[str, Any], dtype: torch.dtype, unstored_missing: bool, offset: int = 0) -> Block:
    """A row block from a streamed pass (see :class:`~nmf_lightning.data.rows.RowBlocks`), on the batch's device.

    ``offset``: the first row this process holds (under DDP), so ``start`` counts from its W.
    """
    start = int(batch["start"]) - offset
    device = next(v.device for v in batch.values() if isinstance(v, Tensor))
    x_sq = torch.tensor(float(batch["x_sq"]), dtype=torch.float64, device=device)
    if "X" in batch:
        X = batch["X"].to(dtype)
        if not batch["missing"]:
            return DenseBlock(X, start, x_sq)
        return MaskedBlock(torch.nan_to_num(X, nan=0.0), ~torch.isnan(X), start, x_sq, zeroed=True)
    shape = tuple(int(s) for s in batch["shape"])
    vals = batch["data"].to(dtype)
    if unstored_missing:
        counts = batch["indptr"].diff()  # output_size: no sync to learn the length
        rows = torch.repeat_interleave(torch.arange(shape[0], device=vals.device), counts, output_size=vals.numel())
        return ObservedBlock(rows, batch["indices"], vals, shape, start, x_sq)
    X = csr_from_parts(batch["indptr"], batch["indices"], vals, shape)
    Xt = None  # (read for a GPU by the loader's workers; a CPU block multiplies by X^T in X's layout)
    if "t_indptr" in batch:
        Xt = csr_from_parts(batch["t_indptr"], batch["t_indices"], batch["t_data"].to(dtype), shape[::-1])
    return SparseBlock(X, Xt, start, x_sq)
