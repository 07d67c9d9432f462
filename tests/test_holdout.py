import json

import numpy as np
import pytest
import scipy.sparse as sp
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nmf_lightning.data import Matrix, toy
from nmf_lightning.data.holdout import split_holdout
from nmf_lightning.train import train
from nmf_lightning.validation import NMFInputError


def test_dense_holdout_hides_a_seeded_fraction_of_observed_entries():
    X = np.random.default_rng(0).random((40, 30))
    train_m, held = split_holdout(Matrix(X), 0.1, seed=3)
    assert len(held) == 120
    assert np.isnan(train_m.X[held.rows, held.cols]).all()
    assert np.isnan(train_m.X).sum() == 120
    np.testing.assert_array_equal(held.values, X[held.rows, held.cols])
    again = split_holdout(Matrix(X), 0.1, seed=3)[1]
    other = split_holdout(Matrix(X), 0.1, seed=4)[1]
    np.testing.assert_array_equal(again.rows * 30 + again.cols, held.rows * 30 + held.cols)
    assert not np.array_equal(other.rows * 30 + other.cols, held.rows * 30 + held.cols)


def test_holdout_draws_only_observed_entries():
    train_m, held = split_holdout(toy(), 0.5, seed=0)
    assert len(held) == 6  # half of the 11 observed entries, rounded
    assert not ((held.rows == 0) & (held.cols == 0)).any()  # (0, 0) is the missing one
    assert np.isnan(train_m.X).sum() == 7


def test_sparse_holdout_keeps_ratings_sparse_and_densifies_observed_zeros():
    X = sp.random(50, 40, density=0.2, random_state=0, format="csr")
    ratings, held = split_holdout(Matrix(X, unstored_missing=True), 0.25, seed=0)
    assert sp.issparse(ratings.X) and ratings.X.nnz + len(held) == X.nnz
    assert (held.values > 0).all()
    dense, held = split_holdout(Matrix(X), 0.25, seed=0)
    assert isinstance(dense.X, np.ndarray) and len(held) == 500  # zeros are observed values
    assert np.isnan(dense.X).sum() == 500


@pytest.mark.parametrize(
    ("fraction", "message"), [(0.0, "in \\(0, 1\\)"), (1.0, "in \\(0, 1\\)"), (0.01, "no entry"), (0.99, "all 11")]
)
def test_bad_holdout_fractions_name_the_problem(fraction, message):
    with pytest.raises(NMFInputError, match=message):
        split_holdout(toy(), fraction)


def _fit(make_cfg, path, *extra):
    return train(
        make_cfg(
            "data=file",
            f"data.path={path}",
            "data.holdout=0.2",
            "model.rank=3",
            "trainer.max_steps=60",
            "optimizer.lr=0.01",
            "model.inner_steps=20",
            *extra,
        )
    )


def test_held_out_values_never_reach_training_but_score_validation(make_cfg, tmp_path):
    X = np.random.default_rng(1).random((30, 20))
    held = split_holdout(Matrix(X), 0.2, seed=0)[1]
    changed = X.copy()
    changed[held.rows, held.cols] *= 5.0
    np.save(tmp_path / "a.npy", X)
    np.save(tmp_path / "b.npy", changed)
    a = _fit(make_cfg, tmp_path / "a.npy")
    W_a = np.load(tmp_path / "factors.npz")["W"]
    b = _fit(make_cfg, tmp_path / "b.npy")
    W_b = np.load(tmp_path / "factors.npz")["W"]
    assert a["loss"] == b["loss"] and a["relative_error"] == b["relative_error"]
    np.testing.assert_array_equal(W_a, W_b)
    assert b["val_rmse"] > 2 * a["val_rmse"]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert {"val_relative_error", "val_rmse"} <= saved.keys()


