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


def _damaged(kind: str) -> sp.csr_matrix:
    """A 30 x 20 CSR matrix whose structure is broken in one way (scipy builds it without looking)."""
    X = sp.random(30, 20, density=0.3, random_state=0, format="csr", dtype=np.float64)
    if kind == "indices":
        X.indices = X.indices * 1000  # column indices far outside the 20 columns
    elif kind == "indptr":
        X.indptr[7] = X.indptr[9] + 3  # decreases after row 7
    return X


@pytest.mark.parametrize("kind", ["indices", "indptr"])
def test_a_damaged_sparse_npz_is_refused_naming_the_file_and_the_row(make_cfg, tmp_path, kind):
    X = _damaged(kind)
    path = tmp_path / "bad.npz"
    np.savez(path, data=X.data, indices=X.indices, indptr=X.indptr, format=b"csr", shape=X.shape)
    for extra in ((), ("data.batch_rows=8",)):
        with pytest.raises(ValueError, match=r"bad.npz.*not a well-formed sparse matrix: .*row [0-9]+"):
            train(make_cfg("data=file", f"data.path={path}", "model.rank=3", *extra))
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("layout", ["csr", "csc", "coo"])
def test_the_estimator_refuses_damaged_sparse_input_before_any_work(layout):
    from nmf_lightning import NMF

    X = sp.random(30, 20, density=0.3, random_state=0, format=layout)
    if layout == "coo":
        X.col = X.col * 1000
    else:  # column indices of a CSR, row indices of a CSC: far outside the shape
        X.indices = X.indices * 1000
    for solver in ("cd", "mu", "adam"):
        est = NMF(3, solver=solver, max_iter=5)
        with pytest.raises(ValueError, match=r"X is not a well-formed sparse matrix: .*index \d+, outside its"):
            est.fit(X)
        assert not hasattr(est, "n_features_in_")


def test_a_damaged_h5ad_is_refused_at_its_header_or_its_rows(make_cfg, tmp_path):
    h5py = pytest.importorskip("h5py")
    for kind, where in (("indptr", r"index pointer decreases at row 7"), ("indices", r"row \d+ has column index")):
        X = _damaged(kind)
        path = tmp_path / f"{kind}.h5ad"
        with h5py.File(path, "w") as f:
            g = f.create_group("X")
            g.attrs["encoding-type"], g.attrs["shape"] = "csr_matrix", X.shape
            g["data"], g["indices"], g["indptr"] = X.data, X.indices, X.indptr
        for extra in ((), ("data.batch_rows=8",)):
            with pytest.raises(ValueError, match=rf"{kind}.h5ad.*not a well-formed sparse matrix.*{where}"):
                train(make_cfg("data=file", f"data.path={path}", "model.rank=3", *extra))


def test_transform_refuses_damaged_sparse_rows():
    from nmf_lightning.transform import transform

    with pytest.raises(ValueError, match="not a well-formed sparse matrix"):
        transform(_damaged("indices"), np.ones((3, 20)))


def test_a_damaged_sparse_tensor_file_is_refused_as_it_loads(make_cfg, tmp_path):
    import torch

    indices = torch.tensor([[0, 1, 200], [0, 5, 3]])  # row 200 of a 4-row matrix
    torch.save(torch.sparse_coo_tensor(indices, torch.ones(3), (4, 6), check_invariants=False), tmp_path / "x.pt")
    with pytest.raises(ValueError, match=r"could not read data.path=.*x.pt.*for dim 0, size is 4 but found index 200"):
        train(make_cfg("data=file", f"data.path={tmp_path / 'x.pt'}", "model.rank=2"))


def _low_rank_noisy() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.random((60, 8)) @ rng.random((8, 40)) + 0.1 * rng.random((60, 40))


