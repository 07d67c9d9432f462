"""Consensus over restarts (cNMF's combine step): the components that come back start after start.

One restart's components can be an accident of its start. Trained as one batched
problem, R restarts give R x k components; normalised to unit length, those that keep
recurring form k tight clusters. As cNMF (Kotliar et al., eLife 2019) does:

1. drop the outliers: components whose mean distance to their nearest neighbours
   (``neighbors`` x R of them) is above ``density_threshold``;
2. cluster the rest into k groups by k-means;
3. take each group's median as a consensus component (scaled to sum 1), and report how
   well separated the groups are (the silhouette, the stability of the solution).

Every distance is formed a chunk of rows at a time: memory stays O(R k m + chunk x R k),
never (R k)^2 over the columns. Pure functions of tensors, on their device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from nmf_lightning.validation import NMFInputError

#: rows of the distance matrix formed at once
CHUNK = 2048
#: cNMF's defaults: the outlier threshold on the local density, and the neighbourhood as a share of R
DENSITY_THRESHOLD = 0.5
NEIGHBORS = 0.3
#: k-means: starts (k-means++) and Lloyd iterations per start
KMEANS_STARTS = 10
KMEANS_ITERATIONS = 300


@dataclass
class Consensus:
    """The consensus components of R restarts' and how far to trust them.

    ``H`` (k, m) rows sum to 1; ``labels`` (R k,) is each restart component's group, -1
    for an outlier dropped by density; ``stability`` the silhouette of the groups (1: every
    restart found the same components; near 0: no structure); ``kept`` the share of
    components kept; ``density`` each component's local density.
    """

    H: Tensor
    labels: Tensor
    stability: float
    kept: float
    density: Tensor


def normalized(H: Tensor) -> Tensor:
    """The R restarts' components (R, k, m) as unit-length rows (R k, m), in float32 at least."""
    P = H.detach().reshape(-1, H.shape[-1]).to(torch.promote_types(H.dtype, torch.float32))
    return P / P.norm(dim=1, keepdim=True).clamp_min(torch.finfo(P.dtype).tiny)


def _distances(P: Tensor, Q: Tensor) -> Tensor:
    """Euclidean distances between rows of P and rows of Q (both unit length or not)."""
    sq = P.pow(2).sum(1, keepdim=True) + Q.pow(2).sum(1) - 2 * P @ Q.mT
    return sq.clamp_min(0).sqrt()


def local_density(P: Tensor, n_neighbors: int, chunk: int = CHUNK) -> Tensor:
    """Each row's mean distance to its ``n_neighbors`` nearest other rows (cNMF's local density)."""
    n_neighbors = max(1, min(n_neighbors, P.shape[0] - 1))
    out = []
    for s in range(0, P.shape[0], chunk):
        D = _distances(P[s : s + chunk], P)
        nearest = D.topk(n_neighbors + 1, dim=1, largest=False).values[:, 1:]  # the first is the row itself
        out.append(nearest.mean(1))
    return torch.cat(out)


