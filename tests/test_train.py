import json
import math
import os
import re
import signal
import warnings

import lightning as L
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nmf_lightning.engine import DivergenceError, ObservedBlock, Problem, SparseBlock
from nmf_lightning.module import NMFModule
from nmf_lightning.train import DegenerateError, _record_failure, degenerate_reason, train
from nmf_lightning.validation import NMFInputError

SMALL = ("data=synthetic", "data.n_rows=40", "data.n_cols=30", "data.true_rank=3", "model.rank=3")


def _factors(path):
    with np.load(path / "factors.npz") as f:
        return f["W"], f["H"]


def test_run_writes_factors_metrics_checkpoint_and_events(make_cfg, tmp_path):
    metrics = train(make_cfg(*SMALL, "trainer.max_steps=300", "optimizer.lr=0.02"))
    W, H = _factors(tmp_path)
    assert W.shape == (40, 3) and H.shape == (3, 30) and W.dtype == np.float32
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    assert {"loss", "relative_error", "rmse", "steps", "stop_reason"} <= set(saved)
    assert saved["steps"] == 300 and saved["stop_reason"] == "max_steps"
    from nmf_lightning.data import synthetic

    Xs = synthetic(n_rows=40, n_cols=30, true_rank=3, seed=0).X
    assert saved["relative_error"] == pytest.approx(np.linalg.norm(Xs - W @ H) / np.linalg.norm(Xs), rel=1e-4)
    assert saved["relative_error"] < 0.2
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    ea = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/reconstruction",
        "train/relative_error",
        "train/rmse",
        "train/sparsity_W",
        "train/updates_per_sec",
    ):
        assert tag in tags, tag
    # no curve for a penalty of weight 0, nor for the negative share of factors projected to >= 0
    assert not tags & {"train/penalty", "train/l1_W", "train/neg_fraction_W", "train/neg_mean_H"}
    assert not any(tag.startswith(("hp/", "factors/", "perf/")) for tag in tags)  # SCALARS opens on train/
    loss = [e.value for e in ea.Scalars("train/loss")]
    steps = [e.step for e in ea.Scalars("train/loss")]
    assert loss[-1] < 0.5 * loss[0]
    assert steps == list(range(10, 301, 10))  # the x-axis counts updates: a point every 10
    # HPARAMS reads the curves' last points: the final metrics, with no point written twice
    assert ea.Scalars("train/relative_error")[-1].value == pytest.approx(saved["relative_error"], rel=1e-5)
    assert [e.step for e in ea.Scalars("train/relative_error")] == list(range(10, 301, 10))
    assert "_hparams_/experiment" in ea.summary_metadata
    assert "custom_scalars__config__" in ea.Tags()["tensors"]  # the CUSTOM SCALARS layout, errors first


def test_hparams_show_the_step_lr_auto_chose(make_cfg, tmp_path, caplog):
    from tensorboard.plugins.hparams import plugin_data_pb2

    with caplog.at_level("INFO"):
        train(make_cfg(*SMALL, "trainer.max_steps=20"))
    chosen = float(re.search(r"optimizer.lr=auto: ([0-9.e-]+)", caplog.text).group(1))
    ea = EventAccumulator(str(tmp_path))
    ea.Reload()
    content = ea.summary_metadata["_hparams_/session_start_info"].plugin_data.content
    lr = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams["lr"].number_value
    assert lr == pytest.approx(chosen, rel=1e-2)  # the value used, not "auto"
    caplog.clear()
    with caplog.at_level("INFO"):  # resumed: the lr comes with the checkpoint, not from the factors reached
        train(make_cfg(*SMALL, "trainer.max_steps=30", "ckpt_path=last"))
    said = re.findall(r"optimizer.lr=auto: ([0-9.e-]+)(.*)", caplog.text)
    assert len(said) == 1 and float(said[0][0]) == chosen and "the checkpoint's run chose it" in said[0][1]


def test_checkpoint_restores_the_factors(make_cfg, tmp_path):
    train(make_cfg(*SMALL, "trainer.max_steps=20"))
    module = NMFModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    W, H = _factors(tmp_path)
    W_ckpt, H_ckpt = module.factors()
    np.testing.assert_array_equal(W_ckpt, W)
    np.testing.assert_array_equal(H_ckpt, H)


class _Counting(torch.optim.SGD):
    calls = 0

    def step(self, closure=None):
        type(self).calls += 1
        return super().step(closure)


@pytest.mark.parametrize("inner", ["1", "5", "auto", "1000"])
def test_max_steps_counts_optimizer_updates_exactly(make_cfg, inner):
    _Counting.calls = 0
    cfg = make_cfg(*SMALL, "optimizer=sgd", "trainer.max_steps=37", f"model.inner_steps={inner}")
    cfg.optimizer._target_ = f"{__name__}._Counting"
    metrics = train(cfg)
    assert _Counting.calls == 37 and metrics["steps"] == 37


