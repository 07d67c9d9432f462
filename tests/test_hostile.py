"""Hostile input: generated matrices of every shape, dtype and pattern of NaN, inf and negatives.

A valid matrix always gives a completed run with finite non-negative factors; an invalid
one always gives a one-line error naming the problem, before any result is written.
"""

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nmf_lightning.train import train
from nmf_lightning.validation import FLOAT32_SCALE

VALUES = st.one_of(st.floats(0, 1e4, allow_subnormal=True), st.floats(0.1, 10), st.just(0.0))
#: what is done to a clean matrix: nothing, missing entries, or one of the ways to be invalid
DAMAGE = ("none", "none", "nan", "nan", "inf", "negative", "all_nan", "all_zero", "tiny", "huge")


@st.composite
def matrices(draw):
    n, m = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    X = np.array(draw(st.lists(VALUES, min_size=n * m, max_size=n * m)), dtype=np.float64).reshape(n, m)
    damage = draw(st.sampled_from(DAMAGE))
    cell = (draw(st.integers(0, n - 1)), draw(st.integers(0, m - 1)))
    if damage == "nan":
        X[draw(st.lists(st.booleans(), min_size=n * m, max_size=n * m).map(np.array)).reshape(n, m)] = np.nan
    elif damage in ("inf", "negative"):
        X[cell] = np.inf if damage == "inf" else -draw(st.floats(1e-6, 1e3))
    elif damage in ("all_nan", "all_zero"):
        X[:] = np.nan if damage == "all_nan" else 0.0
    elif damage in ("tiny", "huge"):
        X = X * (1e-30 if damage == "tiny" else 1e30)
    X = X.astype(draw(st.sampled_from([np.float32, np.float64])))
    return X, draw(st.booleans())  # stored sparse?


def _valid(X: np.ndarray, sparse: bool) -> bool:
    observed = X[~np.isnan(X)].astype(np.float64)
    if (sparse and np.isnan(X).any()) or not observed.size or np.isinf(observed).any() or (observed < 0).any():
        return False
    rms = math.sqrt((observed**2).sum() / observed.size)
    return bool((observed > 0).any()) and FLOAT32_SCALE[0] <= rms <= FLOAT32_SCALE[1]


@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(matrices())
def test_valid_matrices_train_and_invalid_ones_fail_in_one_line(make_cfg, case):
    X, sparse = case
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        if sparse:
            path = Path(tmp) / "x.npz"
            sp.save_npz(path, sp.csr_matrix(np.nan_to_num(X, nan=0.0) if not np.isnan(X).all() else X))
        else:
            path = Path(tmp) / "x.npy"
            np.save(path, X)
        cfg = make_cfg(
            "data=file",
            f"data.path={path}",
            f"model.rank={min(2, *X.shape)}",
            "optimizer=hals",
            "trainer.max_steps=20",
            f"paths.output_dir={out}",
        )
        stored = sp.load_npz(path).toarray() if sparse else X
        if _valid(stored, sparse):
            metrics = train(cfg)
            assert metrics["status"] == "completed" and metrics["steps"] == 20
            with np.load(out / "factors.npz") as f:
                for A in (f["W"], f["H"]):
                    assert np.isfinite(A).all() and (A >= 0).all()
            assert json.loads((out / "metrics.json").read_text())["status"] == "completed"
        else:
            with pytest.raises((ValueError, TypeError)) as err:
                train(cfg)
            assert "\n" not in str(err.value) and str(err.value)
            assert not (out / "factors.npz").exists() and not (out / "metrics.json").exists()
