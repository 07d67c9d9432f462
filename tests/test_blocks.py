"""Each layout's hand-written gradients against autograd on the plain formula, restarts included."""

import numpy as np
import pytest
import torch

from nmf_lightning.divergence import elementwise
from nmf_lightning.engine import DenseBlock, MaskedBlock, ObservedBlock, SparseBlock, to_block

N, M, K = 13, 9, 3
LAYOUTS = ["dense", "dense-gram", "sparse", "sparse-residual", "masked", "observed"]


def _x(layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """X (zeros where missing or unstored) and the mask of the entries that count."""
    g = torch.Generator().manual_seed(1)
    X = torch.rand(N, M, generator=g, dtype=torch.float64) + 0.1
    mask = torch.ones(N, M, dtype=torch.bool)
    if layout.startswith("sparse"):
        X = X * (torch.rand(N, M, generator=g) > 0.6)  # unstored entries are zeros, and count
    elif layout in ("masked", "observed"):
        mask = torch.rand(N, M, generator=g) > 0.35
        X = X * mask
    return X, mask


def _block(layout: str, X: torch.Tensor, mask: torch.Tensor):
    if layout.startswith("dense"):
        return DenseBlock(X)
    if layout.startswith("sparse"):
        return SparseBlock(X.to_sparse_csr())
    if layout == "masked":
        return MaskedBlock(X, mask)
    rows, cols = mask.nonzero(as_tuple=True)
    return ObservedBlock(rows, cols, X[rows, cols], (N, M))


def _factors(restarts: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    batch = () if restarts == 1 else (restarts,)
    W = torch.rand(*batch, N, K, generator=g, dtype=torch.float64) + 0.05
    H = torch.rand(*batch, K, M, generator=g, dtype=torch.float64) + 0.05
    return W, H


@pytest.mark.parametrize("restarts", [1, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_squared_error_and_its_gradients_are_autograds(layout, restarts):
    X, mask = _x(layout)
    t = _block(layout, X, mask)
    W, H = _factors(restarts)
    gram = layout in ("dense-gram", "sparse")  # the sparse X's Gram form, and its residual (loss_form=residual)
    sq, dW, dH = t.sq_and_grads(W, H, gram_form=gram)
    Wg, Hg = W.clone().requires_grad_(True), H.clone().requires_grad_(True)
    R = (X - Wg @ Hg) * mask
    want = (R * R).sum(dim=(-2, -1))
    gW, gH = torch.autograd.grad(want.sum(), (Wg, Hg))
    torch.testing.assert_close(sq, want.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dW, gW, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dH, gH, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(t.sq_error(W, H, gram_form=gram), want.detach(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("beta", [1.0, 0.5, 1.5, 0.0])
@pytest.mark.parametrize("layout", ["dense", "sparse", "masked", "observed"])
def test_beta_divergence_and_its_gradients_are_autograds(layout, beta):
    X, mask = _x(layout)
    if beta <= 0:
        if layout == "sparse":
            pytest.skip("Itakura-Saito is defined for X > 0: a sparse X has zeros")
        X = torch.where(mask, X, 0.0)
    t = _block(layout, X, mask)
    W, H = _factors(2)
    div, dW, dH = t.div_and_grads(W, H, beta)
    Wg, Hg = W.clone().requires_grad_(True), H.clone().requires_grad_(True)
    d = elementwise(X, Wg @ Hg, beta)  # W H stays far above the floors: the plain formula's gradient
    want = torch.where(mask, d, 0.0).sum(dim=(-2, -1))
    gW, gH = torch.autograd.grad(want.sum(), (Wg, Hg))
    torch.testing.assert_close(div, want.detach(), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(dW, gW, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(dH, gH, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(t.divergence(W, H, beta), want.detach(), rtol=1e-9, atol=1e-10)


def test_products_agree_across_layouts():
    """X H^T, W^T X and the model terms of a mask equal the dense formulas, for blocks made from numpy X with NaN."""
    rng = np.random.default_rng(0)
    X = rng.random((N, M))
    X[rng.random((N, M)) < 0.3] = np.nan
    W, H = _factors(1)
    mask = torch.from_numpy(~np.isnan(X))
    Xz = torch.from_numpy(np.nan_to_num(X))
    for triplets in (False, True):
        t = to_block(X, torch.float64, triplets=triplets)
        assert isinstance(t, ObservedBlock if triplets else MaskedBlock)
        torch.testing.assert_close(t.XHt(H), Xz @ H.T)
        torch.testing.assert_close(t.WtX(W), W.T @ Xz)
        torch.testing.assert_close(t.model_Ht(W, H), (mask * (W @ H)) @ H.T)
        torch.testing.assert_close(t.Wt_model(W, H), W.T @ (mask * (W @ H)))
        torch.testing.assert_close(t.col_grams(W), torch.einsum("nk,nm,nl->mkl", W, mask.double(), W))
        assert t.n_obs == int(mask.sum())


@pytest.mark.parametrize("restarts", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_sparse_block_without_its_transpose_multiplies_as_with_it(restarts, dtype, monkeypatch):
    """A CPU row block comes without X^T: W^T X read in X's layout equals the product with X^T, kernel or not."""
    from nmf_lightning import linalg

    X, _ = _x("sparse")
    W, _ = _factors(restarts)
    T, W = X.to(dtype).to_sparse_csr(), W.to(dtype)
    lazy, formed = SparseBlock(T), SparseBlock(T, linalg.transpose_sparse(T))
    assert lazy._Xt is None and len(lazy.tensors()) == 3  # nothing formed yet
    want = W.mT @ X.to(dtype)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(lazy.WtX(W), want, **tol)
    torch.testing.assert_close(formed.WtX(W), want, **tol)
    assert lazy._Xt is None  # the product did not form X^T
    torch.testing.assert_close(lazy.Xt.to_dense(), X.to(dtype).mT)  # formed when read (scipy on a CPU)
    monkeypatch.setattr(linalg, "_csc_matvecs", None)  # without scipy's private kernel: its public product
    torch.testing.assert_close(linalg.t_matmul(T, W), want.mT, **tol)
    tracked = SparseBlock(T)  # a product autograd follows forms X^T, once, and keeps it
    torch.testing.assert_close(tracked.WtX(W.clone().requires_grad_()), want, **tol)
    kept = tracked._Xt
    assert kept is not None and tracked.WtX(W.clone().requires_grad_()) is not None and tracked._Xt is kept


def test_streamed_csr_rows_are_views_with_or_without_transposes():
    """RowBlocks over a CSR X in memory: the same block with and without the transposes a GPU reads."""
    import scipy.sparse as sp

    from nmf_lightning.data.rows import RowBlocks, scan
    from nmf_lightning.engine import from_batch

    X = sp.random(40, 30, density=0.3, format="csr", random_state=0, dtype=np.float32)
    summary = scan(X, 7)
    W = torch.rand(7, 4)
    for a, b in zip(RowBlocks(X, 7, summary), RowBlocks(X, 7, summary, transposes=False), strict=True):
        assert "t_indptr" in a and "t_indptr" not in b
        assert a["indices"].dtype == torch.int64 and b["indices"].dtype == b["indptr"].dtype == torch.int32  # as X's
        ta, tb = from_batch(a, torch.float32, False), from_batch(b, torch.float32, False)
        torch.testing.assert_close(tb.X.to_dense(), ta.X.to_dense(), rtol=0, atol=0)
        w, h = W[: tb.shape[0]], torch.rand(3, 30)
        torch.testing.assert_close(tb.WtX(w), ta.WtX(w))
        torch.testing.assert_close(tb.XHt(h), ta.XHt(h))
        torch.testing.assert_close(tb.transposed().XHt(w.mT[:3]), ta.transposed().XHt(w.mT[:3]))
    b = RowBlocks(X, 7, summary, transposes=False)[1]
    assert np.shares_memory(b["data"].numpy(), X.data)  # rows of X in memory are read in place


def test_streaming_a_csr_with_duplicates_leaves_x_as_it_was():
    """Blocks of a non-canonical CSR X are made canonical in a copy: X itself is never summed or sorted."""
    import scipy.sparse as sp

    from nmf_lightning.data.rows import RowBlocks, scan

    parts = (np.array([1.0, 2.0, 3.0, 4.0]), np.array([1, 0, 0, 1], dtype=np.int32), np.array([0, 3, 4, 4]))
    X = sp.csr_matrix(parts, shape=(3, 2))  # row 0 holds column 0 twice (duplicates), unsorted
    kept = (X.data.copy(), X.indices.copy(), X.indptr.copy())
    blocks = RowBlocks(X, 2, scan(X, 2), torch.float64, transposes=False)
    for _ in range(2):  # every pass reads the same rows
        b = blocks[0]
        torch.testing.assert_close(
            torch.sparse_csr_tensor(b["indptr"], b["indices"], b["data"], size=b["shape"]).to_dense(),
            torch.tensor([[5.0, 1.0], [0.0, 4.0]], dtype=torch.float64),
        )
    for now, before in zip((X.data, X.indices, X.indptr), kept, strict=True):
        np.testing.assert_array_equal(now, before)