def test_fused_inner_steps_give_the_same_factors_as_one_update_per_step(make_cfg, tmp_path):
    results = []
    for inner in (1, 8):
        out = tmp_path / str(inner)
        out.mkdir()
        train(make_cfg(*SMALL, "trainer.max_steps=40", f"model.inner_steps={inner}", f"paths.output_dir={out}"))
        results.append(_factors(out))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-6, atol=1e-7)


def test_same_seed_same_factors_other_seed_other_factors(make_cfg, tmp_path):
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = tmp_path / name
        out.mkdir()
        train(make_cfg(*SMALL, "trainer.max_steps=30", f"seed={seed}", f"paths.output_dir={out}"))
        runs[name] = _factors(out)
    np.testing.assert_array_equal(runs["a"][0], runs["b"][0])
    assert not np.array_equal(runs["a"][0], runs["c"][0])


class _NonNegativeAfterEveryUpdate(L.Callback):
    def on_train_batch_end(self, trainer, module, *args):
        assert (module.W >= 0).all() and (module.H >= 0).all()
        self.checked = getattr(self, "checked", 0) + 1


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "adamw", "rmsprop"])
def test_projection_keeps_factors_non_negative_after_every_update(optimizer):
    from nmf_lightning.data import NMFDataModule, synthetic

    check = _NonNegativeAfterEveryUpdate()
    opt = {
        "adam": torch.optim.Adam,
        "sgd": torch.optim.SGD,
        "adamw": torch.optim.AdamW,
        "rmsprop": torch.optim.RMSprop,
    }
    module = NMFModule(rank=4, project=True, inner_steps=1, optimizer=lambda p: opt[optimizer](p, lr=0.05))
    trainer = L.Trainer(
        max_steps=25,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[check],
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=NMFDataModule(synthetic, n_rows=20, n_cols=15, true_rank=4))
    assert check.checked == 25
    assert module.final_metrics["train/neg_fraction_W"] == 0


def test_without_projection_the_result_is_clamped_and_the_raw_negatives_reported(make_cfg, tmp_path):
    with pytest.warns(
        UserWarning, match=r"trained factors are not non-negative .* model.lam=10 and model.lam_growth=10"
    ):
        metrics = train(
            make_cfg(
                *SMALL,
                "model.project=false",
                "trainer.max_steps=200",
                "optimizer.lr=0.05",
                "model.init=normal_abs",
                "data.holdout=0.1",
            )
        )
    assert metrics["W_neg_fraction"] > 0 or metrics["H_neg_fraction"] > 0  # of the trained factors
    assert metrics["status"] == "not_nonnegative"  # clamping cost the fit more than 1%
    W, H = _factors(tmp_path)
    assert (W >= 0).all() and (H >= 0).all()  # what a user gets is an NMF
    from nmf_lightning.data import synthetic
    from nmf_lightning.data.holdout import split_holdout

    matrix = synthetic(n_rows=40, n_cols=30, true_rank=3, seed=0)
    X, holdout = matrix.X, split_holdout(matrix, 0.1, seed=0)[1]
    held = np.zeros_like(X, dtype=bool)
    held[holdout.rows, holdout.cols] = True
    R = np.where(held, 0.0, X - W @ H)
    # the reported errors are those of the saved (clamped) factors
    assert metrics["relative_error"] == pytest.approx(np.linalg.norm(R) / np.linalg.norm(X[~held]), rel=1e-4)
    V = (X - W @ H)[held]
    assert metrics["val_relative_error"] == pytest.approx(np.linalg.norm(V) / np.linalg.norm(X[held]), rel=1e-4)
    ea = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    ea.Reload()
    assert ea.Scalars("train/neg_fraction_W")[-1].value == pytest.approx(metrics["W_neg_fraction"])
    curve = [e.step for e in ea.Scalars("train/relative_error")]
    assert curve == list(range(10, 201, 10))
    assert ea.Scalars("train/relative_error")[-1].value == pytest.approx(metrics["relative_error"], rel=1e-5)


@pytest.mark.parametrize("loss", ["fro", "fro2", "rmse"])
def test_each_loss_trains_and_masked_entries_stay_out(make_cfg, loss):
    metrics = train(
        make_cfg("data=toy", "model.rank=2", f"model.loss={loss}", "trainer.max_steps=400", "optimizer.lr=0.05")
    )
    assert np.isfinite(metrics["loss"]) and metrics["relative_error"] < 0.2


