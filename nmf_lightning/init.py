"""Initial factors (W, H) for X ~ W H, computed on X's device from a seeded generator.

``random`` follows scikit-learn: entries ``sqrt(mean(X) / k) * |N(0, 1)|``, so W H starts
at the scale of X (gradient methods converge from here; tiny starts plateau).
``normal_abs`` is the notebooks' ``|N(0, sigma)|``. The NNDSVD family is Boutsidis &
Gallopoulos (2008), with scikit-learn's definitions of ``nndsvda`` and ``nndsvdar``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from nmf_lightning.validation import NMFInputError

if TYPE_CHECKING:
    from nmf_lightning.engine.blocks import Block

INITS = ("random", "normal_abs", "nndsvd", "nndsvda", "nndsvdar")
#: inits that read X's singular vectors and so need rank <= min(n, m)
SVD_INITS = ("nndsvd", "nndsvda", "nndsvdar")
#: inits that give the same start for every seed: with restarts, only the first starts from one
DETERMINISTIC_INITS = ("nndsvd", "nndsvda")


def initial_factors(
    t: Block, rank: int, init: str = "random", *, seed: int = 0, restarts: int = 1, scale: float = 0.01
) -> tuple[Tensor, Tensor]:
    """The starting W and H for X held whole as one :class:`~nmf_lightning.engine.Block`, in its dtype and device.

    Restart r draws from seed ``seed + r``; with ``restarts`` > 1 the factors are stacked,
    (r, n, k) and (r, k, m). The random inits read only X's mean; the SVD inits take the SVD
    of X with zeros at the missing entries.
    """
    mean = float(t.values_sum()) / max(t.n_obs, 1)
    like = torch.empty((), dtype=t.dtype, device=t.device)
    if init not in SVD_INITS:
        return draw_factors(t.shape, rank, init, mean=mean, seed=seed, restarts=restarts, scale=scale, like=like)
    X, _ = t.for_svd()
    Xf = X if X.dtype in (torch.float32, torch.float64) else X.float()
    pairs = [_nndsvd(Xf, rank, init, generator=_seeded(seed + r), mean=mean, eps=1e-6) for r in range(restarts)]
    return stack_restarts(pairs, like=like)


def draw_factors(
    shape: tuple[int, int],
    rank: int,
    init: str,
    *,
    mean: float,
    seed: int = 0,
    restarts: int = 1,
    scale: float = 0.01,
    like: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The random inits for ``restarts`` seeds from X's shape and mean (all a streamed X offers), like ``like``."""
    pairs = [draw(shape, rank, init, generator=_seeded(seed + r), mean=mean, scale=scale) for r in range(restarts)]
    return stack_restarts(pairs, like=like)


