"""Randomized (block) Kaczmarz row-action updates with projection, as in the ALS notebook.

To fit H in X ~ W H, one Kaczmarz step picks rows i of W with probability proportional
to ||W_i||^2 and moves every column of H towards the hyperplanes W_i h = X_i:
``H += W_B^T ((X_B - W_B H) / ||W_B||^2) / |B|``, then clips at 0. A block of rows runs
as one matrix product, so a GPU does many rows at once; ``steps`` such steps make one
update of H, and the same on the transposed problem updates W.
Ref: Strohmer & Vershynin, "A randomized Kaczmarz algorithm with exponential
convergence", J. Fourier Anal. Appl. 2009.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from nmf_lightning.engine.blocks import Block


def update_h(t: Block, W: Tensor, H: Tensor, generator: torch.Generator, steps: int = 10, block: int = 32) -> Tensor:
    """``steps`` projected block-Kaczmarz steps on H; W (n, k), H (k, m), X dense or sparse."""
    row_sq = (W * W).sum(-1)  # (..., n)
    n = W.shape[-2]
    b = min(block, n)
    H = H.clone()
    for _ in range(steps):
        p = row_sq if row_sq.dim() == 1 else row_sq.sum(0)
        idx = torch.multinomial(p.clamp_min(torch.finfo(p.dtype).tiny), b, replacement=True, generator=generator)
        WB = W[..., idx, :]  # (..., b, k)
        XB = t.dense_rows(idx)  # (b, m)
        norms = row_sq[..., idx, None]
        # a row that is zero in this restart (drawn for another) carries no step
        R = torch.where(norms > 0, (XB - WB @ H) / norms.clamp_min(torch.finfo(W.dtype).tiny), 0)  # (..., b, m)
        H = (H + WB.mT @ R / b).clamp_min(0)
    return H


def update_w(t: Block, W: Tensor, H: Tensor, generator: torch.Generator, steps: int = 10, block: int = 32) -> Tensor:
    """The same on X^T ~ H^T W^T."""
    return update_h(t.transposed(), H.mT, W.mT, generator, steps, block).mT