def test_penalty_terms_are_logged_with_their_weights(make_cfg):
    metrics = train(
        make_cfg(
            *SMALL,
            "model.l1_W=0.01",
            "model.l1_H=0.02",
            "model.l21_H=0.5",
            "model.l2_W=0.3",
            "model.l2_H=0.4",
            "model.lam=3",
            "trainer.max_steps=10",
        )
    )
    expected = (
        metrics["reconstruction"]
        + 3 * metrics["penalty"]
        + 0.01 * metrics["l1_W"]
        + 0.02 * metrics["l1_H"]
        + 0.5 * metrics["l21_H"]
        + 0.3 * metrics["l2_W"]
        + 0.4 * metrics["l2_H"]
    )
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)


def test_sparse_x_trains_without_being_densified(tmp_path, make_cfg):
    X = sp.random(60, 50, density=0.1, random_state=0, format="csr")
    path = tmp_path / "x.npz"
    sp.save_npz(path, X)
    seen = {}
    orig = Problem.__init__

    def spy(self, spec, source, *args, **kwargs):
        orig(self, spec, source, *args, **kwargs)
        if source.blocks is not None:  # (the check before training has no blocks)
            seen["block"] = source.blocks

    Problem.__init__ = spy
    try:
        metrics = train(
            make_cfg("data=file", f"data.path={path}", "model.rank=5", "trainer.max_steps=50", "optimizer.lr=0.01")
        )
    finally:
        Problem.__init__ = orig
    assert isinstance(seen["block"], SparseBlock) and seen["block"].X.layout == torch.sparse_csr
    W, H = _factors(tmp_path)
    dense = X.toarray()
    assert metrics["relative_error"] == pytest.approx(np.linalg.norm(dense - W @ H) / np.linalg.norm(dense), rel=1e-4)


def test_float64_precision_trains_in_float64(make_cfg, tmp_path):
    train(make_cfg(*SMALL, "trainer.precision=64-true", "trainer.max_steps=5"))
    assert _factors(tmp_path)[0].dtype == np.float64


# ------------------------------------------------------------- bad input
def _no_results(path):
    return not (path / "factors.npz").exists() and not (path / "metrics.json").exists()