SCALES = {np.float64: (1e-30, 1e-10, 1e10, 1e30), np.float32: (1e-12, 1e-6, 1e6, 1e12)}


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("solver", ["cd", "mu", "als", "kaczmarz", "adam", "sgd"])
def test_every_solver_fits_c_x_as_it_fits_x_scaled(solver, dtype):
    """The factors of c X are those of X times sqrt(c), whatever c the dtype can hold (no absolute floors)."""
    from nmf_lightning import NMF

    X = _low_rank_noisy()
    fit = NMF(5, solver=solver, random_state=0, max_iter=40, tol=0).fit(X.astype(dtype))
    rtol = 1e-6 if dtype == np.float64 else 2e-3
    for c in SCALES[dtype]:
        scaled = NMF(5, solver=solver, random_state=0, max_iter=40, tol=0).fit((c * X).astype(dtype))
        assert scaled.reconstruction_err_ / c == pytest.approx(fit.reconstruction_err_, rel=rtol), c
        np.testing.assert_allclose(scaled.components_ / np.sqrt(c), fit.components_, rtol=20 * rtol, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["hals", "adam"])
def test_the_cli_fits_a_tiny_x_as_it_fits_x(make_cfg, tmp_path, optimizer):
    X = _low_rank_noisy()
    errors = []
    for c, precision in ((1.0, "32-true"), (1e-10, "32-true"), (1e-30, "64-true")):
        np.save(tmp_path / "x.npy", c * X)
        overrides = ("data=file", f"data.path={tmp_path / 'x.npy'}", "model.rank=5", "trainer.max_steps=60")
        metrics = train(make_cfg(*overrides, f"optimizer={optimizer}", f"trainer.precision={precision}"))
        assert metrics["status"] == "completed"
        errors.append(metrics["relative_error"])
    assert errors[1] == pytest.approx(errors[0], rel=1e-3) and errors[2] == pytest.approx(errors[0], rel=1e-3)


EXACT = ("data=synthetic", "data.n_rows=60", "data.n_cols=40", "data.true_rank=3", "model.rank=3")


def test_block_sizes_leave_the_factors_alone(make_cfg, tmp_path):
    """Same config and seed, same factors: whatever the clock makes of the blocks (Gram form on a fixed grid)."""
    common = (*EXACT, "optimizer.lr=0.005", "optimizer.betas=[0.9,0.999]", "trainer.max_steps=1500", "logger=none")
    runs = []
    for inner in ("1", "7", "auto", "auto"):
        out = tmp_path / f"inner{len(runs)}"
        metrics = train(make_cfg(*common, f"model.inner_steps={inner}", f"paths.output_dir={out}"))
        runs.append([np.load(out / "factors.npz")[k] for k in "WH"])
    assert metrics["relative_error"] < 3e-3  # past 10 sqrt(eps), where the Gram form leaves for the residual
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            np.testing.assert_array_equal(a, b)


ADAM_TO_EXACT = ("optimizer.lr=0.005", "optimizer.betas=[0.9,0.999]")  # past the Gram form's switch by update 1000
#: a penalty run whose weight grows on a grid of updates (the weight reached is in the checkpoint)
GROWN = ("model.project=false", "model.lam=1", "model.lam_growth=10", "model.lam_every=20", "model.neg_tol=1e-9")


