"""Reconstruction terms and penalties of the NMF objective, as pure functions of tensors.

Shapes: W (..., n, k), H (..., k, m); a leading batch dimension (r restarts) gives one
value per restart. The data term (a squared error or a beta-divergence) comes from the
engine's row blocks, which compute it in whichever form suits X's layout
(:mod:`nmf_lightning.linalg`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from nmf_lightning.validation import NMFInputError

if TYPE_CHECKING:
    from nmf_lightning.distributed import RowShard

#: the Frobenius family (read a squared error), then the beta-divergences (read D_beta itself)
LOSSES = ("fro", "fro2", "rmse", "kl", "is", "beta")
BETA_LOSSES = ("kl", "is", "beta")


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
    raise NMFInputError(f"model.loss={loss!r} is not a known loss; choose one of {LOSSES}.")


def _safe_sqrt(x: Tensor) -> Tensor:
    # sqrt has an infinite derivative at 0 (an exact fit); keep the gradient finite.
    return torch.sqrt(x.clamp_min(torch.finfo(x.dtype).tiny))


def negativity_penalty(W: Tensor, H: Tensor) -> Tensor:
    """``mean(clamp(-W, 0)) + mean(clamp(-H, 0))``: the notebooks' soft non-negativity term."""
    return torch.clamp(-W, min=0).mean(dim=(-2, -1)) + torch.clamp(-H, min=0).mean(dim=(-2, -1))


def l1(A: Tensor) -> Tensor:
    """Entry-wise L1 norm ``sum |A|``, which pushes entries of A to exactly zero."""
    return A.abs().sum(dim=(-2, -1))


def l2(A: Tensor, weight: float | Tensor = 1.0) -> Tensor:
    """Half the squared Frobenius norm ``1/2 ||A||_F^2`` (ridge), scikit-learn's L2 term.

    ``weight`` (broadcast against A) weighs each row of W or column of H: its number of
    observed entries under ``model.l2_scale=count``, as ALS-WR does.
    """
    return 0.5 * (A * A * weight).sum(dim=(-2, -1))


def l21(H: Tensor) -> Tensor:
    """L2,1 norm of H as in the masked notebook: mean over columns of each column's L2 norm.

    Penalising it switches whole columns of H off, i.e. it sparsifies the loadings.
    """
    return torch.linalg.vector_norm(H, dim=-2).mean(dim=-1)


def relative_error(sq: Tensor, X_sq: Tensor) -> Tensor:
    """``||X - WH||_F / ||X||_F`` over observed entries (the ALS notebook's headline metric)."""
    return torch.sqrt(sq.clamp_min(0) / X_sq)


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

    ``l2_counts`` weighs the L2 terms by each row's (n, 1) and column's (1, m) number of
    observed entries (``model.l2_scale=count``; numbers when every entry is observed).
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
    l2_counts: tuple[float | Tensor, float | Tensor] = field(default=(1.0, 1.0), compare=False)

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
            ("l2_W", self.l2_W, lambda: whole(l2(W, self.l2_counts[0]))),
            ("l2_H", self.l2_H, lambda: l2(H, self.l2_counts[1])),
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


def negative_mass(A: Tensor, whole: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """``sum clamp(-A, 0) / sum |A|``: the share of A's mass that clamping at 0 takes away (one per restart).

    Unlike the share of negative *entries*, it is 0 only for A >= 0 and small when the
    negatives are few or tiny, whatever their number: what a clamp penalty must drive to 0.
    ``whole`` completes a sum over this rank's rows of a row-sharded factor.
    """
    both = (-2, -1)
    sums = torch.stack(
        [torch.clamp(-A, min=0).sum(dim=both, dtype=torch.float64), A.abs().sum(dim=both, dtype=torch.float64)]
    )
    if whole is not None:
        sums = whole(sums)
    return sums[0] / sums[1].clamp_min(torch.finfo(torch.float64).tiny)


def factor_stats(A: Tensor, reported: Tensor, shard: RowShard | None = None) -> dict[str, Tensor]:
    """A's negative entries (their share, mean size and share of its mass) and the sparsity of the factor a user gets.

    One value per restart. ``shard``: A holds this rank's rows of a row-sharded factor; the
    statistics are the whole factor's.
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
    stats = {name: (value / size).float() for name, value in counts.items()}
    stats["neg_mass"] = negative_mass(A, None if shard is None else shard.sum_rows).float()
    return stats
