"""A CPU reference for consensus NMF as cNMF (Kotliar et al. 2019, PyPI ``cnmf``, github dylkot/cNMF) runs it.

Reproduced from the source of ``cnmf`` 1.7.1 (``cnmf/cnmf.py`` in the wheel that ``pip download cnmf --no-deps``
fetched), with the file I/O, pandas and scanpy stripped off, so that our own consensus implementation can be timed
against it on the same machine. What cNMF does, and what this module keeps:

* ``cNMF.prepare`` -> ``get_norm_counts``: keeps the 2000 most over-dispersed genes (Fano ratio against a fitted
  mean-Fano line, on TPM), then scales each kept gene of the *raw counts* to unit variance without centring
  (``sc.pp.scale(zero_center=False)`` on sparse input, i.e. divide by the ddof=1 standard deviation; ``std(ddof=1)``
  on dense input). Here the matrix is taken as given; :func:`scale_genes` reproduces the scaling step alone if
  wanted. The gene selection is not reproduced.
* ``cNMF.get_nmf_iter_params``: ``np.random.seed(seed)`` then ``np.random.randint(1, 2**31 - 1, size=n_runs)`` gives
  one seed per restart; the scikit-learn arguments are the ``NMF_KWARGS`` below. ``prepare``'s default ``beta_loss``
  is ``'frobenius'``, for which cNMF switches the solver from ``'mu'`` to ``'cd'``.
* ``cNMF.factorize``: one ``non_negative_factorization(X, random_state=seed_r, n_components=k, **NMF_KWARGS)`` per
  restart, one after another (parallelism in cNMF is only over separate worker processes), keeping the spectra H.
* ``cNMF.combine_nmf``: stacks the spectra of the restarts in restart order -> (restarts * k, genes).
* ``cNMF.consensus``: L2-normalise each spectrum; full Euclidean distance matrix; local density = sum of the
  ``n_neighbors + 1`` smallest distances of each row (``np.argpartition``; it includes the spectrum itself at
  distance 0) divided by ``n_neighbors = int(local_neighborhood_size * n_spectra / k)``; keep spectra with density
  strictly ``< density_threshold``; ``KMeans(n_clusters=k, n_init=10, random_state=1)`` on the kept L2-normalised
  spectra; per cluster the gene-wise median of those spectra, normalised to sum 1; usages refit with those spectra
  fixed through ``refit_usage``: the same ``NMF_KWARGS`` plus ``H=spectra, update_H=False, n_components=k`` and *no*
  ``random_state`` (it is not in the saved kwargs; with ``'cd'`` and ``update_H=False`` W starts at zeros, so it
  does not matter).

Deliberate differences, all outside the timed algorithm's core:

* cNMF computes the silhouette (``silhouette_score(l2_spectra, labels, metric='euclidean')``) and the prediction
  error (the *sum of squared* residuals of ``X - W H``) only in ``k_selection_plot``, which calls ``consensus`` with
  ``skip_density_and_return_after_stats=True``, i.e. with *no* density filter. Here both come from the one filtered
  clustering that produced H: ``silhouette`` is of the kept spectra, ``relative_error`` is ``||X - W H||_F /
  ||X||_F`` and ``prediction_error`` is cNMF's sum of squares.
* After the refit, cNMF's ``consensus`` re-orders programs by total usage, refits spectra against TPM for all
  genes, computes OLS z-score spectra, and (``refit_usage=True``) refits usages once more on the variance-scaled
  TPM of the over-dispersed genes. Those TPM-space steps need the raw data, and are left out: ``W`` here is the
  first refit, against X, as used for cNMF's prediction error.

    python scripts/cnmf_reference.py
"""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.decomposition import non_negative_factorization
from sklearn.metrics import silhouette_score
from sklearn.metrics.pairwise import euclidean_distances