@pytest.mark.parametrize(
    ("extra", "steps", "stop"),
    [
        ((*ADAM_TO_EXACT,), 1300, 1037),
        (("optimizer=hals",), 120, 37),
        (("optimizer.lr=0.05", "data.batch_rows=16"), 120, 37),
        (("optimizer=mu", "data.batch_rows=16"), 120, 37),
        (("optimizer.lr=0.05", *GROWN), 120, 37),
    ],
    ids=["adam", "hals", "adam-streamed", "mu-streamed", "adam-lam-growth"],
)
def test_a_run_stopped_at_any_update_resumes_to_the_straight_runs_factors(
    make_cfg, tmp_path, monkeypatch, extra, steps, stop
):
    """SIGTERM at an update inside a block of updates (a streamed one is a pass), then a resume: the straight run."""
    import os
    import signal

    import nmf_lightning.engine.loop as loop
    from nmf_lightning.train import InterruptedRunError

    common = (*EXACT, f"trainer.max_steps={steps}", "model.inner_steps=auto", *extra)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(make_cfg(*common, f"paths.output_dir={straight}"))
    calls, real = [0], loop.update

    def update_then_signal(*args, **kwargs):  # the signal arrives as update `stop` is taken
        result = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == stop:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(loop, "update", update_then_signal)
    with pytest.raises(InterruptedRunError, match=f"SIGTERM after {stop} updates"):
        train(make_cfg(*common, f"paths.output_dir={stopped}"))
    monkeypatch.undo()
    resumed = train(make_cfg(*common, f"paths.output_dir={stopped}", "ckpt_path=last"))
    assert resumed["steps"] == steps and resumed["status"] == "completed"
    if "model.lam_growth=10" in extra:
        assert resumed["lam"] > 10  # grown before and after the stop
    for name in "WH":
        np.testing.assert_array_equal(np.load(straight / "factors.npz")[name], np.load(stopped / "factors.npz")[name])