def test_divergence_stops_with_the_step_and_keeps_last_finite_factors(make_cfg, tmp_path):
    cfg = make_cfg(
        *SMALL,
        "optimizer=sgd",
        "optimizer.lr=1e4",
        "model.project=false",
        "trainer.max_steps=200",
        "model.inner_steps=10",
    )
    with pytest.raises(
        DivergenceError,
        match=r"the loss became (nan|inf) at update \d+; lower the learning rate "
        r"\(e.g. optimizer.lr=1000\)",
    ) as info:
        train(cfg)
    assert 1 <= info.value.step <= 200
    assert _no_results(tmp_path)
    with np.load(tmp_path / "factors_last_finite.npz") as f:
        assert np.isfinite(f["W"]).all() and np.isfinite(f["H"]).all()


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (("model.rank=0",), NMFInputError, r"model.rank must be 'auto' or an integer >= 1, got 0"),
        (("model.loss=l1",), NMFInputError, r"model.loss must be one of 'fro', .*got 'l1'"),
        (("model.lam=-1",), NMFInputError, r"model.lam must be a finite number >= 0 \(a penalty weight\), got -1"),
        (
            ("trainer.max_steps=0",),
            NMFInputError,
            r"trainer.max_steps must be an integer >= 1 \(the number of updates\)",
        ),
        (("trainer.log_every_n_steps=0",), NMFInputError, r"trainer.log_every_n_steps must be an integer >= 1"),
        (("ckpt_path=/",), NMFInputError, r"ckpt_path=/ is a folder; give a checkpoint file"),
        (("data.n_rows=10000000", "data.n_cols=10000000"), NMFInputError, r"needs .* GiB to generate but"),
        (("ckpt_path=/nowhere/last.ckpt",), NMFInputError, r"ckpt_path=/nowhere/last.ckpt is not found"),
        (("ckpt_path=last",), NMFInputError, r"ckpt_path=last continues the run in .* holds no last.ckpt"),
        (("model.init=nndsvd", "model.rank=50"), NMFInputError, r"needs model.rank <= min\(n, m\) = 30"),
        # values that are not numbers, named before any work (each had raised Python's own error)
        (("model.rank=abc",), NMFInputError, r"model.rank must be 'auto' or an integer >= 1, got 'abc'"),
        (("seed=abc",), NMFInputError, r"^seed must be an integer, got 'abc'"),
        (("gpu=abc",), NMFInputError, r"gpu must be null or an integer >= 0, got 'abc'"),
        (("data.batch_rows=abc",), NMFInputError, r"data.batch_rows must be an integer >= 1 or null \(rows"),
        (("data.holdout=abc",), NMFInputError, r"data.holdout must be a fraction in \(0, 1\), got 'abc'"),
        (("data.num_workers=-1",), NMFInputError, r"data.num_workers must be 'auto' or an integer >= 0, got -1"),
        (("trainer.devices=abc",), NMFInputError, r"trainer.devices must be auto, an integer >= 1"),
        (
            ("optimizer.betas=abc",),
            NMFInputError,
            r"optimizer=Adam cannot be built from its settings \(.*optimizer.betas='abc'.*\): '<=' not supported",
        ),
    ],
)
def test_bad_configuration_fails_before_training(make_cfg, tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        train(make_cfg(*SMALL, *overrides))
    assert _no_results(tmp_path)


def test_rank_above_min_dimension_is_allowed_with_a_warning(make_cfg):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(make_cfg("data=toy", "model.rank=10", "trainer.max_steps=5"))
    assert sum("exceeds min(n, m) = 3" in str(w.message) for w in caught) == 1  # (said once, not at setup again)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_requested_without_cuda_fails_at_once(make_cfg, tmp_path):
    with pytest.raises(NMFInputError, match=r"trainer.accelerator=gpu but no CUDA device is visible"):
        train(make_cfg(*SMALL, "trainer.accelerator=gpu"))
    assert _no_results(tmp_path)


def test_batched_restarts_equal_separate_runs_with_the_same_seeds(make_cfg, tmp_path):
    common = (*SMALL, "data.seed=0", "trainer.max_steps=60", "trainer.precision=64-true", "optimizer.lr=0.01")
    batched_dir = tmp_path / "batched"
    batched_dir.mkdir()
    metrics = train(make_cfg(*common, "model.restarts=3", "seed=5", f"paths.output_dir={batched_dir}"))
    ea = EventAccumulator(str(batched_dir), size_guidance={"scalars": 0})
    ea.Reload()
    finals = [ea.Scalars(f"restarts/loss_{r}")[-1].value for r in range(3)]
    best = metrics["best_restart"]
    assert best == int(np.argmin(finals))
    for r in range(3):
        out = tmp_path / f"single{r}"
        out.mkdir()
        single = train(make_cfg(*common, f"seed={5 + r}", f"paths.output_dir={out}"))
        assert single["loss"] == pytest.approx(finals[r], rel=1e-6)
        if r == best:
            for a, b in zip(_factors(out), _factors(batched_dir), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
            assert single["relative_error"] == pytest.approx(metrics["relative_error"], rel=1e-9)


def test_ratings_fit_only_their_stored_entries(make_cfg, tmp_path):
    rng = np.random.default_rng(0)
    dense = rng.random((50, 40)) * (rng.random((50, 40)) < 0.08)  # about 8% observed
    ratings = sp.csr_matrix(dense)
    sp.save_npz(tmp_path / "r.npz", ratings)
    nan_dense = np.where(dense > 0, dense, np.nan)
    np.save(tmp_path / "r.npy", nan_dense)
    seen = {}
    orig = Problem.__init__

    def spy(self, spec, source, *args, **kwargs):
        orig(self, spec, source, *args, **kwargs)
        if source.blocks is not None:  # (the check before training has no blocks)
            seen[len(seen)] = (isinstance(source.blocks, ObservedBlock), source.blocks.n_obs)

    Problem.__init__ = spy
    runs = {}
    try:
        for name, extra in (
            ("sparse", ["data.path=" + str(tmp_path / "r.npz"), "data.unstored=missing"]),
            ("dense", ["data.path=" + str(tmp_path / "r.npy")]),
        ):
            out = tmp_path / name
            out.mkdir()
            runs[name] = train(
                make_cfg(
                    "data=file",
                    *extra,
                    "model.rank=3",
                    "trainer.max_steps=50",
                    "optimizer.lr=0.01",
                    f"paths.output_dir={out}",
                )
            )
    finally:
        Problem.__init__ = orig
    # both keep only the ratings as (row, col, value) triplets: no n x m tensor at all
    assert len(seen) == 2 and all(v == (True, ratings.nnz) for v in seen.values())
    assert runs["sparse"]["relative_error"] == pytest.approx(runs["dense"]["relative_error"], rel=1e-5)
    W, H = _factors(tmp_path / "sparse")
    obs = dense > 0
    expected = np.linalg.norm((dense - W @ H)[obs]) / np.linalg.norm(dense[obs])
    assert runs["sparse"]["relative_error"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
def test_compiled_training_loss_trains_like_the_eager_one(make_cfg, tmp_path):
    runs = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        out.mkdir()
        runs[flag] = train(
            make_cfg(*SMALL, "trainer.max_steps=100", f"model.compile={flag}", f"paths.output_dir={out}")
        )
    assert runs["true"]["relative_error"] == pytest.approx(runs["false"]["relative_error"], rel=1e-2)


@pytest.mark.parametrize(
    "extra",
    [
        ("optimizer=adam",),
        ("optimizer=kaczmarz",),  # the row sampler's state is checkpointed too
        ("optimizer=hals", "SPARSE"),
        ("optimizer=adam", "SPARSE", "model.restarts=3"),
        ("optimizer=mu", "data.holdout=0.2", "model.restarts=2"),
        ("optimizer=adam", "data.holdout=0.2", "model.project=false"),
    ],
    ids=["adam", "kaczmarz", "hals-sparse", "adam-sparse-restarts", "mu-holdout-restarts", "adam-holdout-unprojected"],
)
def test_resuming_from_a_checkpoint_continues_the_same_run_bitwise(make_cfg, tmp_path, extra):
    dirs = {name: tmp_path / name for name in ("first", "resumed", "straight")}
    if "SPARSE" in extra:
        X = sp.random(40, 30, density=0.3, random_state=0, format="csr") * 5
        sp.save_npz(tmp_path / "x.npz", X)
        data = ("data=file", f"data.path={tmp_path / 'x.npz'}", "model.rank=3")
    else:
        data = SMALL
    opts = (*data, *(e for e in extra if e != "SPARSE"))
    train(make_cfg(*opts, "trainer.max_steps=30", f"paths.output_dir={dirs['first']}"))
    ckpt = dirs["first"] / "checkpoints" / "last.ckpt"
    resumed = train(make_cfg(*opts, "trainer.max_steps=60", f"ckpt_path={ckpt}", f"paths.output_dir={dirs['resumed']}"))
    straight = train(make_cfg(*opts, "trainer.max_steps=60", f"paths.output_dir={dirs['straight']}"))
    assert resumed["steps"] == 60
    for a, b in zip(_factors(dirs["resumed"]), _factors(dirs["straight"]), strict=True):
        np.testing.assert_array_equal(a, b)  # bitwise, on CPU
    assert resumed["relative_error"] == straight["relative_error"]


def test_csv_logger_writes_metrics(make_cfg, tmp_path):
    train(make_cfg(*SMALL, "logger=csv", "trainer.max_steps=20"))
    assert "train/relative_error" in (tmp_path / "csv" / "metrics.csv").read_text()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ("trainer.devices=2",),
            r"trainer.devices=2: one run on several devices shards X's rows over them with trainer=ddp",
        ),
        (
            ("trainer.devices=[0,1]",),
            r"trainer.devices=\[0, 1\]: one run on several devices shards X's rows over them with trainer=ddp",
        ),
        (("matmul_precision=bogus",), r"matmul_precision='bogus' must be highest, high or medium"),
        (("trainer.precision=bf16-mixed",), r"trainer.precision=bf16-mixed has no sparse matrix kernels"),
    ],
)
def test_more_bad_configuration_is_named(make_cfg, tmp_path, overrides, message):
    path = tmp_path / "x.npz"
    sp.save_npz(path, sp.random(30, 20, density=0.2, random_state=0, format="csr"))
    with pytest.raises(ValueError, match=message):
        train(make_cfg("data=file", f"data.path={path}", "model.rank=2", "trainer.max_steps=5", *overrides))
    assert _no_results(tmp_path)