# cnmf/cnmf.py, cNMF.get_nmf_iter_params(): the `_nmf_kwargs` dict, with cNMF.prepare()'s defaults
# (beta_loss='frobenius', alpha_usage=0.0, alpha_spectra=0.0, init='random', max_NMF_iter=1000) filled in, and
# solver switched from 'mu' to 'cd' because beta_loss == 'frobenius'.
NMF_KWARGS: dict = dict(
    alpha_W=0.0,
    alpha_H=0.0,
    l1_ratio=0.0,
    beta_loss="frobenius",
    solver="cd",
    tol=1e-4,
    max_iter=1000,
    init="random",
)
# cnmf/cnmf.py, cNMF.get_nmf_iter_params(): np.random.randint(low=1, high=(2**31)-1, size=n_runs)
SEED_LOW, SEED_HIGH = 1, 2**31 - 1
# cnmf/cnmf.py, cNMF.consensus(): density_threshold=0.5, local_neighborhood_size=0.30 (also the CLI defaults of
# --local-density-threshold and --local-neighborhood-size in main())
DENSITY_THRESHOLD = 0.5
LOCAL_NEIGHBORHOOD_SIZE = 0.30
# cnmf/cnmf.py, cNMF.consensus(): KMeans(n_clusters=k, n_init=10, random_state=1)
KMEANS_N_INIT = 10
KMEANS_RANDOM_STATE = 1


def scale_genes(X):
    """Each column divided by its ddof=1 standard deviation (1 where it is 0), not centred.

    cnmf/cnmf.py, cNMF.get_norm_counts(): ``sc.pp.scale(norm_counts, zero_center=False)`` for sparse input
    (scanpy's variance is the unbiased one), ``X /= X.std(axis=0, ddof=1)`` for dense input.
    """
    n = X.shape[0]
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float64, copy=True)
        mean = np.asarray(X.mean(axis=0)).ravel()
        var = np.asarray(X.multiply(X).mean(axis=0)).ravel() - mean**2
    else:
        X = np.array(X, dtype=np.float64, copy=True)
        var = X.var(axis=0)
    std = np.sqrt(np.maximum(var, 0.0) * n / (n - 1))
    std[std == 0] = 1.0
    if sp.issparse(X):
        return sp.csr_matrix(X.multiply(1.0 / std[None, :]))
    return X / std


def nmf_seeds(restarts: int, seed: int | None = 0) -> np.ndarray:
    """The per-restart seeds cNMF draws for one k (cNMF.get_nmf_iter_params with a single k)."""
    # np.random.seed(seed); np.random.randint(...) draws from the same legacy stream as RandomState(seed).randint
    return np.random.RandomState(seed).randint(low=SEED_LOW, high=SEED_HIGH, size=restarts)


def factorize(X, k: int, restarts: int, seed: int | None = 0) -> np.ndarray:
    """Run scikit-learn NMF ``restarts`` times as cNMF.factorize does; returns the stacked spectra (restarts*k, m)."""
    spectra = []
    for s in nmf_seeds(restarts, seed):
        _, H, _ = non_negative_factorization(X, n_components=k, random_state=s, **NMF_KWARGS)
        spectra.append(H)
    return np.concatenate(spectra, axis=0)


def refit_usage(X, spectra: np.ndarray) -> np.ndarray:
    """Usages for fixed spectra, as cNMF.refit_usage: the factorize kwargs with H fixed (no random_state)."""
    W, _, _ = non_negative_factorization(
        X, n_components=spectra.shape[0], H=np.asarray(spectra, dtype=X.dtype), update_H=False, **NMF_KWARGS
    )
    return W


def _frobenius_sq_residual(X, W: np.ndarray, H: np.ndarray) -> tuple[float, float]:
    """(||X - W H||_F^2, ||X||_F^2) without densifying a sparse X."""
    if sp.issparse(X):
        x2 = float(X.multiply(X).sum())
        cross = float(np.sum(np.asarray(X @ H.T) * W))
    else:
        x2 = float(np.sum(X * X))
        cross = float(np.sum((X @ H.T) * W))
    wh2 = float(np.sum((W.T @ W) * (H @ H.T)))
    return max(x2 - 2.0 * cross + wh2, 0.0), x2


