"""Biases of a ratings model: X_ij ~ mu + b_i + c_j + (W H)_ij at the observed entries.

A rating says as much about its user (a generous rater) and its item (a film most people
like) as about how the two match. The global mean mu, the row biases b and the column biases
c carry the first two, unconstrained; W, H >= 0 carry the match (Koren, Bell & Volinsky,
"Matrix factorization techniques for recommender systems", IEEE Computer 2009; Surprise's
``SVD`` and ``NMF(biased=True)``).

Whatever the solver, the biases take an exact step in every update, in the order rows of
X are read: for each block of rows, its biases b (row-local, as W's rows are) for the
current W and H, then the solver's step on those rows of W with the ratings less the
biases; once every block (and rank) is summed, H's step, then mu and c for the W and H
the update ended with. Each
minimises ``1/2 ||M * (X - mu - b - c - W H)||^2 + l2/2 (||b||^2 + ||c||^2)`` with the others
fixed: ``b_i = sum_j r_ij / (n_i + l2)``, r the residual without b_i, n_i row i's observed
entries; c_j the same down column j; mu, not penalised, the mean residual. The column
step needs only sums over row blocks, read for the new H without another pass over X:
``sum_i r_ij = sum_i x'_ij - (W^T M)_j . h_j``, x' the ratings less the biases.

Shapes: mu (1, 1), b (n, 1) (this process's rows under DDP), c (1, m): they broadcast
against W H (n, m), as W's rows and H's columns do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from nmf_lightning.engine.blocks import Block, ObservedBlock
from nmf_lightning.linalg import predict_observed, rows_at, scatter_rows


@dataclass
class Biases:
    """mu, the row biases b and the column biases c, with the counts their steps divide by.

    ``n_rows`` (n, 1) and ``n_cols`` (1, m) are each row's and column's number of observed
    entries (the columns' of every rank); ``l2`` shrinks a bias towards 0: a row with n
    ratings keeps n / (n + l2) of its mean residual.
    """

    mu: Tensor
    b: Tensor
    c: Tensor
    n_rows: Tensor | None = None
    n_cols: Tensor | None = None
    l2: float = 0.0

    @classmethod
    def start(cls, mean: float, counts: tuple[Tensor, Tensor], l2: float, like: Tensor) -> Biases:
        """The start: mu the mean observed entry, b = c = 0; ``counts`` (rows (n, 1), columns (1, m)) as X has them."""
        rows, cols = counts
        options = {"dtype": like.dtype, "device": like.device}
        return cls(
            mu=torch.full((1, 1), float(mean), **options),
            b=torch.zeros(rows.shape, **options),
            c=torch.zeros(cols.shape, **options),
            n_rows=rows.to(**options),
            n_cols=cols.to(**options),
            l2=float(l2),
        )

    @classmethod
    def of(cls, mu: float, b: np.ndarray | Tensor, c: np.ndarray | Tensor, like: Tensor) -> Biases:
        """Fitted biases (mu a number, b (n,), c (m,)) to predict with, like ``like``."""
        options = {"dtype": like.dtype, "device": like.device}
        as_tensor = lambda A: torch.as_tensor(np.asarray(A)).to(**options)  # noqa: E731
        return cls(as_tensor(mu).reshape(1, 1), as_tensor(b).reshape(-1, 1), as_tensor(c).reshape(1, -1))

    def at(self, rows: Tensor, cols: Tensor) -> Tensor:
        """``mu + b_i + c_j`` at the entries (rows[i], cols[i]), (len,); rows are this process's."""
        return self.mu[0, 0] + self.b[rows, 0] + self.c[0, cols]

    def shift(self, t: Block) -> ObservedBlock:
        """The block's observed entries less the biases: what W H fits (as triplets, whatever X's layout)."""
        t = t.observed()
        return t.shifted(self.at(t.rows + t.start, t.cols))

    @torch.no_grad()
    def fit_rows(self, t: ObservedBlock, W: Tensor, H: Tensor) -> ObservedBlock:
        """The exact step of the block's row biases for its rows of W (b, k) and H; the block shifted by the new b.

        ``t`` holds the entries less the biases as they were (:meth:`shift`).
        """
        rows = slice(t.start, t.stop)
        residual = t.vals - predict_observed(t.rows, t.cols, W, H)  # without W H and the biases, as they are
        sums = scatter_rows(t.rows, t.shape[0], residual[:, None])  # (b, 1)
        old, n = self.b[rows].clone(), self.n_rows[rows]  # (a copy: b is written below)
        new = (sums + n * old) / (n + self.l2).clamp_min(torch.finfo(old.dtype).tiny)  # a row without entries: 0
        self.b[rows] = new
        return t.shifted((new - old)[t.rows, 0])

    @torch.no_grad()
    def col_stats(self, t: ObservedBlock, W: Tensor) -> dict[str, Tensor]:
        """This block's part of the sums mu and c read, for its rows of W (b, k): per column, x' and W's rows summed.

        ``t`` holds the entries less the biases (b's new values); summed over blocks and ranks like H's statistics.
        """
        m = t.shape[1]
        x = t.vals.new_zeros(1, m).index_add_(-1, t.cols, t.vals[None, :])  # (1, m)
        return {"bias_x": x, "bias_W": scatter_rows(t.cols, m, rows_at(W, t.rows)).mT}  # (k, m): (W^T M)

    @torch.no_grad()
    def fit_cols(self, stats: dict[str, Tensor], H: Tensor) -> None:
        """The exact steps of mu, then c, for the factors a pass ended with (:meth:`col_stats` summed over the pass)."""
        residual = stats["bias_x"] - (stats["bias_W"] * H).sum(-2, keepdim=True)  # (1, m): each column's, r
        n = self.n_cols
        step = residual.sum() / n.sum().clamp_min(1)  # mu: the mean residual
        self.mu += step
        residual -= n * step
        self.c.copy_((residual + n * self.c) / (n + self.l2).clamp_min(torch.finfo(n.dtype).tiny))


def predict(
    rows: Tensor,
    cols: Tensor,
    W: Tensor,
    H: Tensor,
    biases: Biases | None = None,
    clip: tuple[float, float] | None = None,
) -> Tensor:
    """The model's values at entries (rows[i], cols[i]): (W H)_ij, plus mu + b_i + c_j when biased, within ``clip``.

    ``clip`` is ``data.rating_range``: a prediction outside the rating scale is moved to its
    nearest end (a 5.6 for a 1-5 scale is a 5), as recommender libraries do.
    """
    values = predict_observed(rows, cols, W, H)
    if biases is not None:
        values = values + biases.at(rows, cols).to(values.dtype)
    return values if clip is None else values.clamp(float(clip[0]), float(clip[1]))