def test_devices_auto_is_several_only_where_it_means_every_gpu(monkeypatch):
    from nmf_lightning.validation import check_accelerator

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_accelerator("cpu", "auto")  # one CPU process, however many GPUs the machine has
    check_accelerator("cpu", -1)
    for devices in ("auto", -1, [0, 1], "0,1"):
        with pytest.raises(NMFInputError, match="one run on several devices shards X's rows"):
            check_accelerator("auto", devices)


def test_all_zero_matrix_is_rejected():
    from nmf_lightning.validation import check_matrix

    with pytest.raises(NMFInputError, match="has no positive entry"):
        check_matrix(np.zeros((3, 4)))


def test_resuming_with_another_rank_is_a_clear_error(make_cfg, tmp_path):
    first = tmp_path / "first"
    first.mkdir()
    train(make_cfg(*SMALL, "trainer.max_steps=10", f"paths.output_dir={first}"))
    with pytest.raises(NMFInputError, match=r"resume with the data, model.rank and model.restarts"):
        train(make_cfg(*SMALL, "model.rank=4", "trainer.max_steps=20", f"ckpt_path={first}/checkpoints/last.ckpt"))


def test_batched_kaczmarz_survives_rows_that_are_zero_in_one_restart():
    from nmf_lightning.engine import DenseBlock
    from nmf_lightning.solvers import kaczmarz

    X = torch.rand(12, 9, dtype=torch.float64) * 16
    W = torch.rand(2, 12, 3, dtype=torch.float64)
    W[0, :5] = 0  # zero rows in restart 0 only
    H = torch.rand(2, 3, 9, dtype=torch.float64)
    t = DenseBlock(X)
    out = kaczmarz.update_h(t, W, H, torch.Generator().manual_seed(0), steps=20, block=8)
    assert torch.isfinite(out).all()