def kmeans(
    P: Tensor, k: int, seed: int = 0, starts: int = KMEANS_STARTS, iterations: int = KMEANS_ITERATIONS
) -> tuple[Tensor, Tensor]:
    """Labels (N,) and centres (k, m) of k-means on the rows of P: the best of ``starts`` k-means++ starts."""
    generator = torch.Generator(device=P.device).manual_seed(seed)
    best: tuple[float, Tensor, Tensor] | None = None
    for _ in range(starts):
        centres = _plus_plus(P, k, generator)
        for _ in range(iterations):
            labels = _distances(P, centres).argmin(1)
            moved = _centres(P, labels, k, centres)
            if torch.equal(moved, centres):
                break
            centres = moved
        labels = _distances(P, centres).argmin(1)
        inertia = float((P - centres[labels]).pow(2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, labels, centres)
    return best[1], best[2]


def _plus_plus(P: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding: each new centre drawn with probability proportional to its squared distance."""
    first = torch.randint(P.shape[0], (1,), generator=generator, device=P.device)
    centres = [P[first[0]]]
    nearest = _distances(P, P[first]).squeeze(1).pow(2)
    for _ in range(1, k):
        weights = nearest if float(nearest.sum()) > 0 else torch.ones_like(nearest)
        pick = torch.multinomial(weights, 1, generator=generator)[0]
        centres.append(P[pick])
        nearest = torch.minimum(nearest, _distances(P, P[pick : pick + 1]).squeeze(1).pow(2))
    return torch.stack(centres)


def _centres(P: Tensor, labels: Tensor, k: int, old: Tensor) -> Tensor:
    """The mean of each cluster; an empty one takes the point farthest from its centre."""
    sums = torch.zeros_like(old).index_add_(0, labels, P)
    counts = torch.bincount(labels, minlength=k).to(P.dtype)
    centres = sums / counts.clamp_min(1)[:, None]
    for j in (counts == 0).nonzero().flatten().tolist():
        far = int((P - centres[labels]).pow(2).sum(1).argmax())
        centres[j], labels[far] = P[far], j
    return centres


def silhouette(P: Tensor, labels: Tensor, k: int, chunk: int = CHUNK) -> float:
    """The mean silhouette (Euclidean) of a clustering, as scikit-learn's ``silhouette_score``, chunked.

    A point alone in its cluster scores 0.
    """
    onehot = torch.nn.functional.one_hot(labels, k).to(P.dtype)
    counts = onehot.sum(0)
    scores = []
    for s in range(0, P.shape[0], chunk):
        sums = _distances(P[s : s + chunk], P) @ onehot  # (chunk, k): summed distance to each cluster
        own = labels[s : s + chunk]
        n_own = counts[own] - 1
        a = sums.gather(1, own[:, None]).squeeze(1) / n_own.clamp_min(1)
        other = sums / counts.clamp_min(1)
        other.scatter_(1, own[:, None], math.inf)
        other[:, counts == 0] = math.inf
        b = other.min(1).values
        score = (b - a) / torch.maximum(a, b).clamp_min(torch.finfo(P.dtype).tiny)
        scores.append(torch.where(n_own > 0, score, torch.zeros_like(score)))
    return float(torch.cat(scores).double().mean())


def consensus(
    H: Tensor,
    density_threshold: float = DENSITY_THRESHOLD,
    neighbors: float = NEIGHBORS,
    seed: int = 0,
    chunk: int = CHUNK,
) -> Consensus:
    """The consensus of R restarts' components H (R, k, m): cNMF's combine step (see the module).

    ``density_threshold`` >= 2 keeps every component (unit vectors are at most 2 apart).
    Raises :class:`~nmf_lightning.validation.NMFInputError` when the threshold leaves fewer
    than k components to cluster.
    """
    R, k, _ = H.shape
    P = normalized(H)
    density = local_density(P, int(neighbors * R), chunk)
    keep = density < density_threshold
    if int(keep.sum()) < k:
        raise NMFInputError(
            f"the density threshold {density_threshold:g} keeps {int(keep.sum())} of the {R * k} components of "
            f"{R} restarts, fewer than the rank {k}: raise it (the densities run from {float(density.min()):.3g} "
            f"to {float(density.max()):.3g}) or train more restarts."
        )
    kept = P[keep]
    labels, _ = kmeans(kept, k, seed)
    medians = torch.stack([kept[labels == j].median(dim=0).values for j in range(k)])
    medians = medians / medians.sum(1, keepdim=True).clamp_min(torch.finfo(medians.dtype).tiny)
    all_labels = torch.full((R * k,), -1, dtype=torch.long, device=H.device)
    all_labels[keep] = labels
    return Consensus(
        H=medians.to(H.dtype),
        labels=all_labels,
        stability=silhouette(kept, labels, k, chunk),
        kept=float(keep.double().mean()),
        density=density,
    )


def distance_image(H: Tensor, labels: Tensor, max_points: int = 600, seed: int = 0) -> np.ndarray:
    """The clustered-distance heatmap of cNMF (RGB): the kept components' distances, ordered by group.

    At most ``max_points`` components (an even sample of each group's) are drawn.
    """
    from nmf_lightning.pictures import colorize

    P = normalized(H)
    keep = (labels >= 0).nonzero().flatten()
    if len(keep) > max_points:
        generator = torch.Generator().manual_seed(seed)
        keep = keep[torch.randperm(len(keep), generator=generator)[:max_points].to(keep.device)]
    order = keep[torch.argsort(labels[keep], stable=True)]
    D = _distances(P[order], P[order]).float().cpu().numpy()
    image = colorize(D, cmap="viridis")
    side = max(1, 256 // max(len(order), 1))
    return np.kron(image, np.ones((side, side, 1), dtype=np.uint8)) if side > 1 else image
