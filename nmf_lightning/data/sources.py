"""Built-in matrices, each returned as a :class:`Matrix`.

The notebooks' toy and known-factor matrices, a planted low-rank generator, a synthetic
power spectrogram (for the Itakura-Saito loss) and scikit-learn's digits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from nmf_lightning.validation import NMFInputError, require_memory


@dataclass
class Matrix:
    """A data matrix X (n, m) with NaN for missing entries, plus what helps read its factors.

    ``unstored_missing`` marks a sparse X whose unstored entries are missing (ratings),
    not zeros; only the stored entries are then fitted. ``col_names`` names the columns
    (e.g. the vocabulary of a TF-IDF matrix) so each row of H can be read as a topic;
    ``image_shape`` says how a row of H folds into an image (digits: 8 x 8);
    ``W_true``/``H_true`` hold planted factors when known.
    """

    X: np.ndarray | sp.csr_matrix
    name: str = "matrix"
    col_names: list[str] | None = None
    image_shape: tuple[int, int] | None = None
    unstored_missing: bool = False
    W_true: np.ndarray | None = None
    H_true: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """(n, m) of X."""
        return tuple(self.X.shape)


def toy() -> Matrix:
    """The masked notebook's 4 x 3 ratings matrix with its entry (0, 0) missing."""
    A = np.array([[3, 4, 5, 2], [4, 4, 3, 3], [5, 5, 4, 3]], dtype=np.float64).T
    A[0, 0] = np.nan
    return Matrix(A, name="toy")


def known_factors() -> Matrix:
    """The ALS notebook's 12 x 10 matrix: three known columns times random 0/1 weights."""
    factors = np.array(
        [
            [0, 0, 9, 5, 3, 2, 1, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 3, 2, 1, 1, 0, 0, 0],
            [0, 5, 5, 6, 6, 7, 4, 2, 1, 0.5, 0, 0],
        ],
        dtype=np.float64,
    ).T  # (12, 3)
    weights = np.random.RandomState(1).randint(0, 2, size=(3, 10)).astype(np.float64)
    return Matrix(factors @ weights, name="known_factors", W_true=factors, H_true=weights)


def synthetic(
    n_rows: int = 500,
    n_cols: int = 400,
    true_rank: int = 20,
    noise: float = 0.0,
    seed: int = 0,
) -> Matrix:
    """A random non-negative rank-``true_rank`` matrix ``W0 H0`` plus optional noise.

    W0, H0 are uniform on [0, 1); ``noise`` is the standard deviation of additive
    Gaussian noise relative to the standard deviation of ``W0 H0``; the sum is clipped
    at 0 so X stays non-negative.
    """
    for key, value in (("n_rows", n_rows), ("n_cols", n_cols), ("true_rank", true_rank)):
        if value < 1:
            raise NMFInputError(f"data.{key} must be >= 1, got {value}.")
    if noise < 0:
        raise NMFInputError(f"data.noise must be >= 0, got {noise}.")
    require_memory(
        (3 if noise > 0 else 1) * 8 * n_rows * n_cols,  # float64 X (and the noise while it is added)
        f"data=synthetic at {n_rows} x {n_cols} needs {{need}} GiB to generate",
        "lower data.n_rows or data.n_cols.",
    )
    rng = np.random.default_rng(seed)
    W0 = rng.random((n_rows, true_rank))
    H0 = rng.random((true_rank, n_cols))
    X = W0 @ H0
    if noise > 0:
        X = np.clip(X + noise * X.std() * rng.standard_normal(X.shape), 0, None)
    return Matrix(X, name="synthetic", W_true=W0, H_true=H0, info={"noise": noise})


def spectrogram(
    n_frames: int = 300,
    n_bins: int = 256,
    notes: int = 4,
    harmonics: int = 8,
    noise_shape: float = 2.0,
    seed: int = 0,
) -> Matrix:
    """A power spectrogram of ``notes`` harmonic notes (rows: time frames, columns: frequency bins).

    Each note is a spectrum of ``harmonics`` peaks at multiples of its fundamental, of
    amplitude 1/h, played in random bursts that decay; the power W0 H0 is multiplied by
    Gamma noise of mean 1 and shape ``noise_shape`` (1 = the exponential spread of a
    periodogram, the noise the Itakura-Saito divergence is the likelihood of), clipped
    at 0.01, and floored at 1e-6: every entry is > 0, as the IS loss needs (and above
    scikit-learn's EPSILON, so its divergence values agree). H0's rows are the notes' spectra.
    """
    for key, value in (("n_frames", n_frames), ("n_bins", n_bins), ("notes", notes), ("harmonics", harmonics)):
        if value < 1:
            raise NMFInputError(f"data.{key} must be >= 1, got {value}.")
    if noise_shape <= 0:
        raise NMFInputError(f"data.noise_shape must be > 0, got {noise_shape}.")
    rng = np.random.default_rng(seed)
    bins = np.arange(n_bins)
    top = n_bins / (harmonics + 1)  # fundamentals leave room for all harmonics
    fundamentals = np.sort(rng.uniform(0.15 * top, top, size=notes))
    H0 = np.full((notes, n_bins), 1e-3)  # a floor: every bin has some power
    for i, f0 in enumerate(fundamentals):
        for h in range(1, harmonics + 1):
            H0[i] += np.exp(-0.5 * (bins - h * f0) ** 2) / h
    W0 = np.zeros((n_frames, notes))
    frames = np.arange(n_frames)
    for i in range(notes):
        for onset in rng.choice(n_frames, size=max(1, n_frames // 40), replace=False):
            decay = np.exp(-(frames - onset) / rng.uniform(5, 20))
            W0[:, i] += np.where(frames >= onset, rng.uniform(0.5, 2.0) * decay, 0.0)
    W0 += 1e-2
    noise = rng.gamma(noise_shape, 1.0 / noise_shape, size=(n_frames, n_bins)).clip(1e-2)
    info = {"noise_shape": noise_shape, "fundamentals": fundamentals.round(2).tolist()}
    X = np.maximum((W0 @ H0) * noise, 1e-6)
    return Matrix(X, name="spectrogram", W_true=W0, H_true=H0, info=info)


def digits() -> Matrix:
    """scikit-learn's bundled 8 x 8 digits, 1797 images as rows of 64 pixels (no download)."""
    from sklearn.datasets import load_digits

    return Matrix(load_digits().data.astype(np.float64), name="digits", image_shape=(8, 8))
