"""The linear algebra every layer shares: Grams, sparse products, error sums, CSR parts.

Pure functions of tensors, with no notion of a fit: the objective, the row blocks of
the engine and the update rules all import from here, and from nothing above it.
Shapes: X (n, m), W (..., n, k), H (..., k, m); a leading restart dimension is kept.

The squared error ``||X - WH||^2`` has two forms. The residual form builds the n x m
residual; the Gram form expands it as ``||X||^2 - 2<X H^T, W> + <W^T W, H H^T>`` and
needs only X H^T, W^T X and k x k products (sparse-friendly, no n x m temporary), but
loses precision once the relative error nears sqrt(eps) of the dtype.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

try:  # scipy's kernel for a CSC matrix times dense columns: X^T @ B read from X's CSR arrays, nothing built
    from scipy.sparse._sparsetools import csc_matvecs as _csc_matvecs
except ImportError:  # (a private module: without it, a scipy matrix is built around the same arrays)
    _csc_matvecs = None


def gram(A: Tensor, left: bool) -> Tensor:
    """W^T W (``left``) or H H^T, (..., k, k)."""
    return A.mT @ A if left else A @ A.mT


def eps_for(A: Tensor) -> float:
    """The dtype's machine epsilon (scikit-learn's EPSILON for float64)."""
    return float(torch.finfo(A.dtype).eps)


def floor_for(
    values: Tensor | np.ndarray, dims: tuple[int, ...] = (-1,), nonnegative: bool = False
) -> Tensor | np.ndarray:
    """A division guard scaled to the values it guards: eps of their largest over ``dims`` (kept), never 0.

    An absolute guard (eps itself) swamps every value once X is small enough (X at 1e-6
    in float32 makes W^T W H about 1e-9), so a solver's fit would depend on X's units;
    this one is the same at any scale of X. A numpy array (HALS on a CPU) gets a numpy
    floor: four torch calls on a few numbers cost more than the pass they guard.
    ``nonnegative`` values (MU's denominators) skip the absolute value: a pass over a
    k x m tensor, 0.7 ms of an online block's 8 ms on 101 322 columns.
    """
    if isinstance(values, np.ndarray):
        info = np.finfo(values.dtype)
        top = (values if nonnegative else np.abs(values)).max(axis=dims, keepdims=True)
        return np.maximum(top * values.dtype.type(info.eps), info.tiny)
    top = (values.detach() if nonnegative else values.detach().abs()).amax(dim=dims, keepdim=True)
    return (top * eps_for(values)).clamp_min(torch.finfo(values.dtype).tiny)


def per_column(weight: float | Tensor) -> float | Tensor:
    """A penalty weight as a vector over H's columns, (..., m), from its (..., 1, m) form; a number stays one.

    ``model.l2_scale=count`` weighs each column of H (each row of W, on the transposed
    problem) by its number of observed entries; the rules take such a weight as (..., 1, m),
    which broadcasts against H (..., k, m).
    """
    return weight[..., 0, :] if isinstance(weight, Tensor) else weight


def scatter_rows(index: Tensor, size: int, values: Tensor) -> Tensor:
    """Sum per-entry rows (..., n_obs, k) into ``size`` rows by ``index``: (..., size, k)."""
    out = values.new_zeros(*values.shape[:-2], size, values.shape[-1])
    return out.index_add_(-2, index, values)


#: the residual form works through X in row chunks of at most this many entries
RESIDUAL_CHUNK = 2**22


def sq_error_residual(X: Tensor, W: Tensor, H: Tensor, mask: Tensor | None = None) -> Tensor:
    """Sum of squared residuals over observed entries, via the explicit residual.

    Rows are taken in chunks, so the temporary stays small (an n x m residual of a large
    X would cost more in allocation than in arithmetic).
    """
    if is_sparse(X):
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


def row_major(A: Tensor) -> Tensor:
    """A laid out by rows (A itself when it is): the layout sparse kernels and row-wise passes read.

    A CPU float tensor is copied by numpy: a transposed H (20 x 101 322) took 2.1 ms as
    torch's strided copy and 0.8 ms so, on one thread, and a sparse block's product with
    H^T paid that copy every time.
    """
    if A.is_contiguous():
        return A
    tracked = A.requires_grad and torch.is_grad_enabled()
    if A.device.type == "cpu" and A.dtype in (torch.float32, torch.float64) and not tracked:
        return torch.from_numpy(np.ascontiguousarray(A.detach().numpy()))
    return A.contiguous()


def matmul(X: Tensor, B: Tensor) -> Tensor:
    """X @ B for a dense or sparse X (n, m) and B (m, k) or a batch (r, m, k).

    Sparse kernels take no batch, so a batch is laid side by side as one (m, r k) matrix:
    one pass over X's non-zeros serves every restart. A sparse kernel reads B by rows
    (:func:`row_major`; H^T comes as a view).
    """
    if not is_sparse(X):
        return X @ B
    if B.dim() == 2:
        return X @ row_major(B)
    r, m, k = B.shape
    if r == 1:
        return (X @ B[0]).unsqueeze(0)
    out = X @ B.permute(1, 0, 2).reshape(m, r * k)  # (n, r k)
    return out.reshape(X.shape[0], r, k).permute(1, 0, 2)


def rows_at(W: Tensor, rows: Tensor) -> Tensor:
    """W's rows ``rows[i]``, (..., len, k), gathered from W laid out by rows (H^T comes as a view)."""
    return row_major(W).index_select(-2, rows)


def cols_at(H: Tensor, cols: Tensor) -> Tensor:
    """H's columns ``cols[i]`` as rows, (..., len, k): gathered from H^T laid out by rows.

    Indexing H (k, m) along its columns strides across memory for every entry; on MovieLens
    100k (90,000 entries, k = 20) that took 4-6 ms against 0.4 ms this way, on one CPU thread.
    """
    return row_major(H.mT).index_select(-2, cols)


def predict_observed(rows: Tensor, cols: Tensor, W: Tensor, H: Tensor) -> Tensor:
    """(W H) at the listed entries (rows[i], cols[i]) only, (..., n_obs): O(|obs| k), never an n x m product."""
    return (rows_at(W, rows) * cols_at(H, cols)).sum(dim=-1)


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
        Xt = transpose_sparse(X) if is_sparse(X) else X.T
    return _GramSqError.apply(W, H, X, Xt, X_sq)


def frobenius_sq(X: Tensor, mask: Tensor | None = None) -> Tensor:
    """``||X||_F^2`` over observed entries, accumulated in float64 for an honest denominator."""
    if is_sparse(X):
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
    """X^T as a row-compressed (CSR) tensor, so X^T @ W runs as a row-major sparse product.

    On a CPU scipy transposes it: torch's conversion took 56 ms for a 5000 x 2000 block
    of 1.07 M entries, scipy's 4.6 ms.
    """
    if X.layout != torch.sparse_csr:
        return X.t().coalesce()
    if not _host_csr(X):
        return X.t().to_sparse_csr()
    T = scipy_csr(X).T.tocsr()  # (from CSC: sorted, no duplicates)
    index = X.crow_indices().dtype
    parts = (torch.from_numpy(a.astype(np.int64 if index == torch.int64 else np.int32)) for a in (T.indptr, T.indices))
    return csr_from_parts(*parts, torch.from_numpy(T.data), T.shape)


def t_matmul(X: Tensor, B: Tensor) -> Tensor:
    """X^T @ B for a CSR X (n, m) and B (n, k) or a batch (r, n, k): (..., m, k).

    A row block streamed to a CPU comes without its transpose: scipy's kernel multiplies
    by X^T in X's own layout (3.0 ms on a 5000 x 2000 block of 1.07 M entries at k = 10,
    where transposing it first took 4.6 ms and the product 1.6 ms), called on X's arrays
    directly (building scipy matrices around them cost 0.2 ms a block). Elsewhere X^T is formed.
    """
    if not scipy_multiplies(X, B):
        return matmul(transpose_sparse(X), B)
    n, m = X.shape
    crow, col, val = _csr_arrays(X)
    batch = B.detach().permute(1, 0, 2).reshape(n, -1) if B.dim() == 3 else B.detach()  # one pass serves all restarts
    other = np.ascontiguousarray(batch.numpy())
    if _csc_matvecs is not None and crow.dtype == col.dtype:  # X^T is X's arrays read as CSC
        out = np.zeros((m, other.shape[1]), dtype=val.dtype)
        _csc_matvecs(m, n, other.shape[1], crow, col, val, other.ravel(), out.ravel())
    else:
        out = scipy_csr(X).T @ other
    out = torch.from_numpy(out).to(B.dtype)
    return out if B.dim() == 2 else out.reshape(m, B.shape[0], -1).permute(1, 0, 2)


def scipy_multiplies(X: Tensor, B: Tensor) -> bool:
    """Whether :func:`t_matmul` reads X^T @ B from X's arrays (else it forms X^T): host floats, no autograd."""
    tracked = B.requires_grad and torch.is_grad_enabled()
    return _host_csr(X) and not tracked and B.device.type == "cpu" and B.dtype == X.dtype


def _host_csr(X: Tensor) -> bool:
    """Whether X is a CSR tensor scipy can read in place (CPU, float values, untracked)."""
    return (
        X.layout == torch.sparse_csr
        and X.device.type == "cpu"
        and X.dtype in (torch.float32, torch.float64)
        and not X.requires_grad
    )


def _csr_arrays(X: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A CPU CSR tensor's (indptr, indices, data) as numpy arrays over the same memory."""
    return X.crow_indices().numpy(), X.col_indices().numpy(), X.values().numpy()


def scipy_csr(X: Tensor) -> sp.csr_matrix:
    """A CPU CSR tensor as a scipy CSR matrix over the same memory (no copy)."""
    crow, col, val = _csr_arrays(X)
    return sp.csr_matrix((val, col, crow), shape=tuple(X.shape), copy=False)


def is_sparse(X: Tensor) -> bool:
    """Whether X is a sparse (CSR or COO) tensor."""
    return X.is_sparse or X.layout == torch.sparse_csr


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


def csr_rows(X: Tensor, idx: Tensor) -> Tensor:
    """Rows ``idx`` of a CSR X as a dense (b, m) block, read from its row pointers.

    Sparse CSR tensors have no ``index_select``; through COO it cost a conversion of all
    of X per update and 30 ms per block of 32 rows of a 5000 x 20000 matrix at 1 %.
    """
    crow, col, val = X.crow_indices(), X.col_indices(), X.values()
    starts = crow[idx]
    counts = crow[idx + 1] - starts
    total = int(counts.sum())  # one sync: the length of what is read
    which = torch.repeat_interleave(torch.arange(len(idx), device=X.device), counts, output_size=total)
    first = torch.cumsum(counts, 0) - counts  # where each row's entries start in the output
    at = starts[which] + torch.arange(total, device=X.device) - first[which]
    out = torch.zeros(len(idx), X.shape[1], dtype=val.dtype, device=X.device)
    out[which, col[at]] = val[at]
    return out