def test_an_adam_lr_too_small_for_large_valued_x_is_named_and_auto_is_sized_to_it(make_cfg, tmp_path):
    X = np.random.default_rng(0).random((60, 8)) * 1000.0  # entries in the hundreds
    np.save(tmp_path / "big.npy", X)
    common = ("data=file", f"data.path={tmp_path / 'big.npy'}", "model.rank=3", "trainer.max_steps=200")
    with pytest.warns(UserWarning, match=r"optimizer.lr=0.001 moves a factor entry .* Use optimizer=hals, or raise"):
        fixed = train(make_cfg(*common, "optimizer.lr=0.001"))  # an lr given: named, not changed
    for lr in ("1.0", "auto"):  # big enough, or lr: auto (the default) sized to the factors' scale
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fitted = train(make_cfg(*common, f"optimizer.lr={lr}"))
        assert not [w for w in caught if "moves a factor entry" in str(w.message)]
    with pytest.warns(UserWarning, match=r"e.g. optimizer.lr=\S+; lr=auto took 5% of the scale, made for runs of 20"):
        train(make_cfg(*common[:-1], "trainer.max_steps=10"))  # auto's 5% per update covers the scale in 20
    assert fitted["relative_error"] < 0.6 * fixed["relative_error"]  # auto fits where 0.001 cannot


@pytest.mark.parametrize("lr", ["0", "-0.01", "abc", "nan", "true"])
def test_an_lr_that_is_not_a_positive_number_is_named_before_anything_runs(make_cfg, tmp_path, lr):
    with pytest.raises(NMFInputError, match=r"optimizer.lr must be 'auto' or a finite number > 0, got"):
        train(make_cfg("data=toy", "model.rank=2", f"optimizer.lr={lr}", f"paths.output_dir={tmp_path}"))
    assert not list(tmp_path.rglob("events.out.tfevents*")) and not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize(
    "extra, hint",
    [
        (("optimizer=sgd", "optimizer.lr=10"), "optimizer.lr=1"),
        (("model.l1_W=1000", "model.l1_H=1000", "optimizer=hals"), "model.l1_W=1000"),
    ],
    ids=["lr", "penalty"],
)
def test_factors_that_collapse_end_degenerate_with_a_hint_and_no_factors(make_cfg, tmp_path, extra, hint):
    with pytest.raises(DegenerateError, match=rf"collapsed.*{re.escape(hint)}"):
        train(make_cfg(*SMALL, "trainer.max_steps=50", *extra))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["status"] == "degenerate" and "collapsed" in saved["reason"]
    assert not (tmp_path / "factors.npz").exists()
    # in a sweep the job's record keeps the numbers and the status, and the sweep goes on
    err = DegenerateError(saved["reason"])
    assert math.isnan(_record_failure(make_cfg(*SMALL), err))
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["status"] == "degenerate" and record["steps"] == 50 and record["error"] == saved["reason"]


def test_degenerate_reason_reads_zero_factors_and_no_better_than_zero():
    ones = np.ones((2, 2))
    assert degenerate_reason({"relative_error": 0.5}, ones, ones) is None
    assert "W is all zero" in degenerate_reason({"relative_error": 1.0}, 0 * ones, ones)
    assert "no better than all-zero" in degenerate_reason({"relative_error": 2.72}, ones, ones)
    assert "not a number" in degenerate_reason({"relative_error": math.nan}, ones, ones)


def test_a_rank_whose_factors_cannot_fit_in_memory_is_refused_before_allocating(make_cfg):
    with pytest.raises(NMFInputError, match=r"model.rank=1000000000 needs .* GiB for W and H alone .* rank 30 already"):
        train(make_cfg(*SMALL[:-1], "model.rank=1000000000"))


def test_a_crash_while_writing_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    from nmf_lightning.atomic import save_npz

    path = tmp_path / "factors.npz"
    save_npz(path, W=np.ones((2, 2)))

    def crash(f, **_):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        save_npz(path, W=np.zeros((2, 2)))
    monkeypatch.undo()
    with np.load(path) as f:
        assert f["W"].tolist() == [[1, 1], [1, 1]]
    assert [p.name for p in tmp_path.iterdir()] == ["factors.npz"]  # no temporary file left


