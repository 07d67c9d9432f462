"""Pictures of the factors: heatmaps, components as images, topics as top words.

Pure functions from factor tensors to RGB arrays (H, W, 3) or Markdown; the
:class:`~nmf_lightning.callbacks.FactorPictures` callback sends them to TensorBoard.
Large factors are reduced on their own device first (block maxima), so a picture of a
factor with millions of rows moves only a few hundred kilobytes to the host.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch.nn.functional as F
from torch import Tensor


def reduce_to(A: Tensor, max_side: int = 512) -> np.ndarray:
    """A 2-D factor shrunk to at most ``max_side`` per side by block maxima of |A|, as float32 numpy."""
    A = A.detach().float().abs()
    rows, cols = A.shape
    target = (min(rows, max_side), min(cols, max_side))
    if target != (rows, cols):
        A = F.adaptive_max_pool2d(A[None, None], target)[0, 0]
    return A.cpu().numpy()


def colorize(A: np.ndarray, cmap: str = "viridis") -> np.ndarray:
    """Values scaled by their maximum to [0, 1], through a matplotlib colormap, as uint8 RGB."""
    import matplotlib

    top = float(np.max(A)) if A.size else 0.0
    scaled = A / top if top > 0 else np.zeros_like(A)
    return (matplotlib.colormaps[cmap](scaled)[..., :3] * 255).astype(np.uint8)


#: a heatmap's sides are stretched to at least this many pixels (a rank-8 W is 8 columns wide)
MIN_SIDE = 256
#: the colour bar's width, and the margin for its numbers and the title, in pixels
BAR, MARGIN, TITLE = 16, 64, 20


def heatmap(A: Tensor, max_side: int = 512, title: str = "") -> np.ndarray:
    """RGB heatmap of |A| with a colour bar from 0 to its largest value, numbers beside it.

    Thin factors are stretched so every row or column shows (a rank-8 W is 8 wide
    columns); a factor larger than ``max_side`` a side is first reduced by block maxima,
    so a spike still shows. Drawn with numpy and Pillow in a few milliseconds: a figure
    library takes about 0.1 s a picture, which a short run would feel.
    """
    from PIL import Image, ImageDraw, ImageFont

    reduced = reduce_to(A, max_side)
    rows, cols = reduced.shape
    stretched = np.repeat(np.repeat(reduced, max(1, MIN_SIDE // rows), axis=0), max(1, MIN_SIDE // cols), axis=1)
    top = float(stretched.max()) if stretched.size else 0.0
    picture = colorize(stretched)
    h, w = picture.shape[:2]
    canvas = np.full((h + TITLE, w + BAR + MARGIN + 8, 3), 255, dtype=np.uint8)
    canvas[TITLE:, :w] = picture
    canvas[TITLE:, w + 8 : w + 8 + BAR] = colorize(np.repeat(np.linspace(1.0, 0.0, h)[:, None], BAR, axis=1))
    image = Image.fromarray(canvas)
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    label = f"{title} |values|, {A.shape[0]} x {A.shape[1]}" + (" (block maxima)" if (rows, cols) != A.shape else "")
    draw.text((2, 3), label, fill=(0, 0, 0), font=font)
    x = w + BAR + 12
    for value, y in ((top, TITLE), (top / 2, TITLE + h // 2 - 6), (0.0, TITLE + h - 12)):
        draw.text((x, y), f"{value:.3g}", fill=(0, 0, 0), font=font)
    return np.asarray(image)


#: the component grid's longest side, in pixels: it fits TensorBoard's image card
GRID_SIDE = 400


def component_grid(H: Tensor, image_shape: Sequence[int], zoom: int | None = None, pad: int = 1) -> np.ndarray:
    """Every row of H folded into an ``image_shape`` image, tiled in a near-square grid (RGB).

    Each component is scaled by its own maximum, so faint parts show as clearly as strong
    ones: this is the parts-based picture of NMF (strokes of digits, parts of faces).
    ``zoom`` (default: up to 64 pixels a side, the grid at most ``GRID_SIDE``) enlarges
    small images such as 8 x 8 digits.
    """
    h, w = (int(s) for s in image_shape)
    comps = H.detach().float().abs().reshape(H.shape[0], h, w).cpu().numpy()
    k = comps.shape[0]
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    side = max(rows * (h + pad), cols * (w + pad)) + pad
    zoom = zoom or max(1, min(64 // max(h, w), GRID_SIDE // side))
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad), dtype=np.float32)
    for i, comp in enumerate(comps):
        top = comp.max()
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = comp / top if top > 0 else 0.0
    grid = np.kron(grid, np.ones((zoom, zoom), dtype=np.float32))
    return colorize(grid, cmap="gray_r")


def top_words(H: np.ndarray, names: Sequence[str], n: int = 10) -> list[list[str]]:
    """The ``n`` highest-weighted column names of each row of H (each topic's words)."""
    n = min(n, H.shape[1])
    order = np.argsort(-H, axis=1, kind="stable")[:, :n]
    return [[names[j] for j in row] for row in order]


def topics_markdown(H: np.ndarray, names: Sequence[str], n: int = 10) -> str:
    """A Markdown table: one row per component with its top words, by weight."""
    weight = H.sum(axis=1)
    lines = ["| component | weight | top words |", "|---|---|---|"]
    for i, words in enumerate(top_words(H, names, n)):
        lines.append(f"| {i} | {weight[i]:.3g} | {' '.join(words)} |")
    return "\n".join(lines) + "\n"
