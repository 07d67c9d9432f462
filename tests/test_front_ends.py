"""One core under every front end: nmf-train, the estimator and transform decide the math alike."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning

from nmf_lightning import NMF
from nmf_lightning.engine import DivergenceError
from nmf_lightning.solvers import registry
from nmf_lightning.train import _main, train
from nmf_lightning.transform import transform
from nmf_lightning.validation import NMFInputError

#: what the command line sets to run a solver with the estimator's (torch's) defaults
CLI_AS_ESTIMATOR = {
    "adam": ["optimizer.betas=[0.9,0.999]"],
    "adamw": ["optimizer.weight_decay=0.01"],
    "sgd": ["optimizer.lr=auto"],
}


def _x(dtype=np.float64) -> np.ndarray:
    rng = np.random.default_rng(3)
    return (rng.random((50, 4)) @ rng.random((4, 30)) + 0.01 * rng.random((50, 30))).astype(dtype)


@pytest.mark.parametrize("solver", [s.name for s in registry.SOLVERS])
def test_the_cli_and_the_estimator_give_the_same_factors(make_cfg, tmp_path, solver):
    """Same settings and seed, same factors: lr=auto, the Gram form and the init are decided once, in the engine."""
    X = _x()
    np.save(tmp_path / "X.npy", X)
    overrides = [
        "data=file", f"data.path={tmp_path / 'X.npy'}", f"optimizer={solver}", "model.rank=4", "model.loss=fro2",
        "model.init=random", "seed=7", "trainer.max_steps=40", "trainer.precision=64-true", "logger=none",
        *CLI_AS_ESTIMATOR.get(solver, []),
    ]  # fmt: skip
    train(make_cfg(*overrides))
    cli = np.load(tmp_path / "factors.npz")
    est = NMF(4, solver=solver, init="random", random_state=7, max_iter=40, tol=0)
    W = est.fit_transform(X)
    np.testing.assert_allclose(est.components_, cli["H"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(W, cli["W"], rtol=1e-9, atol=1e-12)


def test_tol_stops_both_front_ends_at_the_same_update(make_cfg, tmp_path):
    X = _x(np.float32)
    np.save(tmp_path / "X.npy", X)
    overrides = ["data=file", f"data.path={tmp_path / 'X.npy'}", "optimizer=hals", "model.rank=4", "model.loss=fro2"]
    metrics = train(make_cfg(*overrides, "model.init=nndsvda", "model.tol=1e-2", "trainer.max_steps=500"))
    est = NMF(4, solver="cd", init="nndsvda", tol=1e-2, max_iter=500).fit(X)
    assert metrics["steps"] == est.n_iter_ < 500
    np.testing.assert_allclose(est.components_, np.load(tmp_path / "factors.npz")["H"], rtol=1e-5, atol=1e-6)


def test_lr_auto_is_the_same_step_in_both_and_scales_with_x(make_cfg, tmp_path):
    """5% of the factors' scale for Adam-like optimizers: X and 1000 X train alike, on either front end."""
    X = _x()
    rel = {}
    for scale in (1.0, 1000.0):
        np.save(tmp_path / "X.npy", scale * X)
        overrides = ["data=file", f"data.path={tmp_path / 'X.npy'}", "model.rank=4", "model.loss=fro2", "seed=1"]
        metrics = train(make_cfg(*overrides, "model.init=random", "trainer.max_steps=200", "trainer.precision=64-true"))
        rel[scale] = metrics["relative_error"]
    assert rel[1.0] == pytest.approx(rel[1000.0], rel=1e-3)  # (Adam's eps is not scaled with X)
    est = NMF(4, solver="adam", init="random", random_state=1, max_iter=200, tol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.set_params(optimizer=None).fit(X)
    assert est.reconstruction_err_ / np.linalg.norm(X) < 0.1


@pytest.mark.parametrize(
    ("cli", "params", "message"),
    [
        (["optimizer=kaczmarz", "model.l1_W=0.1"], {"solver": "kaczmarz", "alpha_W": 0.1}, "takes no L1/L2 penalty"),
        (["optimizer=hals", "model.loss=kl"], {"beta_loss": "kullback-leibler"}, "fits the Frobenius loss only"),
    ],
)
def test_both_front_ends_refuse_the_same_settings_with_one_message(make_cfg, tmp_path, cli, params, message):
    with pytest.raises(NMFInputError, match=message):
        train(make_cfg("data=toy", "model.rank=2", *cli))
    with pytest.raises(NMFInputError, match=message):
        NMF(2, **params).fit(np.random.default_rng(0).random((6, 5)))
    assert not (tmp_path / "metrics.json").exists()


def test_a_fit_that_diverges_raises_the_same_error_in_both(make_cfg, tmp_path):
    from functools import partial

    overrides = ("data=digits", "model.rank=4", "optimizer=sgd", "optimizer.lr=1e6", "model.project=false")
    with pytest.raises(DivergenceError, match=r"the loss became (nan|inf) at update \d+; .*optimizer.lr=100000"):
        train(make_cfg(*overrides, "trainer.max_steps=30", "model.inner_steps=5"))
    sgd = partial(torch.optim.SGD, lr=1e6)
    with pytest.raises(DivergenceError, match=r"the loss became (nan|inf) at update \d+; .*lr=100000"):
        NMF(4, optimizer=sgd, project=False, max_iter=30, tol=0).fit(np.random.default_rng(0).random((40, 20)) * 16)


def test_transform_is_the_estimators_transform_and_nmf_transforms(tmp_path):
    X = _x()
    est = NMF(4, random_state=0, max_iter=300).fit(X)
    new = X[:7] * 1.5
    np.testing.assert_allclose(est.transform(new), transform(new, est.components_, tol=est.tol, max_iter=300))


def test_an_experiment_takes_another_optimizer_without_the_keys_of_its_own(make_cfg, tmp_path):
    """experiment=synthetic_known_factors sets Adam's lr and betas; optimizer=hals leaves them out, and says so."""
    with pytest.warns(UserWarning, match=r"optimizer=hals takes no lr, betas .*left out"):
        metrics = train(make_cfg("experiment=synthetic_known_factors", "optimizer=hals", "trainer.max_steps=200"))
    assert metrics["relative_error"] < 1e-6  # HALS recovers the notebook's known factors


def test_bad_input_exits_2_in_one_line_and_a_bug_shows_its_traceback(make_cfg, monkeypatch, capsys):
    cfg = make_cfg("data=toy")
    monkeypatch.setattr("nmf_lightning.train.train", lambda cfg: (_ for _ in ()).throw(NMFInputError("bad X")))
    with pytest.raises(SystemExit) as exit_:
        _main(cfg, single=True)
    assert exit_.value.code == 2 and capsys.readouterr().err == "error: bad X\n"
    monkeypatch.setattr("nmf_lightning.train.train", lambda cfg: {}["missing"])  # a bug: a KeyError
    with pytest.raises(KeyError, match="missing"):
        _main(cfg, single=True)


def test_the_docs_engine_example_converges():
    """The engine page's Python example, run as it is written there, converges."""
    from pathlib import Path

    section = (Path(__file__).resolve().parents[1] / "docs/engine.md").read_text()
    code = section[section.index("```python\n") + len("```python\n") : section.index("```\n", 10)]
    namespace: dict = {}
    exec(compile(code, "engine.md", "exec"), namespace)  # noqa: S102 - the page's own example
    assert namespace["result"].converged and float(namespace["problem"].loss(namespace["W"], namespace["H"])) > 0