class _SignalAt(L.Callback):
    """Send this process a signal once a block of updates has passed ``step``."""

    def __init__(self, step, signum):
        self.step, self.signum, self.sent = step, signum, False

    def on_train_batch_end(self, trainer, *_):
        if trainer.global_step >= self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize(
    ("extra", "signum"),
    [(("optimizer.lr=0.05",), signal.SIGTERM), (("optimizer=hals", "data.batch_rows=16"), signal.SIGINT)],
    ids=["adam-sigterm", "hals-streamed-sigint"],
)
def test_a_stop_signal_saves_a_checkpoint_that_resumes_exactly(make_cfg, tmp_path, monkeypatch, extra, signum):
    from nmf_lightning import callbacks
    from nmf_lightning.train import InterruptedRunError

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    common = (*SMALL, "trainer.max_steps=60", "model.inner_steps=10", *extra)
    train(make_cfg(*common, f"paths.output_dir={straight}"))
    original = callbacks.GracefulStop.on_train_start

    def with_signal(self, trainer, pl_module):  # the signal comes once the handlers are in place
        original(self, trainer, pl_module)
        trainer.callbacks.append(_SignalAt(20, signum))

    monkeypatch.setattr(callbacks.GracefulStop, "on_train_start", with_signal)
    with pytest.raises(InterruptedRunError, match=rf"{signal.Signals(signum).name} after 2\d updates") as err:
        train(make_cfg(*common, f"paths.output_dir={stopped}"))
    assert str(err.value).endswith(f"continue with: nmf-train hydra.run.dir={stopped} ckpt_path=last")
    monkeypatch.undo()
    saved = json.loads((stopped / "metrics.json").read_text())
    assert saved["status"] == "interrupted" and saved["stop_reason"].startswith("interrupted by SIG")
    assert 20 <= saved["steps"] < 30 and (stopped / "checkpoints" / "last.ckpt").is_file()
    assert signal.getsignal(signal.SIGTERM) is not None  # handlers restored after the run
    resumed = train(make_cfg(*common, f"paths.output_dir={stopped}", "ckpt_path=last"))
    assert resumed["steps"] == 60 and resumed["status"] == "completed"
    for a, b in zip(_factors(straight), _factors(stopped), strict=True):
        np.testing.assert_array_equal(a, b)  # bitwise, on CPU


def test_checkpoints_are_saved_every_n_updates_under_fused_blocks(make_cfg, tmp_path, monkeypatch):
    from nmf_lightning.callbacks import UpdateCheckpoint

    saved = []
    original = UpdateCheckpoint._save_last_checkpoint

    def record(self, trainer, candidates):
        saved.append(trainer.global_step)
        original(self, trainer, candidates)

    monkeypatch.setattr(UpdateCheckpoint, "_save_last_checkpoint", record)
    train(
        make_cfg(
            *SMALL,
            "trainer.max_steps=100",
            "model.inner_steps=7",
            "callbacks.model_checkpoint.every_n_updates=30",
            "callbacks.model_checkpoint.every_n_minutes=0",
        )
    )
    assert saved[:3] == [35, 63, 91] and saved[-1] == 100  # at the first block end past each 30, and the end
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 100
    assert not list((tmp_path / "checkpoints").glob("*.part"))


def test_a_finished_run_is_not_overwritten_and_a_live_one_not_shared(make_cfg, tmp_path):
    from nmf_lightning.rundir import LOCK, claim_run_dir

    common = (*SMALL, "trainer.max_steps=20", "overwrite=false")
    first = train(make_cfg(*common))
    with pytest.raises(NMFInputError, match=r"holds a finished run \(status completed\).*overwrite=true"):
        train(make_cfg(*common))
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(first)  # untouched
    from nmf_lightning.train import _main

    assert math.isnan(_main(make_cfg(*common), single=False))  # a sweep's job into it fails, writing nothing
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(first)
    with pytest.raises(NMFInputError):  # a re-run that fails leaves no stale results behind
        train(make_cfg(*common[:-1], "overwrite=true", "model.rank=0"))
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "factors.npz").exists()
    assert train(make_cfg(*common[:-1], "overwrite=true"))["steps"] == 20
    assert train(make_cfg(*common, "trainer.max_steps=30", "ckpt_path=last"))["steps"] == 30  # continuing is fine
    busy = tmp_path / "busy"
    with claim_run_dir(busy):
        assert (busy / LOCK).read_text() == str(os.getpid())
        with pytest.raises(NMFInputError, match=rf"in use by a run \(PID {os.getpid()}\)"):
            train(make_cfg(*SMALL, f"paths.output_dir={busy}"))
    assert not (busy / LOCK).exists()
    (busy / LOCK).write_text("999999999")  # left by a run that died
    assert train(make_cfg(*SMALL, "trainer.max_steps=5", f"paths.output_dir={busy}"))["steps"] == 5
    finished = tmp_path / "finished"
    train(make_cfg(*common, f"paths.output_dir={finished}"))
    with pytest.raises(NMFInputError, match="holds a finished run"):  # another run's checkpoint continues nothing
        train(make_cfg(*common, f"paths.output_dir={finished}", f"ckpt_path={busy / 'checkpoints' / 'last.ckpt'}"))