def stack_restarts(pairs: list[tuple[Tensor, Tensor]], like: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(W, H) of one start as 2-D factors, of several stacked on a leading restart dimension."""
    to = {} if like is None else {"dtype": like.dtype, "device": like.device}
    if len(pairs) == 1:  # plain 2-D factors: no batch overhead in the hot loop
        W, H = pairs[0]
        return W.to(**to), H.to(**to)
    return torch.stack([W for W, _ in pairs]).to(**to), torch.stack([H for _, H in pairs]).to(**to)


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def initialize(
    X: Tensor,
    rank: int,
    init: str = "random",
    *,
    generator: torch.Generator,
    mask: Tensor | None = None,
    scale: float = 0.01,
    eps: float = 1e-6,
    n_obs: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Return (W, H) of shapes (n, k) and (k, m) in X's dtype and device.

    ``generator`` is a CPU generator; drawing on the CPU makes a seed give the same
    factors on every device. ``scale`` is sigma of ``normal_abs``. X holds 0 at missing
    entries; ``mask`` or ``n_obs`` (the number of observed entries) says how many count.
    """
    if init in SVD_INITS:
        return _nndsvd(X, rank, init, generator=generator, mean=_mean(X, mask, n_obs), eps=eps)
    W, H = draw(X.shape, rank, init, generator=generator, mean=_mean(X, mask, n_obs), scale=scale)
    return W.to(device=X.device, dtype=X.dtype), H.to(device=X.device, dtype=X.dtype)


def draw(
    shape: tuple[int, int], rank: int, init: str, *, generator: torch.Generator, mean: float, scale: float = 0.01
) -> tuple[Tensor, Tensor]:
    """The random inits from X's shape and mean alone (on the CPU): all a streamed X needs read."""
    n, m = shape
    if init == "random":
        avg = math.sqrt(mean / rank)
        return avg * _randn((n, rank), generator).abs(), avg * _randn((rank, m), generator).abs()
    if init == "normal_abs":
        # W first, then H: the order of the 20 newsgroups notebook under torch.manual_seed
        W = torch.normal(0.0, scale, size=(n, rank), generator=generator).abs()
        return W, torch.normal(0.0, scale, size=(rank, m), generator=generator).abs()
    raise NMFInputError(f"model.init={init!r} is not a known init; choose one of {INITS}.")


def _randn(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def _mean(X: Tensor, mask: Tensor | None, n_obs: int | None = None) -> float:
    """Mean of the observed entries: X holds 0 at missing ones; ``n_obs`` counts the rest.

    Sparse zeros count as observed unless ``n_obs`` says otherwise.
    """
    n, m = X.shape
    if X.is_sparse or X.layout == torch.sparse_csr:
        values = X.coalesce().values() if X.is_sparse else X.values()
        return float(values.sum(dtype=torch.float64)) / (n_obs or n * m)
    if n_obs is None and mask is not None:
        n_obs = int(mask.sum())
    return float(X.sum(dtype=torch.float64)) / max(n_obs or n * m, 1)  # accumulated in float64, no copy of X


def _nndsvd(
    X: Tensor,
    rank: int,
    variant: str,
    *,
    generator: torch.Generator,
    mean: float,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """NNDSVD: split each singular pair into positive and negative parts, keep the larger.

    Sign-invariant, so any SVD routine will do. ``nndsvda`` fills the zeros with the
    factors' typical entry, ``sqrt(mean / rank)`` (the random init's scale), and ``nndsvdar``
    with 1% noise of it: the start of c X is then the start of X scaled by sqrt(c).
    (Boutsidis & Gallopoulos, and scikit-learn, fill with X's mean itself, a value in X's
    units: for a large X, W H starts far above it, and float32 products overflow.)
    """
    _check_svd_rank(rank, X.shape, variant)
    U, S, V = _top_svd(X, rank, generator)  # (n, k), (k,), (m, k)
    return _nndsvd_of(U, S, V, rank, variant, generator=generator, mean=mean, eps=eps)


def _check_svd_rank(rank: int, shape: tuple[int, int], variant: str) -> None:
    """An NNDSVD start takes ``rank`` singular pairs of X: at most min(n, m) of them exist."""
    n, m = shape
    if rank > min(n, m):
        raise NMFInputError(
            f"model.init={variant} needs model.rank <= min(n, m) = {min(n, m)} for X of shape "
            f"{n}x{m}, got rank {rank}; lower the rank or use model.init=random."
        )


def _nndsvd_of(
    U: Tensor, S: Tensor, V: Tensor, rank: int, variant: str, *, generator: torch.Generator, mean: float, eps: float
) -> tuple[Tensor, Tensor]:
    """NNDSVD from X's leading singular triplets U (n, k), S (k,), V (m, k)."""
    x, y = U.T, V.T  # (k, n), (k, m)
    x_p, x_n = x.clamp_min(0), (-x).clamp_min(0)
    y_p, y_n = y.clamp_min(0), (-y).clamp_min(0)
    xp_nrm, yp_nrm = x_p.norm(dim=1), y_p.norm(dim=1)
    xn_nrm, yn_nrm = x_n.norm(dim=1), y_n.norm(dim=1)
    m_p, m_n = xp_nrm * yp_nrm, xn_nrm * yn_nrm
    pos = m_p > m_n
    tiny = torch.finfo(U.dtype).tiny
    u = torch.where(pos[:, None], x_p / xp_nrm.clamp_min(tiny)[:, None], x_n / xn_nrm.clamp_min(tiny)[:, None])
    v = torch.where(pos[:, None], y_p / yp_nrm.clamp_min(tiny)[:, None], y_n / yn_nrm.clamp_min(tiny)[:, None])
    lbd = torch.sqrt(S * torch.where(pos, m_p, m_n))
    W = (lbd[:, None] * u).T.contiguous()
    H = lbd[:, None] * v
    # the leading singular pair is non-negative up to sign
    W[:, 0] = torch.sqrt(S[0]) * U[:, 0].abs()
    H[0, :] = torch.sqrt(S[0]) * V[:, 0].abs()
    for factor in (W, H):  # below eps of the largest entry: relative, the same start at any scale of X
        factor.masked_fill_(factor < factor.max() * eps, 0)
    fill = math.sqrt(max(mean, 0.0) / rank)
    if variant == "nndsvda":
        W[W == 0] = fill
        H[H == 0] = fill
    elif variant == "nndsvdar":
        for A in (W, H):
            zeros = A == 0
            noise = _randn((int(zeros.sum()), 1), generator).flatten()
            A[zeros] = (fill * noise / 100).abs().to(A)
    return W, H


def _top_svd(X: Tensor, rank: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Leading ``rank`` singular triplets: exact for a small dense X, randomized otherwise.

    The randomized SVD (scikit-learn's choice for NNDSVD, with the same oversampling) costs
    a few products with X: a full SVD of 2000 x 1000 takes longer than a whole fit.
    """
    n, m = X.shape
    sparse = X.is_sparse or X.layout == torch.sparse_csr
    if not sparse and exact_svd(n, m, rank):
        U, S, Vh = torch.linalg.svd(X, full_matrices=False)
        return U[:, :rank], S[:rank], Vh[:rank].T
    wide = torch.promote_types(X.dtype, torch.float32)
    if X.layout == torch.sparse_csr:  # (its transpose multiplies as COO)
        X = X.to_sparse_coo()

    def times(B: Tensor) -> Tensor:
        return (X @ B.to(X.dtype)).to(wide)

    def t_times(A: Tensor) -> Tensor:
        return (X.mT @ A.to(X.dtype)).to(wide)

    return randomized_svd(times, t_times, (n, m), rank, generator, wide, X.device)


def exact_svd(n: int, m: int, rank: int) -> bool:
    """Whether a dense X is small enough for an exact SVD (cheaper, then, than the randomized one's passes)."""
    return min(n, m) <= max(128, 4 * (rank + 10))


def randomized_svd(
    times: Callable[[Tensor], Tensor],
    t_times: Callable[[Tensor], Tensor],
    shape: tuple[int, int],
    rank: int,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device | str,
    niter: int = 4,
) -> tuple[Tensor, Tensor, Tensor]:
    """Leading singular triplets of X from products with it alone: ``times(B)`` = X B, ``t_times(A)`` = X^T A.

    Halko, Martinsson & Tropp's range finder with ``niter`` power iterations and 10
    oversamples (``torch.svd_lowrank``'s algorithm, scikit-learn's for NNDSVD). A pass over
    row blocks gives both products, so a streamed X gets the same start as X in memory.
    """
    n, m = shape
    q = min(rank + 10, n, m)
    R = torch.randn((m, q), generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    Q = torch.linalg.qr(times(R)).Q
    for _ in range(niter):
        Q = torch.linalg.qr(t_times(Q)).Q
        Q = torch.linalg.qr(times(Q)).Q
    U, S, Vh = torch.linalg.svd(t_times(Q).mT, full_matrices=False)  # of Q^T X (q, m)
    return (Q @ U)[:, :rank], S[:rank], Vh[:rank].mT


def streamed_nndsvd(
    passes: Callable[[], Iterable[Block]],
    shape: tuple[int, int],
    rank: int,
    variant: str,
    *,
    mean: float,
    sparse: bool = False,
    seed: int = 0,
    restarts: int = 1,
    like: Tensor,
) -> tuple[Tensor, Tensor]:
    """The NNDSVD inits of an X read in row blocks (``passes()`` gives one pass; missing entries count as 0).

    The same SVD as X held whole: a small dense X's exact one from X^T X (one pass, then
    one for U), else the randomized one, each product with X a pass. The factors equal
    those of X held whole to rounding.
    """
    n, m = shape
    _check_svd_rank(rank, shape, variant)
    wide = torch.promote_types(like.dtype, torch.float32)

    def times(B: Tensor) -> Tensor:  # X B: each block's rows
        out = torch.empty((n, B.shape[1]), dtype=wide, device=like.device)
        for t in passes():
            out[t.start : t.stop] = t.XHt(B.mT.to(t.dtype)).to(wide)
        return out

    def t_times(A: Tensor) -> Tensor:  # X^T A: summed over the blocks
        total = torch.zeros((m, A.shape[1]), dtype=wide, device=like.device)
        for t in passes():
            total += t.WtX(A[t.start : t.stop].to(t.dtype)).mT.to(wide)
        return total

    exact = None
    if not sparse and exact_svd(n, m, rank) and m <= n:  # (a wide X in few rows: randomized)
        gram = torch.zeros((m, m), dtype=torch.float64, device=like.device)
        for t in passes():  # X^T X, a block's rows at a time
            rows = t.WtX(torch.eye(t.stop - t.start, dtype=t.dtype, device=like.device)).double()
            gram += rows.mT @ rows
        values, vectors = torch.linalg.eigh(gram)  # ascending
        S = values.flip(0)[:rank].clamp_min(0).sqrt()
        V = vectors.flip(1)[:, :rank]
        U = times(V.to(wide)).double() / S.clamp_min(torch.finfo(torch.float64).tiny)
        exact = (U.to(wide), S.to(wide), V.to(wide))
    pairs = []
    for r in range(restarts):
        generator = _seeded(seed + r)
        U, S, V = exact or randomized_svd(times, t_times, shape, rank, generator, wide, like.device)
        pairs.append(_nndsvd_of(U, S, V, rank, variant, generator=generator, mean=mean, eps=1e-6))
    return stack_restarts(pairs, like=like)
