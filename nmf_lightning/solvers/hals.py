"""HALS: exact coordinate descent on one row of H (column of W) at a time.

For row j of H, holding the rest fixed, the minimiser of
1/2 ||X - WH||^2 + l1_H |H|_1 + l2_H/2 ||H||^2 over H[j] >= 0 is (with l2_H added to
the diagonal of W^T W, as scikit-learn does)
``max(0, H[j] + ((W^T X)[j] - (W^T W H)[j] - l1_H) / (W^T W)[j, j])``; a pass over
j = 1..k uses each updated row at once (scikit-learn's ``cd`` solver, Gram form).
The W-update is the same :func:`sweep` on the transposed problem, and the H-update
reads only W^T W and W^T X, sums over row blocks (:func:`h_stats`).
Masked X uses the weighted form with per-column denominators.
``sweeps`` > 1 repeats the cheap k-row pass on the same W^T W and W^T X (accelerated HALS:
the X products are paid once for several passes), stopping early once a pass changes
the factor by less than a tenth of what the first pass changed it.
Refs: Cichocki & Phan, "Fast local algorithms for large scale NMF", IEICE 2009;
Gillis & Glineur, "Accelerated multiplicative updates and hierarchical alternating least
squares algorithms for NMF", Neural Computation 24(4), 2012.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from nmf_lightning.linalg import floor_for, gram, per_column, row_major

if TYPE_CHECKING:
    from nmf_lightning.engine.blocks import Block

#: a repeated pass stops once it changes the factor by less than this share of the first pass's change
SWEEP_TOL = 0.1


def sweep(A: Tensor, G: Tensor, B: Tensor, l1: float = 0.0, l2: float = 0.0, sweeps: int = 1) -> Tensor:
    """Coordinate passes over the k rows of A (..., k, p) for ``min 1/2 <A, G A> - <A, B>``.

    H-update: A = H, G = W^T W, B = W^T X. W-update: A = W^T, G = H H^T, B = (X H^T)^T.
    On the CPU the k-loop runs on numpy views of the same memory: a numpy call costs about
    a microsecond, a torch call several, and the loop is k calls of each per sweep. Elsewhere
    (a GPU, half precision) each row is two torch ops (:func:`_scaled_torch`).
    ``sweeps`` passes at most (see the module's docstring).
    """
    A = A.clone(memory_format=torch.contiguous_format)  # W^T comes as a view: rows must be contiguous
    G, B = _add_diag(G, l2), row_major(B - l1 if l1 else B)
    if G.dtype != A.dtype or B.dtype != A.dtype:  # under autocast (bf16-mixed) the Grams come in bf16
        G, B = G.to(A.dtype), B.to(A.dtype)
    if torch.is_autocast_enabled(A.device.type):  # the passes run in A's dtype
        with torch.autocast(A.device.type, enabled=False):
            _passes(A, G, B, sweeps)
    else:  # (entering a context costs microseconds a small pass notices)
        _passes(A, G, B, sweeps)
    return A


def _passes(A: Tensor, G: Tensor, B: Tensor, sweeps: int) -> None:
    """Up to ``sweeps`` passes over A in place (numpy views on a CPU, two torch ops per row elsewhere).

    A diagonal entry of G below eps of its largest (a component that is all but zero) is
    divided by that floor instead: relative, so the passes are the same at any scale of X.
    """
    numpy = A.device.type == "cpu" and A.dtype in (torch.float32, torch.float64)
    floor = floor_for(np.diagonal(G.numpy(), axis1=-2, axis2=-1) if numpy else torch.diagonal(G, dim1=-2, dim2=-1))
    scaled = None if numpy else _scaled_torch(G, B, floor)
    first = None
    for s in range(sweeps):
        before = A.clone() if sweeps > 1 else None
        if scaled is None:
            _sweep_numpy(A.numpy(), G.numpy(), B.numpy(), floor)
        else:
            _sweep_torch(A, *scaled)
        if before is not None and s + 1 < sweeps:
            change = float(torch.linalg.vector_norm(A - before))  # one sync per extra pass
            if first is None:
                first = change
            elif change <= SWEEP_TOL * first:
                break


def _sweep_numpy(a: np.ndarray, g: np.ndarray, b: np.ndarray, floor: np.ndarray) -> None:
    """:func:`sweep` in place on numpy arrays (a, b: (..., k, p), g: (..., k, k), l1 folded into b).

    Rows of G and B are divided by G's diagonal (at least ``floor``, (..., 1)) first, so each
    row of A costs four calls: ``A[j] = max(0, A[j] + B'[j] - G'[j] A)``.
    """
    inv = 1.0 / np.maximum(np.diagonal(g, axis1=-2, axis2=-1), floor)[..., None]  # (..., k, 1)
    g, b = g * inv, b * inv
    flat = a.ndim == 2
    step = np.empty_like(a[0]) if flat else None
    for j in range(a.shape[-2]):
        if flat:
            np.dot(g[j], a, out=step)  # (G' A)[j]
        else:
            step = np.matmul(g[..., j : j + 1, :], a)[..., 0, :]
        np.subtract(b[..., j, :], step, out=step)
        row = a[..., j, :]
        row += step
        np.maximum(row, 0, out=row)


def _scaled_torch(G: Tensor, B: Tensor, floor: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """G and B with rows divided by G's diagonal and 1 taken off that diagonal, as (b, k, k), (b, k, p).

    Then a row's update ``max(0, A[j] + (B[j] - G[j] A) / G[j, j])`` is ``max(0, B'[j] - G'[j] A)``:
    one batched matmul-add and one clamp, two kernels per row on a GPU where the plain formula
    takes eight.
    """
    diag = torch.diagonal(G, dim1=-2, dim2=-1)
    inv = 1.0 / torch.maximum(diag, floor)[..., None]
    G1 = (G * inv).reshape(-1, *G.shape[-2:])
    G1.diagonal(dim1=-2, dim2=-1).copy_((diag / floor).clamp_max(1).reshape(G1.shape[:-1]) - 1)  # 0 unless tiny
    B1 = (B * inv).reshape(-1, *B.shape[-2:])
    return G1, B1, B1.new_empty(B1.shape[0], 1, B1.shape[-1])


def _sweep_torch(A: Tensor, G1: Tensor, B1: Tensor, step: Tensor) -> None:
    """:func:`sweep` in place with torch ops on the scaled G', B' of :func:`_scaled_torch`."""
    a = A.view(-1, *A.shape[-2:])  # A is contiguous: a view, so rows are written into A
    rows = zip(B1.split(1, dim=1), G1.split(1, dim=1), a.split(1, dim=1), strict=True)  # views made once
    for b, g, row in rows:
        torch.baddbmm(b, g, a, alpha=-1, out=step)
        torch.clamp(step, min=0, out=row)


def update_h(t: Block, W: Tensor, H: Tensor, l1_H: float = 0.0, l2_H: float | Tensor = 0.0, sweeps: int = 1) -> Tensor:
    """HALS passes over the k rows of H; W (..., n, k), H (..., k, m) (a masked X takes one)."""
    if t.masked:
        return _masked_pass(t.X, t.mask, W, H.clone(), l1_H, l2_H)
    return h_from_stats(h_stats(t, W, H), H, l1_H, l2_H, sweeps)


def update_w(t: Block, W: Tensor, H: Tensor, l1_W: float = 0.0, l2_W: float | Tensor = 0.0, sweeps: int = 1) -> Tensor:
    """HALS passes over the k columns of W, as :func:`update_h` on the transposed problem."""
    return update_h(t.transposed(), H.mT, W.mT, l1_W, l2_W, sweeps).mT


def h_stats(t: Block, W: Tensor, H: Tensor) -> dict[str, Tensor]:
    """The sums over row blocks the H-update reads: W^T X, and W^T W (or per-column Grams when masked)."""
    if t.masked:
        return {"WtX": t.WtX(W), "grams": t.col_grams(W)}
    return {"WtX": t.WtX(W), "WtW": gram(W, left=True)}


def h_from_stats(
    stats: dict[str, Tensor], H: Tensor, l1_H: float = 0.0, l2_H: float | Tensor = 0.0, sweeps: int = 1
) -> Tensor:
    """The H-update from :func:`h_stats` summed over all row blocks."""
    if "grams" not in stats:
        return sweep(H, stats["WtW"], stats["WtX"], l1_H, l2_H, sweeps)
    G, B = stats["grams"], stats["WtX"]  # (..., m, k, k), (..., k, m)
    H = H.clone()
    l2 = per_column(l2_H)  # (..., m) with a weight per column
    diag = torch.diagonal(G, dim1=-2, dim2=-1) + (l2[..., None] if isinstance(l2, Tensor) else l2)
    floor = floor_for(diag, dims=(-2, -1))[..., 0]  # (..., 1)
    for j in range(H.shape[-2]):  # column c: min over h of 1/2 G_c[j,j] h^2 - (B_jc - sum_{l != j} G_c[j,l] H_lc) h
        Gjj = G[..., :, j, j]
        num = B[..., j, :] - (G[..., :, j, :] * H.mT).sum(-1) + Gjj * H[..., j, :] - l1_H
        H[..., j, :] = (num / torch.maximum(Gjj + l2, floor)).clamp_min(0)
    return H


def _add_diag(G: Tensor, value: float) -> Tensor:
    return G + value * torch.eye(G.shape[-1], dtype=G.dtype, device=G.device) if value else G


def _masked_pass(X: Tensor, mask: Tensor, W: Tensor, H: Tensor, l1: float, l2: float | Tensor) -> Tensor:
    """Weighted HALS for a dense mask M: row j of H solves sum_i M_ic (R_ic + W_ij H_jc - W_ij h)^2."""
    M = mask.to(W.dtype)
    R = M * (X - W @ H)  # (..., n, m) residual at observed entries
    floor = floor_for(W * W, dims=(-2, -1))[..., 0]  # (..., 1): eps of the largest squared entry of W
    for j in range(H.shape[-2]):
        w = W[..., :, j, None]  # (..., n, 1)
        num = (w * R).sum(-2) + (w * w * M).sum(-2) * H[..., j, :] - l1
        den = torch.maximum((w * w * M).sum(-2) + per_column(l2), floor)
        new = (num / den).clamp_min(0)
        R = R - M * (w * (new - H[..., j, :])[..., None, :])
        H[..., j, :] = new
    return H


def nnls(
    XHt: Tensor, HHt: Tensor, W: Tensor, l1: float, l2: float, max_iter: int, tol: float
) -> tuple[Tensor, int, bool]:
    """HALS passes for ``min_{W >= 0} 1/2 ||X - W H||^2 + l1 |W|_1 + l2/2 ||W||^2`` with H fixed.

    X H^T (n, k) and H H^T (k, k) are formed once by the caller, so a pass costs n k^2 and
    no product with X: the passes features of very different scales take are cheap. Every
    10 passes each row takes Lawson-Hanson steps on its support (:func:`_on_support`), then
    the test: the projected gradient's norm at most ``tol`` times its value at the start
    (scikit-learn's test for ``cd``). Returns W, the passes run and whether tol was met.
    """
    k, dtype = HHt.shape[-1], torch.float64  # k x n work: float32 rounding would floor the gradient test
    G = HHt.to(dtype) + l2 * torch.eye(k, dtype=dtype, device=HHt.device)
    B = (XHt.to(dtype) - l1).mT.contiguous()  # (k, n)
    A = W.mT.to(dtype).contiguous()

    def pg_norm(A: Tensor) -> float:
        grad = G @ A - B
        return float(torch.linalg.vector_norm(torch.where(A > 0, grad, grad.clamp_max(0))))

    start = pg_norm(A)
    for steps in range(1, max_iter + 1):
        A = sweep(A, G, B)
        if steps % 10 == 0 or steps == max_iter:
            A = _on_support(A, G, B)
            if pg_norm(A) <= tol * start:
                return A.mT.to(W.dtype), steps, True
    return A.mT.to(W.dtype), max_iter, start == 0


def _on_support(A: Tensor, G: Tensor, B: Tensor, steps: int = 3, chunk: int = 1 << 22) -> Tensor:
    """Lawson-Hanson steps from each column of A (k, n): least squares on its support, stepping back to >= 0.

    Passes find which entries are 0 long before they settle the others when features
    differ in scale or components overlap; on the support the problem is a k x k solve.
    Where that solve leaves the support, the column moves towards it as far as it stays
    >= 0 (the objective falls all the way), the entry that reaches 0 leaves the support,
    and the solve is repeated, ``steps`` times at most. Entries of a component that is 0
    throughout (G[j, j] = 0) count as off the support.
    """
    k, n = A.shape
    rows = max(1, chunk // (k * k))  # columns solved at once: their (k, k) systems hold ~chunk numbers
    live = G.diagonal() > 0
    out = torch.empty_like(A)  # every column is written
    for lo in range(0, n, rows):
        a, b = A[:, lo : lo + rows].mT, B[:, lo : lo + rows].mT  # (c, k); a is replaced, never written into
        support = (a > 0) & live
        for _ in range(steps):
            d = support.to(A.dtype)
            M = d[:, :, None] * G * d[:, None, :] + torch.diag_embed(1 - d)  # G on the support, I off it
            x, info = torch.linalg.solve_ex(M, d * b)
            solved = (info == 0) & torch.isfinite(x).all(-1)
            below = support & (x < 0)
            # the step from a towards x that keeps every entry >= 0 (1: x itself)
            ratio = torch.where(below, a / (a - x).clamp_min(torch.finfo(a.dtype).tiny), torch.inf)
            step = torch.where(solved, ratio.amin(-1).clamp(max=1.0), 0.0)[:, None]
            a = torch.where(support, a + step * (x - a), 0.0).clamp_min(0)
            a = torch.where(below & (ratio <= step), 0.0, a)  # the entries that reached 0 leave
            support = support & (a > 0)
            if not bool((solved & below.any(-1)).any()):  # every solved column is >= 0: done
                break
        out[:, lo : lo + a.shape[0]] = a.mT
    return out