def test_validation_metrics_match_a_direct_computation(make_cfg, tmp_path):
    X = np.random.default_rng(2).random((25, 15))
    np.save(tmp_path / "x.npy", X)
    metrics = _fit(make_cfg, tmp_path / "x.npy")
    held = split_holdout(Matrix(X), 0.2, seed=0)[1]
    f = np.load(tmp_path / "factors.npz")
    pred = (f["W"] @ f["H"])[held.rows, held.cols]
    err = held.values - pred
    assert metrics["val_relative_error"] == pytest.approx(np.linalg.norm(err) / np.linalg.norm(held.values), rel=1e-5)
    assert metrics["val_rmse"] == pytest.approx(np.sqrt(np.mean(err**2)), rel=1e-5)


#: a noisy matrix and a rank high enough to overfit it: the held-out error turns up early
EARLY_STOPPING = (
    "data=synthetic",
    "data.n_rows=60",
    "data.n_cols=40",
    "data.noise=0.5",
    "data.holdout=0.2",
    "callbacks=early_stopping",
    "callbacks.early_stopping.patience=2",
    "callbacks.early_stopping.min_delta=0.001",
    "++callbacks.progress_bar=null",
    "model.rank=30",
    "trainer.max_steps=20000",
)


def test_early_stopping_on_the_held_out_error_stops_the_run(make_cfg, tmp_path):
    metrics = train(make_cfg(*EARLY_STOPPING, "model.inner_steps=50"))
    assert metrics["steps"] < 20000
    assert metrics["stop_reason"].startswith("early stopping")
    # the run ends with the factors of its best check, not the last one
    ea = EventAccumulator(str(tmp_path))
    ea.Reload()
    checks = {e.step: e.value for e in ea.Scalars("val/relative_error")}
    best_step = min(checks, key=checks.get)
    assert best_step < metrics["steps"] and f"restored from update {best_step}" in metrics["stop_reason"]
    assert metrics["val_relative_error"] == pytest.approx(checks[best_step], rel=1e-5)
    W = np.load(tmp_path / "factors.npz")["W"]
    assert np.isfinite(W).all()


@pytest.mark.parametrize(
    "extra", [("callbacks=early_stopping", "++callbacks.progress_bar=null"), ("optimized_metric=val_rmse",)]
)
def test_validation_metrics_without_a_holdout_fail_before_training(make_cfg, tmp_path, extra):
    with pytest.raises(NMFInputError, match="data.holdout"):
        train(make_cfg("data=toy", *extra))
    assert not (tmp_path / "metrics.json").exists()


def test_a_misspelt_optimized_metric_fails_before_training(make_cfg, tmp_path):
    with pytest.raises(NMFInputError, match="optimized_metric=val_rel is not a final metric"):
        train(make_cfg("data=toy", "data.holdout=0.2", "optimized_metric=val_rel"))
    assert not (tmp_path / "metrics.json").exists() and not list(tmp_path.glob("events.out.tfevents.*"))


def test_resuming_with_another_holdout_is_refused(make_cfg, tmp_path):
    train(make_cfg("data=toy", "data.holdout=0.2", "trainer.max_steps=20", "model.inner_steps=10"))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(NMFInputError, match="data.holdout=0.2 .holdout_seed=0. but this run has data.holdout=0.3"):
        train(make_cfg("data=toy", "data.holdout=0.3", "trainer.max_steps=40", f"ckpt_path={ckpt}"))
    resumed = train(make_cfg("data=toy", "data.holdout=0.2", "trainer.max_steps=40", f"ckpt_path={ckpt}"))
    assert resumed["steps"] == 40


def test_early_stopping_validates_on_a_fixed_update_grid(make_cfg):
    first = train(make_cfg(*EARLY_STOPPING))
    second = train(make_cfg(*EARLY_STOPPING))
    assert first["steps"] % 100 == 0 and first["steps"] < 20000
    assert first["steps"] == second["steps"] and first["val_relative_error"] == second["val_relative_error"]