def test_a_folder_in_use_or_finished_is_refused_before_hydra_writes_into_it(tmp_path):
    """The other run's .hydra/config.yaml and train.log stay as they were (nmf-transform reads its loss there)."""
    import fcntl
    import os

    from conftest import run_cli

    run, named = tmp_path / "toy", "hydra.run.dir=${hydra:runtime.choices.data}"  # as the default name reads Hydra's
    first = run_cli("data=toy", "model.rank=2", "trainer.max_steps=5", named, cwd=tmp_path, warnings=True)
    assert first.returncode == 0 and "RunFolderGuard" not in first.stderr, first.stderr  # it ran, and checked
    record = {p: p.read_bytes() for p in (run / ".hydra" / "config.yaml", run / "train.log")}
    refused = run_cli("data=toy", "model.loss=kl", "optimizer=mu", named, cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.startswith("error: ") and "holds a finished run" in refused.stderr
    lock = os.open(run / ".nmf-lightning.lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)  # a live run holds the folder
    os.write(lock, b"4242")
    try:
        busy = run_cli(
            "data=toy", "model.loss=kl", "optimizer=mu", "overwrite=true", f"hydra.run.dir={run}", cwd=tmp_path
        )
    finally:
        os.close(lock)
    assert busy.returncode == 2 and "in use by a run (PID 4242)" in busy.stderr
    assert {p: p.read_bytes() for p in record} == record


def test_factors_and_metrics_are_replaced_together_however_the_writer_dies(tmp_path, monkeypatch):
    import json
    import os

    from nmf_lightning import atomic

    def write(version):
        return {
            "factors.npz": lambda f: np.savez(f, W=np.full((2, 2), version)),
            "metrics.json": lambda f: f.write(json.dumps({"steps": version}).encode()),
        }

    def state():
        with np.load(tmp_path / "factors.npz") as f:
            return int(f["W"][0, 0]), json.loads((tmp_path / "metrics.json").read_text())["steps"]

    atomic.write_together(tmp_path, write(1))
    real, renamed = os.replace, []

    def die_after_one(src, dst):  # the process dies between the two renames
        if renamed and str(dst).endswith(("factors.npz", "metrics.json")):
            raise KeyboardInterrupt
        real(src, dst)
        renamed.append(dst)

    monkeypatch.setattr(atomic.os, "replace", die_after_one)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_together(tmp_path, write(2))
    monkeypatch.undo()
    assert (tmp_path / atomic.PENDING).exists()
    atomic.finish_pending(tmp_path)  # what the next run, nmf-transform or the sweep report does first
    assert state() == (2, 2) and not (tmp_path / atomic.PENDING).exists()
    monkeypatch.setattr(atomic, "write_atomic", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # dies before its list of renames: nothing replaced
        atomic.write_together(tmp_path, write(3))
    monkeypatch.undo()
    atomic.finish_pending(tmp_path)
    assert state() == (2, 2)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("nan", r"holds W with NaN or infinite entries: it is damaged"),
        ("negative", r"holds H with negative entries, which this run keeps >= 0"),
        ("pickle", r"holds other Python objects than a checkpoint's tensors and numbers"),
        ("truncated", r"is not a checkpoint \(truncated"),
    ],
)
def test_a_damaged_checkpoint_is_refused_in_one_line_before_resuming(make_cfg, tmp_path, damage, message):
    import torch

    common = ("data=toy", "model.rank=2", "trainer.max_steps=10")
    train(make_cfg(*common))
    path = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(path, weights_only=True)
    if damage == "nan":
        state["state_dict"]["W"][0, 0] = float("nan")
    elif damage == "negative":
        state["state_dict"]["H"][0, 0] = -1.0
    elif damage == "pickle":
        state["payload"] = _Payload()
    torch.save(state, path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ValueError, match=message) as err:
        train(make_cfg(*common[:-1], "trainer.max_steps=20", "ckpt_path=last"))
    assert "\n" not in str(err.value)


class _Payload:
    """An object a pickle would build (and a hostile one could run code while building)."""


def test_resuming_a_complete_run_says_so_and_a_raised_max_steps_trains_on(make_cfg, tmp_path, caplog):
    import logging

    done = train(make_cfg("data=toy", "model.rank=2", "trainer.max_steps=10"))
    with caplog.at_level(logging.INFO):
        again = train(make_cfg("data=toy", "model.rank=2", "trainer.max_steps=10", "ckpt_path=last"))
    assert again == done and "is complete (10 updates of trainer.max_steps=10)" in caplog.text
    more = train(make_cfg("data=toy", "model.rank=2", "trainer.max_steps=25", "ckpt_path=last"))
    assert more["steps"] == 25 and more["status"] == "completed"


def test_a_streamed_run_saves_its_checkpoint_by_its_triggers_only(make_cfg, tmp_path, monkeypatch):
    from nmf_lightning.callbacks import UpdateCheckpoint

    saved = []
    original = UpdateCheckpoint._save_last_checkpoint
    monkeypatch.setattr(
        UpdateCheckpoint,
        "_save_last_checkpoint",
        lambda self, trainer, c: saved.append(trainer.global_step) or original(self, trainer, c),
    )
    train(make_cfg(*EXACT, "optimizer=hals", "data.batch_rows=16", "trainer.max_steps=30"))
    assert saved == [30]  # every_n_minutes=10 is not due: only where training ends, not after every pass


def test_files_cut_short_or_ragged_are_named_with_the_fix(make_cfg, tmp_path):
    np.save(tmp_path / "cut.npy", np.random.default_rng(0).random((100, 10)))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "cut.npy").read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"cut.npy' as .npy: it is cut short: its header says 100x10 float64"):
        train(make_cfg("data=file", f"data.path={tmp_path / 'cut.npy'}", "model.rank=2"))
    (tmp_path / "ragged.csv").write_text("1,2,3\n4,5,6\n7,8\n9,10,11\n")
    with pytest.raises(ValueError, match=r"line 3 has 2 cells where the lines before it have 3") as err:
        train(make_cfg("data=file", f"data.path={tmp_path / 'ragged.csv'}", "model.rank=2"))
    assert "\n" not in str(err.value)