def combine(
    X,
    spectra: np.ndarray,
    k: int,
    density_threshold: float = DENSITY_THRESHOLD,
    local_neighborhood_size: float = LOCAL_NEIGHBORHOOD_SIZE,
) -> dict:
    """Consensus spectra and usages from stacked spectra, as cNMF.consensus (see the module docstring).

    Returns a dict with ``H`` (k, m) consensus spectra (rows sum to 1), ``W`` (n, k) refit usages, ``silhouette``
    of the kept spectra, ``kept`` (fraction of spectra that passed the density filter), ``relative_error``
    (||X - W H||_F / ||X||_F), ``prediction_error`` (cNMF's sum of squared residuals), ``labels`` (cluster of each
    kept spectrum), ``local_density`` (of every spectrum) and ``n_neighbors``.
    """
    spectra = np.asarray(spectra, dtype=np.float64)
    n_spectra = spectra.shape[0]
    n_neighbors = int(local_neighborhood_size * n_spectra / k)
    if n_neighbors < 1:
        # cNMF would divide by zero here and then filter every spectrum out
        raise ValueError(f"n_neighbors = int({local_neighborhood_size} * {n_spectra} / {k}) = 0; use more restarts")

    l2_spectra = spectra / np.sqrt((spectra**2).sum(axis=1))[:, None]

    topics_dist = euclidean_distances(l2_spectra)
    partitioning_order = np.argpartition(topics_dist, n_neighbors + 1)[:, : n_neighbors + 1]
    distance_to_nearest_neighbors = topics_dist[np.arange(n_spectra)[:, None], partitioning_order]
    local_density = distance_to_nearest_neighbors.sum(1) / n_neighbors

    density_filter = local_density < density_threshold
    l2_kept = l2_spectra[density_filter]
    if l2_kept.shape[0] == 0:
        raise RuntimeError("Zero components remain after density filtering. Consider increasing density threshold")

    kmeans_model = KMeans(n_clusters=k, n_init=KMEANS_N_INIT, random_state=KMEANS_RANDOM_STATE)
    kmeans_model.fit(l2_kept)
    labels = kmeans_model.labels_

    # pandas groupby(labels).median(): clusters in label order
    median_spectra = np.stack([np.median(l2_kept[labels == c], axis=0) for c in range(k)])
    median_spectra = median_spectra / median_spectra.sum(axis=1)[:, None]

    W = refit_usage(X, median_spectra)

    silhouette = float(silhouette_score(l2_kept, labels, metric="euclidean"))
    sse, x2 = _frobenius_sq_residual(X, W, median_spectra)
    return {
        "H": median_spectra,
        "W": W,
        "silhouette": silhouette,
        "kept": float(density_filter.mean()),
        "relative_error": float(np.sqrt(sse / x2)),
        "prediction_error": sse,
        "labels": labels,
        "local_density": local_density,
        "n_neighbors": n_neighbors,
    }


