"""The scikit-learn estimator: scikit-learn's own checks, pipelines, the engine's numbers."""

import pickle
import subprocess
import sys
import warnings

import joblib
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.decomposition import NMF as SKNMF
from sklearn.decomposition._nmf import _beta_divergence
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks

from nmf_lightning import NMF, non_negative_factorization
from nmf_lightning.data import digits


@parametrize_with_checks([NMF(), NMF(max_iter=500)])
def test_scikit_learn_checks(estimator, check):
    check(estimator)


def _low_rank(n: int, m: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((n, k)) @ rng.random((k, m))


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def X_digits():
    return digits().X


@pytest.mark.parametrize("beta_loss", ["kullback-leibler", "itakura-saito", 1.5])
def test_beta_losses_match_scikit_learn_from_the_same_start(X_digits, beta_loss):
    X = X_digits[:300] + (1.0 if beta_loss == "itakura-saito" else 0.0)  # IS needs X > 0
    rng = np.random.default_rng(0)
    W0, H0 = rng.random((len(X), 8)), rng.random((8, 64))
    common = {"init": "custom", "solver": "mu", "beta_loss": beta_loss, "max_iter": 50, "tol": 0}
    ours = NMF(8, **common)
    W = ours.fit_transform(X, W=W0, H=H0)
    ref = SKNMF(8, **common)
    W_ref = ref.fit_transform(X, W=W0.copy(), H=H0.copy())
    np.testing.assert_allclose(W, W_ref, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(ours.components_, ref.components_, rtol=1e-7, atol=1e-9)
    assert ours.reconstruction_err_ == pytest.approx(ref.reconstruction_err_, rel=1e-9)
    # transform fits new rows on the same divergence, and score reports it as reconstruction_err_ does
    W_new = ours.transform(X[:50])
    assert W_new.shape == (50, 8) and (W_new >= 0).all()
    assert -ours.score(X[:50]) < 1.5 * np.sqrt(2 * _beta_divergence(X[:50], W[:50], ours.components_, beta_loss))


def test_kl_by_adam_fits_counts():
    X = sp.random(200, 80, density=0.1, random_state=0, format="csr")
    X.data = np.ceil(5 * X.data)
    common = {"beta_loss": "kullback-leibler", "max_iter": 300, "tol": 0, "random_state": 0, "init": "random"}
    est = NMF(5, solver="adam", **common).fit(X)
    by_mu = NMF(5, solver="mu", **common).fit(X)
    start = NMF(5, solver="adam", **{**common, "max_iter": 1}).fit(X)
    assert est.reconstruction_err_ < 1.01 * by_mu.reconstruction_err_ < 0.9 * start.reconstruction_err_
    assert (est.components_ >= 0).all()


@pytest.mark.parametrize("solver", ["cd", "mu"])
def test_matches_scikit_learn(X_digits, solver):
    """Same X, start and seed: the same reconstruction error as scikit-learn (well within 1%).

    The default starts differ (nndsvda's zeros are filled at the factors' scale here, at X's
    mean there), and ours must fit at least as well.
    """
    from sklearn.decomposition._nmf import _initialize_nmf

    W0, H0 = _initialize_nmf(X_digits, 16, init="nndsvda", random_state=0)
    ours = _quiet(NMF(16, solver=solver, init="custom").fit, X_digits, W=W0, H=H0)
    ref = _quiet(SKNMF(16, solver=solver, init="custom").fit, X_digits, W=W0.copy(), H=H0.copy())
    assert ours.reconstruction_err_ <= 1.01 * ref.reconstruction_err_
    assert ours.reconstruction_err_ >= 0.97 * ref.reconstruction_err_
    assert ours.components_.shape == ref.components_.shape == (16, 64)
    assert ours.n_iter_ <= 200 and ours.n_components_ == 16 and ours.n_features_in_ == 64
    default = _quiet(NMF(16, solver=solver, random_state=0).fit, X_digits)
    assert (
        default.reconstruction_err_
        <= 1.01 * _quiet(SKNMF(16, solver=solver, random_state=0).fit, X_digits).reconstruction_err_
    )


def test_fit_transform_equals_fit_then_transform(X_digits):
    est = NMF(8, max_iter=1000, tol=1e-8, random_state=0)
    W = est.fit_transform(X_digits)
    np.testing.assert_allclose(W, est.transform(X_digits), atol=1e-2)  # scikit-learn's check uses atol 1e-2
    np.testing.assert_allclose(est.inverse_transform(W), W @ est.components_)
    expected = np.linalg.norm(X_digits - W @ est.components_)
    assert est.reconstruction_err_ == pytest.approx(expected, rel=1e-9)
    assert list(est.get_feature_names_out()) == [f"nmf{i}" for i in range(8)]


def test_sparse_and_dense_give_the_same_fit():
    X = _low_rank(60, 40, 4, 1)
    median = np.quantile(X, 0.5)
    X[median > X] = 0
    dense = NMF(4, init="random", max_iter=50, tol=0, random_state=0).fit(X)
    sparse = NMF(4, init="random", max_iter=50, tol=0, random_state=0).fit(sp.csr_matrix(X))
    np.testing.assert_allclose(sparse.components_, dense.components_, rtol=1e-6, atol=1e-9)
    assert sparse.reconstruction_err_ == pytest.approx(dense.reconstruction_err_, rel=1e-8)
    np.testing.assert_allclose(sparse.transform(sp.csc_matrix(X)), dense.transform(X), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("solver", ["cd", "mu", "als", "adam"])
def test_missing_entries_are_skipped(solver):
    """NaN entries do not count: the fit recovers them from the low-rank structure."""
    truth = _low_rank(80, 50, 3, 2)
    rng = np.random.default_rng(0)
    X = truth.copy()
    hidden = rng.random(X.shape) < 0.2
    X[hidden] = np.nan
    est = NMF(3, solver=solver, init="random", max_iter=400, random_state=0)
    W = _quiet(est.fit_transform, X)
    observed_err = np.linalg.norm((truth - W @ est.components_)[~hidden])
    assert est.reconstruction_err_ == pytest.approx(observed_err, rel=1e-6)
    assert est.reconstruction_err_ < 0.05 * np.linalg.norm(truth[~hidden])
    assert np.linalg.norm((truth - W @ est.components_)[hidden]) < 0.1 * np.linalg.norm(truth[hidden])
    assert (est.components_ >= 0).all() and (W >= 0).all()
    # score solves W again for the fixed components: no worse than the fit's W
    assert 0 < -est.score(X) <= 1.01 * est.reconstruction_err_


def test_pipeline_with_tfidf_and_grid_search():
    rng = np.random.default_rng(0)
    topics = [["gpu", "kernel", "cuda", "tensor", "memory"], ["goal", "match", "team", "league", "coach"]]
    docs = [" ".join(rng.choice(topics[i % 2], size=12)) for i in range(40)]
    pipe = Pipeline([("tfidf", TfidfVectorizer()), ("nmf", NMF(2, random_state=0))])
    W = _quiet(pipe.fit_transform, docs)
    assert W.shape == (40, 2) and (W >= 0).all()
    assert (W[::2].argmax(1) != W[1::2].argmax(1)).all()  # the two topics are told apart
    search = GridSearchCV(NMF(random_state=0, max_iter=100), {"n_components": [1, 3]}, cv=2)
    _quiet(search.fit, TfidfVectorizer().fit_transform(docs))
    assert search.best_params_ == {"n_components": 3}  # more components, lower held-out error


def test_same_factors_as_the_command_line(make_cfg, tmp_path):
    """The estimator runs the engine nmf-train runs: the same settings and seed give the same factors."""
    from nmf_lightning.train import train

    X = _low_rank(50, 30, 4, 3).astype(np.float32)
    np.save(tmp_path / "X.npy", X)
    overrides = ["data=file", f"data.path={tmp_path / 'X.npy'}", "optimizer=hals", "model.rank=4"]
    train(make_cfg(*overrides, "model.init=random", "seed=7", "trainer.max_steps=30", "logger=none"))
    cli = np.load(tmp_path / "factors.npz")
    est = NMF(4, solver="cd", init="random", random_state=7, max_iter=30, tol=0)
    W = est.fit_transform(X)
    assert W.dtype == est.components_.dtype == np.float32
    np.testing.assert_allclose(est.components_, cli["H"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(W, cli["W"], rtol=1e-4, atol=1e-5)


def test_a_fit_is_quiet(X_digits, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    NMF(5, max_iter=20, tol=0, random_state=0).fit(X_digits)
    assert capsys.readouterr() == ("", "")
    assert list(tmp_path.iterdir()) == []


def test_verbose_and_log_dir(X_digits, tmp_path, capsys):
    NMF(5, max_iter=20, tol=0, random_state=0, verbose=1, log_dir=str(tmp_path / "tb")).fit(X_digits)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["NMF update 10", "NMF update 20"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/relative_error")] == [10, 20]


def test_verbose_stops_where_a_quiet_fit_does(X_digits):
    quiet = NMF(5, tol=1e-3, max_iter=500, random_state=0).fit(X_digits)
    loud = NMF(5, tol=1e-3, max_iter=500, random_state=0, verbose=1).fit(X_digits)
    assert quiet.n_iter_ == loud.n_iter_ < 500
    np.testing.assert_array_equal(quiet.components_, loud.components_)


def test_import_and_fit_leave_lightning_and_hydra_out():
    code = (
        "import sys; from nmf_lightning import NMF; import numpy as np;"
        "NMF(2, max_iter=5, solver='adam').fit(np.random.default_rng(0).random((20, 6)));"
        "NMF(2, max_iter=5).fit(np.random.default_rng(0).random((20, 6)));"
        "print(sorted(m for m in ('lightning', 'hydra', 'omegaconf', 'tensorboard', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]"


def test_pickle_and_joblib_round_trip(X_digits, tmp_path):
    est = _quiet(NMF(4, random_state=0, max_iter=50).fit, X_digits)
    W = est.transform(X_digits[:20])
    for loaded in (pickle.loads(pickle.dumps(est)), joblib.load(joblib.dump(est, tmp_path / "nmf.joblib")[0])):
        np.testing.assert_array_equal(loaded.components_, est.components_)
        np.testing.assert_allclose(loaded.transform(X_digits[:20]), W)


def test_partial_fit_learns_online(X_digits):
    rng = np.random.default_rng(0)
    X = X_digits[rng.permutation(len(X_digits))]
    online = NMF(8, random_state=0, init="random", max_iter=50)
    for _ in range(3):
        for start in range(0, len(X), 200):
            _quiet(online.partial_fit, X[start : start + 200])
    assert online.n_steps_ == 3 * 9
    batch = _quiet(NMF(8, random_state=0, init="random").fit, X)
    err = np.linalg.norm(X - online.transform(X) @ online.components_)
    assert err < 1.1 * batch.reconstruction_err_
    restored = pickle.loads(pickle.dumps(online))  # running sums survive a pickle
    _quiet(restored.partial_fit, X[:200])
    _quiet(online.partial_fit, X[:200])
    np.testing.assert_allclose(restored.components_, online.components_)
    with pytest.raises(ValueError, match="partial_fit .*'cd'"):
        NMF(4, solver="als").partial_fit(X[:100])


def test_custom_init_and_non_negative_factorization(X_digits):
    rng = np.random.default_rng(0)
    W0, H0 = rng.random((len(X_digits), 5)), rng.random((5, 64))
    est = NMF(init="custom", max_iter=10, tol=0).fit(X_digits, W=W0, H=H0)
    assert est.n_components_ == 5
    W, H, n_iter = non_negative_factorization(X_digits, W0, H0, init="custom", max_iter=10, tol=0)
    np.testing.assert_allclose(H, est.components_)
    assert n_iter == 10 and W.shape == (len(X_digits), 5)
    W_only, H_same, _ = non_negative_factorization(X_digits, H=H, update_H=False, max_iter=10, tol=0)
    np.testing.assert_array_equal(H_same, H)
    np.testing.assert_allclose(W_only, est.transform(X_digits))
    with pytest.raises(ValueError, match="init='custom' starts from the W and H"):
        NMF(init="custom").fit(X_digits)
    with pytest.raises(ValueError, match=r"H must have shape \(5, 64\)"):
        NMF(5, init="custom").fit(X_digits, W=W0, H=H0[:, :10])


def test_restarts_keep_the_best(X_digits):
    single = [_quiet(NMF(6, init="random", random_state=s, max_iter=30).fit, X_digits) for s in range(3)]
    best = _quiet(NMF(6, init="random", random_state=0, restarts=3, max_iter=30).fit, X_digits)
    errs = [e.reconstruction_err_ for e in single]
    assert best.reconstruction_err_ == pytest.approx(min(errs), rel=1e-6)
    np.testing.assert_allclose(best.components_, single[int(np.argmin(errs))].components_, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("solver", ["cd", "mu", "als"])
def test_row_blocks_give_the_fit_of_x_whole(X_digits, solver):
    whole = NMF(6, solver=solver, random_state=0, max_iter=20, tol=0).fit(X_digits)
    blocks = NMF(6, solver=solver, random_state=0, max_iter=20, tol=0, batch_rows=500).fit(X_digits)
    np.testing.assert_allclose(blocks.components_, whole.components_, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("solver", ["adam", "sgd"])
def test_gradient_solvers_fit_at_any_scale(solver):
    """The default lr follows the data's scale: X and 1000 X give the same relative error."""
    X = _low_rank(60, 40, 3, 4)
    rel = []
    for scale in (1.0, 1000.0):
        est = _quiet(NMF(3, solver=solver, init="random", random_state=0, max_iter=300).fit, scale * X)
        rel.append(est.reconstruction_err_ / np.linalg.norm(scale * X))
        assert (est.components_ >= 0).all()
    assert rel[0] == pytest.approx(rel[1], rel=1e-3)
    assert rel[0] < (0.05 if solver == "adam" else 0.5)


def test_optimizer_factory():
    from functools import partial

    import torch

    X = _low_rank(40, 30, 2, 5)
    est = _quiet(NMF(2, optimizer=partial(torch.optim.Adam, lr=0.05), random_state=0, max_iter=200).fit, X)
    assert est.reconstruction_err_ < 0.1 * np.linalg.norm(X)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"n_components": 0}, "n_components must be an integer >= 1"),
        ({"solver": "lbfgs"}, "solver must be one of .*got 'lbfgs'"),
        ({"beta_loss": "kl"}, "beta_loss must be one of 'frobenius'.*got 'kl'"),
        ({"beta_loss": "kullback-leibler"}, "solver='cd' fits the Frobenius loss only"),
        ({"max_iter": 0}, "max_iter must be an integer >= 1"),
        ({"tol": -1}, "tol must be None or a finite number >= 0"),
        ({"l1_ratio": 2}, "l1_ratio must be a finite number >= 0 and <= 1"),
        ({"lr": 0.1}, "lr, lam and project=False act on gradient solvers"),
        ({"precision": "8"}, "precision must be None or one of .*got '8'"),
        ({"device": "tpu:x"}, "device='tpu:x' is not a device"),
        ({"init": "nndsvd", "n_components": 100}, "init='nndsvd' needs n_components <= "),
        ({"solver": "kaczmarz", "batch_rows": 10}, "solver='kaczmarz' samples rows anywhere"),
    ],
)
def test_bad_parameters_are_named(params, message):
    with pytest.raises(ValueError, match=message):
        NMF(**params).fit(np.random.default_rng(0).random((20, 8)))


def test_bad_data_is_named():
    with pytest.raises(ValueError, match="Negative values in data passed to NMF"):
        NMF(2).fit(-np.ones((5, 4)))
    with pytest.raises(ValueError, match="no positive entry"):
        NMF(2).fit(np.zeros((5, 4)))
    X = np.random.default_rng(0).random((10, 4))
    X[0, 0] = np.nan
    with pytest.raises(ValueError, match="solver='kaczmarz' cannot skip missing"):
        NMF(2, solver="kaczmarz").fit(X)
    for zeros in (np.eye(6), sp.eye(6, format="csr")):
        with pytest.raises(ValueError, match="is defined for X > 0 only, and X has zero entries"):
            NMF(2, solver="mu", beta_loss="itakura-saito").fit(zeros)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="tests the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_named():
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        NMF(2, device="cuda").fit(np.random.default_rng(0).random((10, 4)))


@pytest.mark.parametrize("solver", ["cd", "kaczmarz", "adam"])
def test_random_state_decides_the_fit(solver):
    X = _low_rank(50, 20, 3, 6)

    def components(seed):
        return _quiet(NMF(3, solver=solver, init="random", random_state=seed, max_iter=20).fit, X).components_

    np.testing.assert_array_equal(components(1), components(1))
    assert not np.array_equal(components(1), components(2))


def test_custom_factors_are_copied_and_both_needed(X_digits):
    rng = np.random.default_rng(1)
    W0, H0 = rng.random((len(X_digits), 4)), rng.random((4, 64))
    W0_before, H0_before = W0.copy(), H0.copy()
    W = NMF(4, init="custom", max_iter=5, tol=0).fit_transform(X_digits, W=W0, H=H0)
    np.testing.assert_array_equal(W0, W0_before)
    np.testing.assert_array_equal(H0, H0_before)
    assert not np.shares_memory(W, W0)
    with pytest.raises(ValueError, match="init='custom' needs W"):
        NMF(4, init="custom", solver="mu").fit(X_digits, H=H0)
    with pytest.warns(RuntimeWarning, match="not used; set init='custom'"):
        NMF(4, init="random", max_iter=2, tol=0).fit(X_digits, W=W0, H=H0)


def test_transform_keeps_the_w_penalty():
    """transform solves the fit's W problem, alpha_W included, as scikit-learn's does."""
    X = _low_rank(40, 10, 3, 7)
    ours = NMF(3, alpha_W=0.05, l1_ratio=1.0, max_iter=1000, tol=1e-8, random_state=0)
    W_fit = ours.fit_transform(X)
    np.testing.assert_allclose(ours.transform(X).sum(), W_fit.sum(), rtol=0.05)
    ref = SKNMF(3, alpha_W=0.05, l1_ratio=1.0, max_iter=1000, tol=1e-8, random_state=0).fit(X)
    W_ref, _, _ = non_negative_factorization(X, H=ref.components_, update_H=False, alpha_W=0.05, l1_ratio=1.0)
    np.testing.assert_allclose(W_ref.sum(), ref.transform(X).sum(), rtol=0.02)


def test_new_rows_may_be_all_zero():
    est = NMF(3, random_state=0).fit(_low_rank(30, 8, 3, 8))
    np.testing.assert_array_equal(est.transform(np.zeros((2, 8))), np.zeros((2, 3)))
    np.testing.assert_array_equal(est.transform(sp.csr_matrix((2, 8))), np.zeros((2, 3)))


def test_partial_fit_edges():
    X = _low_rank(60, 8, 3, 9)
    est = NMF(5, init="nndsvda", random_state=0)
    est.partial_fit(X[:20])
    est.partial_fit(X[20:23])  # a short last batch: the init is not checked again
    assert est.components_.shape == (5, 8) and est.n_components_ == 5
    with pytest.raises(ValueError, match="fitted components_ has 5 rows"):
        est.set_params(n_components=4).partial_fit(X[:20])
    with pytest.raises(ValueError, match="partial_fit follows one start"):
        NMF(3, init="random", restarts=2).partial_fit(X)


def test_non_negative_factorization_with_h_fixed_counts_its_updates():
    X = _low_rank(30, 8, 3, 10) + 0.1 * np.random.default_rng(0).random((30, 8))
    H = NMF(3, random_state=0).fit(X).components_
    W, H_same, n_iter = non_negative_factorization(X[:5], H=H, update_H=False, init="nndsvda", tol=1e-3)
    assert W.shape == (5, 3) and H_same is not None and 10 <= n_iter < 200 and n_iter % 10 == 0
    with pytest.raises(ValueError, match="n_components=2 but H has 3 rows"):
        non_negative_factorization(X, H=H, n_components=2, update_H=False)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"tol": float("nan")}, "tol must be None or a finite number"),
        ({"alpha_W": float("inf")}, "alpha_W must be a finite number"),
        ({"random_state": -1}, "random_state must be None"),
        ({"project": "no", "solver": "adam"}, "project must be True or False"),
        ({"l1_ratio": True}, "l1_ratio must be a finite number"),
        ({"optimizer": "adam"}, "optimizer must be a factory"),
        ({"optimizer": __import__("torch").optim.Adam, "lr": 0.1}, "lr and optimizer= are both set"),
        ({"device": "meta"}, "runs on 'cpu' or 'cuda'"),
        ({"init": "custom", "restarts": 2}, "restarts=2 would train identical copies"),
        ({"solver": "als", "precision": "bf16"}, "solver='als' solves k x k systems"),
    ],
)
def test_more_bad_parameters_are_named_before_the_data(params, message):
    est = NMF(**params)
    with pytest.raises(ValueError, match=message):
        est.fit([[-1.0]])  # the parameters are checked before X (which is bad too)
    assert not hasattr(est, "n_features_in_")  # X was never read into this instance


def test_restarts_with_the_default_init_keep_its_start_and_add_random_ones():
    """init=None's nndsvda starts restart 0 (the single fit's start), the others random: never worse than one start."""
    from sklearn.datasets import load_breast_cancer, load_wine

    for X, k in ((load_breast_cancer().data, 5), (load_wine().data, 3)):  # features of very different scales
        one = _quiet(NMF(k, random_state=0).fit, X)
        best = _quiet(NMF(k, restarts=4, random_state=0).fit, X)
        assert best.reconstruction_err_ <= one.reconstruction_err_ * (1 + 1e-9)
        random = _quiet(NMF(k, init="random", restarts=3, random_state=1).fit, X)
        assert random.reconstruction_err_ > one.reconstruction_err_  # (what restarts of random starts alone gave)
    X = _low_rank(40, 30, 4, 0)
    W, H = NMF(4, restarts=3, random_state=0)._problem(X).initial_factors()
    W0, H0 = NMF(4, random_state=0)._problem(X).initial_factors()
    torch.testing.assert_close((W[0], H[0]), (W0, H0))
    W_r, H_r = NMF(4, init="random", restarts=2, random_state=1)._problem(X).initial_factors()
    torch.testing.assert_close((W[1:], H[1:]), (W_r, H_r))  # seeds 1 and 2: random draws


def test_a_read_only_or_all_missing_x_gives_no_warning_of_the_libraries_underneath():
    """A pandas frame's values are a read-only view: the fit copies them (torch warned); all-NaN X is one error."""
    X = _low_rank(30, 12, 3, 0)
    X.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the fit
        warnings.simplefilter("ignore", ConvergenceWarning)
        NMF(3, max_iter=20, random_state=0).fit(X)
        with pytest.raises(ValueError, match=r"X has no observed entries: all 20 are missing"):
            NMF(3).fit(np.full((5, 4), np.nan))