def test_a_run_refused_before_training_leaves_no_folder_of_its_own(monkeypatch, capsys, tmp_path):
    """Its error is on the console; outputs/ keeps no folder holding only Hydra's record of it."""
    import logging
    import sys

    from nmf_lightning.train import main

    np.save(tmp_path / "neg.npy", -np.ones((4, 3)))
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("the user's")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    root = logging.getLogger()
    handlers = root.handlers[:]
    try:
        for folder in ("runs/2026-12-05/neg", "kept"):
            monkeypatch.setattr(sys, "argv", ["nmf-train", "data=file", "data.path=neg.npy", f"hydra.run.dir={folder}"])
            with pytest.raises(SystemExit) as exit_:
                main()
            assert exit_.value.code == 2 and "negative entries" in capsys.readouterr().err
    finally:  # Hydra's job logging (to this test's captured stderr) is the run's, not the next test's
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
    assert not (tmp_path / "runs").exists()  # the folder and the parents made for it
    assert (tmp_path / "kept" / "notes.txt").read_text() == "the user's"  # a folder that was there stays


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model.rnak=5"], r"error: model.rnak is not a key of the config; did you mean model.rank\?"),
        (["optimizer=nope"], r"error: optimizer=nope is not one of the optimizer configs: adam, adamw, als, hals"),
        (
            ["data=file", "data.path=~/x.npy"],  # (the shell expands ~ only at a word's start)
            r"""error: data.path=~/x.npy: a value cannot start with ~ .* write data.path=\$HOME/x.npy, or quote it: """
            r"""'data.path="~/x.npy"'""",
        ),
    ],
)
def test_a_key_or_choice_that_is_not_there_is_one_line_naming_the_nearest(monkeypatch, capsys, tmp_path, args, message):
    import re
    import sys

    from nmf_lightning.train import main

    monkeypatch.setattr(sys, "argv", ["nmf-train", *args, f"hydra.run.dir={tmp_path}"])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and re.match(message, err) and err.count("\n") == 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("callbacks.model_checkpoint.every_n_updates=-5", r"every_n_updates and every_n_minutes must be >= 0"),
        ("model.tol=nan", r"model.tol must be null or a finite number >= 0, got nan"),
        ("model.lam_growth=10", r"model.lam_growth=10 grows the clamp penalty .* needs model.project=false"),
        ("model.lam_growth=0.5", r"model.lam_growth must be a finite number >= 1 \(the factor lam is multiplied"),
    ],
)
def test_config_values_out_of_range_are_one_line(make_cfg, override, message):
    with pytest.raises(ValueError, match=message) as err:
        train(make_cfg("data=toy", "model.rank=2", override))
    assert "\n" not in str(err.value)


def test_ctrl_c_before_training_and_twice_during_it_end_in_one_line(make_cfg, monkeypatch, capsys):
    import os
    import signal

    import nmf_lightning.data.datamodule as datamodule
    import nmf_lightning.engine.loop as loop
    from nmf_lightning.train import _main

    cfg = make_cfg("data=toy", "model.rank=2", "trainer.max_steps=50", "model.inner_steps=50")
    monkeypatch.setattr(datamodule, "scan", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(SystemExit) as exit_:
        _main(cfg, single=True)
    assert (
        exit_.value.code == 130
        and "interrupted before training started (Ctrl+C): nothing was written" in capsys.readouterr().err
    )
    monkeypatch.undo()
    calls, real = [0], loop.update

    def twice(*args, **kwargs):  # Ctrl+C, and Ctrl+C again, during update 5
        calls[0] += 1
        if calls[0] == 5:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "update", twice)
    with pytest.raises(SystemExit) as exit_:
        _main(cfg, single=True)
    err = capsys.readouterr().err
    assert exit_.value.code == 130 and err.startswith("error: stopped at once by a second Ctrl+C at update")


def test_transform_of_all_zero_rows_and_an_impossible_rank_say_what_they_are(tmp_path, capsys):
    from nmf_lightning import NMF
    from nmf_lightning.transform import main

    np.savez(tmp_path / "factors.npz", W=np.ones((4, 2)), H=np.ones((2, 5)))
    np.save(tmp_path / "zeros.npy", np.zeros((3, 5)))
    main([str(tmp_path), str(tmp_path / "zeros.npy"), "--out", str(tmp_path / "w.npy"), "--device", "cpu"])
    assert "the new rows are all zero, and so is W" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"n_components=1000000000000 needs .* GiB for W and H alone .* or restarts"):
        NMF(n_components=10**12).fit(np.random.default_rng(0).random((20, 10)))