def counts(n_cells: int = 3000, n_genes: int = 2000, k: int = 10, seed: int = 0):
    """A single-cell-like sparse count matrix with k planted gene programs.

    H_true (k, n_genes): each program is active on a random ~15% of genes with gamma(0.5) weights, plus a weak
    gamma(0.5) background shared by all programs at 2% of its mass; rows sum to 1. W_true (n_cells, k): each cell
    draws a dominant program and Dirichlet usages with concentration 3 on it and 0.2 elsewhere; rows sum to 1.
    Library sizes are log-normal with median 0.25 * n_genes. X = Poisson(lib * W_true @ H_true), CSR float64; cells
    that came out empty get one count on their most expected gene. About 11-13% non-zeros for 1000x500 and 3000x2000.

    Returns:
        (X, W_true, H_true).
    """
    rng = np.random.default_rng(seed)
    background = rng.gamma(0.5, 1.0, size=n_genes)
    background /= background.sum()
    H = np.zeros((k, n_genes))
    n_active = max(1, int(round(0.15 * n_genes)))
    for j in range(k):
        genes = rng.choice(n_genes, size=n_active, replace=False)
        H[j, genes] = rng.gamma(0.5, 1.0, size=n_active)
        H[j] /= H[j].sum()
    H = 0.98 * H + 0.02 * background[None, :]
    H /= H.sum(axis=1, keepdims=True)

    dominant = rng.integers(k, size=n_cells)
    W = np.empty((n_cells, k))
    for i in range(n_cells):
        alpha = np.full(k, 0.2)
        alpha[dominant[i]] = 3.0
        W[i] = rng.dirichlet(alpha)

    lib = rng.lognormal(mean=np.log(0.25 * n_genes), sigma=0.5, size=n_cells)
    rate = lib[:, None] * (W @ H)
    Y = rng.poisson(rate).astype(np.float64)
    empty = Y.sum(axis=1) == 0
    if empty.any():
        Y[np.flatnonzero(empty), rate[empty].argmax(axis=1)] = 1.0
    return sp.csr_matrix(Y), W, H


def match_programs(H_true: np.ndarray, H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian matching of planted to found programs by cosine similarity: (column of H for each row, cosine)."""
    A = H_true / np.linalg.norm(H_true, axis=1, keepdims=True)
    B = H / np.linalg.norm(H, axis=1, keepdims=True)
    cos = A @ B.T
    rows, cols = linear_sum_assignment(-cos)
    order = np.argsort(rows)
    return cols[order], cos[rows[order], cols[order]]


def main() -> None:
    k, restarts = 5, 10
    X, W_true, H_true = counts(n_cells=1000, n_genes=500, k=k, seed=0)
    print(f"X: {X.shape[0]} x {X.shape[1]}, {X.nnz / np.prod(X.shape):.1%} non-zero, k={k}, restarts={restarts}")

    t0 = time.perf_counter()
    spectra = factorize(X, k, restarts, seed=0)
    t1 = time.perf_counter()
    result = combine(X, spectra, k)
    t2 = time.perf_counter()

    print(f"factorize: {t1 - t0:.2f} s  ({restarts} x scikit-learn NMF, solver=cd, init=random, tol=1e-4)")
    print(f"combine:   {t2 - t1:.2f} s  (n_neighbors={result['n_neighbors']})")
    print(
        f"silhouette {result['silhouette']:.4f}  kept {result['kept']:.2f}  relative_error {result['relative_error']:.4f}"
    )
    cols, cos = match_programs(H_true, result["H"])
    print(
        "planted -> consensus (cosine): "
        + ", ".join(f"{j}->{c} ({s:.3f})" for j, (c, s) in enumerate(zip(cols, cos, strict=True)))
    )

    # k above the planted 5: restarts disagree, so the density filter and the silhouette have something to do
    t0 = time.perf_counter()
    over = combine(X, factorize(X, k + 3, restarts, seed=0), k + 3)
    print(
        f"k={k + 3} (over-specified): {time.perf_counter() - t0:.2f} s  silhouette {over['silhouette']:.4f}  "
        f"kept {over['kept']:.2f}  relative_error {over['relative_error']:.4f}"
    )

    # sanity: the planted factorisation's own error, and the checks this reference must pass
    Wt = W_true * np.asarray(X.sum(axis=1)).ravel()[:, None]
    sse_true, x2 = _frobenius_sq_residual(X, Wt, H_true)
    print(f"planted W H relative error (Poisson noise floor): {np.sqrt(sse_true / x2):.4f}")
    assert spectra.shape == (restarts * k, X.shape[1])
    assert result["H"].shape == (k, X.shape[1]) and result["W"].shape == (X.shape[0], k)
    assert np.allclose(result["H"].sum(axis=1), 1.0)
    assert cos.min() > 0.9, cos


if __name__ == "__main__":
    main()