def _locked(out) -> bool:
    """Whether a live lock holds the run folder ``out`` (a shared lock cannot be taken beside it)."""
    import fcntl

    from nmf_lightning.rundir import LOCK

    if not (out / LOCK).is_file():
        return False
    fd = os.open(out / LOCK, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_a_folder_held_before_hydra_writes_is_the_one_the_run_claims(make_cfg, tmp_path):
    """The Hydra callback holds the folder first; the run in the same process takes it over, then lets go."""
    from nmf_lightning.rundir import LOCK, hold_run_dir, let_go

    held = tmp_path / "held"
    hold_run_dir(held)
    assert (held / LOCK).read_text() == str(os.getpid()) and _locked(held)
    assert train(make_cfg(*SMALL, "trainer.max_steps=5", f"paths.output_dir={held}"))["steps"] == 5
    assert not (held / LOCK).exists() and not _locked(held)
    with pytest.raises(NMFInputError, match="holds a finished run"):  # checked when held, before Hydra writes
        hold_run_dir(held)
    assert not (held / LOCK).exists()
    other = tmp_path / "other"
    hold_run_dir(other)
    let_go(other)  # a run that never claimed it (it failed first)
    assert not (other / LOCK).exists() and not _locked(other)


@pytest.mark.parametrize("scale", [1e-30, 1e30, 1e-50])
def test_values_too_tiny_or_huge_for_float32_are_refused_with_the_factor_to_apply(make_cfg, tmp_path, scale):
    X = np.random.default_rng(0).random((30, 20)) * scale
    np.save(tmp_path / "x.npy", X)
    word = "small" if scale < 1 else "large"
    with pytest.raises(NMFInputError, match=rf"too {word} to train in float32.*multiply X by .*precision=64-true"):
        train(make_cfg("data=file", f"data.path={tmp_path / 'x.npy'}", "model.rank=3"))
    assert not (tmp_path / "metrics.json").exists()


def test_the_log_says_what_x_holds_and_ends_on_one_short_line(make_cfg, tmp_path, caplog):
    import logging

    X = np.random.default_rng(0).random((50, 20))
    X[X < 0.05] = np.nan
    np.save(tmp_path / "nan.npy", X)
    cfg = make_cfg("data=file", f"data.path={tmp_path / 'nan.npy'}", "model.rank=3", "optimizer=hals", "model.tol=1e-3")
    with caplog.at_level(logging.INFO, logger="nmf_lightning.train"):
        metrics = train(cfg)
    lines = [r.getMessage() for r in caplog.records if r.name == "nmf_lightning.train"]
    assert f"X: 50 x 20 dense, {int(np.isnan(X).sum())} missing" in lines
    last = lines[-1]
    assert f"after {metrics['steps']} updates (converged, completed): {tmp_path}" in last
    assert last.endswith(f"; curves: tensorboard --logdir {tmp_path}")
    assert len(last) - 2 * len(str(tmp_path)) < 120  # the path twice, and little else


def test_threads_auto_takes_one_for_small_problems_and_the_cores_for_large(make_cfg, monkeypatch):
    from nmf_lightning.train import SMALL_WORK, auto_threads

    assert auto_threads(1797 * 64 * 16, cores=8) == 1  # digits: one thread is fastest
    assert auto_threads(SMALL_WORK, cores=8) == 8 and auto_threads(4e7, cores=2) == 2
    chosen = []
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)
    train(make_cfg("data=toy", "trainer.max_steps=2"))
    assert chosen == [1]
    big = ("data=synthetic", "data.n_rows=2000", "data.n_cols=600", "model.rank=10", "trainer.max_steps=1")
    train(make_cfg(*big))  # 12e6 multiply-adds a product: every core
    train(make_cfg(*big, "data.batch_rows=200"))  # streamed, a block's product is 1.2e6: one thread
    assert chosen[1:] == [max(1, len(os.sched_getaffinity(0))), 1]
    with pytest.raises(NMFInputError, match="threads must be 'auto', null or an integer >= 1, got 0"):
        train(make_cfg("data=toy", "threads=0"))