# ------------------------------------------- 5. a result that is an NMF, said correctly
#: the 20 newsgroups notebook's recipe: Adam(1e-3) from |N(0, 0.01)|, the clamp penalty alone at lam = 10
NOTEBOOK_RECIPE = (
    "model.rank=30",
    "model.init=normal_abs",
    "model.project=false",
    "model.lam=10",
    "optimizer.lr=1e-3",
    "logger=none",
)


def _tf_idf_like(path: Path) -> Path:
    """300 short documents over 2000 words, rows of unit norm: a matrix of the notebook's kind."""
    from sklearn.preprocessing import normalize

    sp.save_npz(path, normalize(sp.random(300, 2000, density=0.01, random_state=0, format="csr")))
    return path


def test_a_penalty_run_left_negative_is_not_nonnegative_rather_than_collapsed(make_cfg, tmp_path):
    """H stays half negative, and clamped the factors fit worse than zero: no collapse, a result said as it is."""
    data, out = _tf_idf_like(tmp_path / "tfidf.npz"), tmp_path / "run"
    overrides = ("data=file", f"data.path={data}", *NOTEBOOK_RECIPE, "trainer.max_steps=300")
    metrics = train(make_cfg(*overrides, f"paths.output_dir={out}"))  # no error: exit code 0
    assert metrics["status"] == "not_nonnegative" and metrics["H_neg_mass"] > 0.3
    assert metrics["trained_relative_error"] < 1 <= metrics["relative_error"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["status"] == "not_nonnegative"
    for fix in ("H 4", "model.project=true", "a larger model.lam (now 10)", "model.lam_growth=10"):
        assert fix in saved["reason"], fix
    factors = np.load(out / "factors.npz")  # what was asked for: the trained factors, clamped
    assert factors["W"].min() >= 0 and factors["H"].min() >= 0 and factors["H"].any()


def test_the_penalty_schedule_gives_non_negative_factors_without_projection(make_cfg, tmp_path):
    """model.lam grown on a grid of updates: negative mass below neg_tol, clamping costs under 1%."""
    data = _tf_idf_like(tmp_path / "tfidf.npz")
    schedule = ("model.lam_growth=10", "model.lam_every=50", "trainer.max_steps=600")
    metrics = train(make_cfg("data=file", f"data.path={data}", *NOTEBOOK_RECIPE, *schedule))
    assert metrics["status"] == "completed" and metrics["lam"] >= 1e3
    assert max(metrics["W_neg_mass"], metrics["H_neg_mass"]) <= 1e-3
    assert metrics["relative_error"] <= 1.01 * metrics["trained_relative_error"] < 1


def test_a_sweep_counts_a_not_nonnegative_job_as_a_result_not_a_failure(tmp_path):
    from nmf_lightning.report import SweepSummary, report

    for job, status in (("0_a", "completed"), ("1_b", "not_nonnegative")):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- model.lam={job[0]}\n")
        metrics = {"relative_error": 0.5, "status": status}
        (tmp_path / job / "metrics.json").write_text(json.dumps(metrics))
    assert report(tmp_path, out=tmp_path / "report")["failed"] == 0
    config = type("Config", (), {"hydra": type("H", (), {"sweep": type("S", (), {"dir": str(tmp_path)})})})
    SweepSummary().on_multirun_end(config)  # no sys.exit(1)


def test_the_estimator_returns_clamped_factors_and_says_when_they_fit_worse():
    from sklearn.datasets import load_digits

    from nmf_lightning import NMF
    from nmf_lightning.console import NMFWarning

    X = load_digits().data
    model = NMF(10, solver="adam", project=False, lam=10.0, max_iter=300, random_state=0)
    with pytest.warns(NMFWarning, match=r"not non-negative .* project=True, a larger lam \(now 10\), or lam_growth=10"):
        W = model.fit_transform(X)
    H = model.components_
    assert W.min() >= 0 and H.min() >= 0  # an NMF: the trained factors clamped, as nmf-train writes them
    assert model.reconstruction_err_ == pytest.approx(np.linalg.norm(X - W @ H), rel=1e-6)
