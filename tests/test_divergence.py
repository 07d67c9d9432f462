"""The beta-divergence losses: values, gradients and MU updates against scikit-learn, and the run around them."""

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.decomposition._nmf import _beta_divergence, _fit_multiplicative_update
from torch.utils._python_dispatch import TorchDispatchMode

from nmf_lightning.data import spectrogram
from nmf_lightning.divergence import elementwise, loss_beta, mu_exponent
from nmf_lightning.engine import MaskedBlock, SolverUpdate, fit, to_block
from nmf_lightning.solvers import mu
from nmf_lightning.solvers.rules import MURule
from nmf_lightning.train import train
from nmf_lightning.validation import NMFInputError

BETAS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)


def _x(sparse: bool, n: int = 40, m: int = 30, seed: int = 1):
    if sparse:
        return sp.random(n, m, density=0.3, random_state=seed, format="csr") * 3
    return np.random.default_rng(seed).random((n, m)) + 0.1


def _factors(n: int = 40, m: int = 30, k: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.random((n, k)), rng.random((k, m))


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("beta", BETAS)
def test_divergence_and_gradients_equal_scikit_learn_and_autograd(sparse, beta):
    if sparse and beta <= 0:
        pytest.skip("Itakura-Saito needs X > 0")
    X = _x(sparse)
    W, H = _factors()
    t = to_block(X, torch.float64)
    Wt, Ht = torch.from_numpy(W), torch.from_numpy(H)
    d, dW, dH = t.div_and_grads(Wt, Ht, beta)
    assert float(d) == pytest.approx(_beta_divergence(X, W, H, beta), rel=1e-12)
    Wg, Hg = Wt.clone().requires_grad_(), Ht.clone().requires_grad_()
    Xd = torch.from_numpy(X.toarray() if sparse else X)
    elementwise(Xd, Wg @ Hg, beta).sum().backward()
    torch.testing.assert_close(dW, Wg.grad)
    torch.testing.assert_close(dH, Hg.grad)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("beta", BETAS)
def test_mu_equals_scikit_learn_with_penalties_and_never_increases_the_divergence(sparse, beta):
    if sparse and beta <= 0:
        pytest.skip("Itakura-Saito needs X > 0")
    X = _x(sparse)
    W0, H0 = _factors()
    t = to_block(X, torch.float64)
    W, H = torch.from_numpy(W0.copy()), torch.from_numpy(H0.copy())
    values = []
    for _ in range(40):
        W = mu.update_w(t, W, H, 0.01, 0.02, beta=beta)
        H = mu.update_h(t, W, H, 0.03, 0.0, beta=beta)
        values.append(float(t.divergence(W, H, beta)))
    Ws, Hs, _ = _fit_multiplicative_update(
        X, W0.copy(), H0.copy(), beta_loss=beta, max_iter=40, tol=0, l1_reg_W=0.01, l1_reg_H=0.03, l2_reg_W=0.02
    )
    np.testing.assert_allclose(W.numpy(), Ws, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(H.numpy(), Hs, rtol=1e-9, atol=1e-12)
    without_penalties = [values[0]]
    W, H = torch.from_numpy(W0.copy()), torch.from_numpy(H0.copy())
    for _ in range(40):
        W = mu.update_w(t, W, H, beta=beta)
        H = mu.update_h(t, W, H, beta=beta)
        without_penalties.append(float(t.divergence(W, H, beta)))
    assert all(b <= a * (1 + 1e-12) for a, b in zip(without_penalties[1:], without_penalties[2:], strict=False))


@pytest.mark.parametrize("beta", [0.0, 1.0, 1.5])
def test_masked_entries_change_nothing_and_triplets_agree(beta):
    X = _x(False)
    keep = np.random.default_rng(3).random(X.shape) > 0.3
    W0, H0 = (torch.from_numpy(A) for A in _factors())
    results = []
    for fill in (0.0, 1e3):  # whatever the missing entries hold
        Xm = np.where(keep, X, np.nan)
        t = to_block(Xm, torch.float64, triplets=False)
        t.X = torch.where(t.mask, t.X, torch.tensor(fill, dtype=torch.float64))
        t = MaskedBlock(t.X, t.mask)  # re-zeroes the missing entries
        W, H = W0.clone(), H0.clone()
        fit(t, W, H, SolverUpdate(MURule(beta)), 30)
        results.append((W, H, float(t.divergence(W, H, beta))))
    triplets = to_block(np.where(keep, X, np.nan), torch.float64, triplets=True)
    W, H = W0.clone(), H0.clone()
    fit(triplets, W, H, SolverUpdate(MURule(beta)), 30)
    for other in results[1:] + [(W, H, float(triplets.divergence(W, H, beta)))]:
        torch.testing.assert_close(other[0], results[0][0])
        torch.testing.assert_close(other[1], results[0][1])
        assert other[2] == pytest.approx(results[0][2], rel=1e-10)
    observed = elementwise(torch.from_numpy(X[keep]), (W @ H)[torch.from_numpy(keep)], beta).sum()
    assert results[0][2] == pytest.approx(float(observed), rel=1e-10)


class _LargestTensor(TorchDispatchMode):
    """Records the most entries any tensor made inside the block had."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, tuple | list) else (out,):
            if isinstance(value, torch.Tensor) and value.layout == torch.strided:
                self.largest = max(self.largest, value.numel())
        return out


def test_sparse_kl_never_builds_a_rows_by_columns_tensor():
    n, m, k = 400, 500, 6
    X = sp.random(n, m, density=0.01, random_state=0, format="csr") * 5
    t = to_block(X, torch.float64)
    W, H = (torch.from_numpy(A) for A in _factors(n, m, k))
    update = SolverUpdate(MURule(1.0))
    with _LargestTensor() as probe:
        fit(t, W, H, update, 3)
        t.div_and_grads(W, H, 1.0)
        t.divergence(W, H, 1.0)
    assert probe.largest < 10 * X.nnz < n * m
    with _LargestTensor() as dense:
        t.divergence(W, H, 1.5)  # any other beta reads all of W H
    assert dense.largest >= n * m


def test_loss_names_and_mu_exponents():
    assert loss_beta("kl") == 1 and loss_beta("is") == 0 and loss_beta("beta", 0.5) == 0.5
    assert loss_beta("fro") is None
    assert (mu_exponent(0.0), mu_exponent(1.0), mu_exponent(3.0)) == (0.5, 1.0, 0.5)
    with pytest.raises(ValueError, match="model.loss=beta needs model.beta"):
        loss_beta("beta")
    with pytest.raises(ValueError, match="model.loss=kl is the beta-divergence with beta=1"):
        loss_beta("kl", 0.5)
    with pytest.raises(ValueError, match="model.beta=1.5 applies to model.loss=beta only"):
        loss_beta("fro", 1.5)


def test_kl_from_the_cli_config_reports_scikit_learns_divergence_of_its_factors(make_cfg, tmp_path):
    X = sp.random(80, 60, density=0.2, random_state=0, format="csr")
    X.data = np.ceil(X.data * 4)  # counts
    sp.save_npz(tmp_path / "x.npz", X)
    common = ("data=file", f"data.path={tmp_path / 'x.npz'}", "model.loss=kl", "optimizer=mu", "model.rank=5")
    metrics = train(make_cfg(*common, "trainer.max_steps=60", "trainer.precision=64-true"))
    with np.load(tmp_path / "factors.npz") as f:
        W, H = f["W"], f["H"]
    assert metrics["divergence"] == pytest.approx(_beta_divergence(X, W, H, 1), rel=1e-9)
    assert metrics["loss"] == metrics["reconstruction"] == metrics["divergence"]
    held_out = train(make_cfg(*common, "trainer.max_steps=20", "data.holdout=0.1", "optimized_metric=val_divergence"))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert held_out == saved and 0 < saved["val_divergence"] < saved["divergence"]


@pytest.mark.parametrize(("optimizer", "steps", "bound"), [("mu", 150, 0.3), ("adam", 1500, 0.5)])
def test_itakura_saito_fits_the_synthetic_spectrogram(make_cfg, tmp_path, optimizer, steps, bound):
    metrics = train(
        make_cfg(
            "data=spectrogram", "model.loss=is", f"optimizer={optimizer}", "model.rank=4", f"trainer.max_steps={steps}"
        )
    )
    X = spectrogram().X
    # the Gamma(2) noise alone costs log 2 - digamma(2) = 0.27 per entry at the true spectra
    per_entry = metrics["divergence"] / X.size
    assert 0.2 < per_entry < bound
    with np.load(tmp_path / "factors.npz") as f:
        W, H = f["W"], f["H"]
    assert metrics["divergence"] == pytest.approx(_beta_divergence(X, W.astype(float), H.astype(float), 0), rel=1e-4)


def test_beta_loss_limits_are_named_before_training(make_cfg, tmp_path):
    X = np.random.default_rng(0).random((20, 10))
    X[0, 0] = 0.0
    np.save(tmp_path / "x.npy", X)
    data = ("data=file", f"data.path={tmp_path / 'x.npy'}", "model.rank=3", "trainer.max_steps=5")
    with pytest.raises(
        NMFInputError, match=r"the Itakura-Saito divergence \(model.loss=is\) is defined for X > 0 only"
    ):
        train(make_cfg(*data, "model.loss=is", "optimizer=mu"))
    with pytest.raises(NMFInputError, match="optimizer=hals fits the Frobenius loss only, not model.loss=kl"):
        train(make_cfg(*data, "model.loss=kl", "optimizer=hals"))
    with pytest.raises(NMFInputError, match="defined for W H >= 0 only"):
        train(make_cfg(*data, "model.loss=kl", "model.project=false"))
    with pytest.raises(NMFInputError, match="model.loss=beta needs model.beta"):
        train(make_cfg(*data, "model.loss=beta"))
    assert not (tmp_path / "metrics.json").exists()
    assert not list(tmp_path.rglob("events.out.tfevents*"))  # refused as the module set up: no empty run


def test_beta_2_is_scikit_learns_frobenius_loss(make_cfg):
    common = ("data=digits", "model.rank=8", "trainer.max_steps=30", "trainer.precision=64-true")
    as_beta = train(make_cfg(*common, "model.loss=beta", "model.beta=2"))
    as_fro2 = train(make_cfg(*common, "model.loss=fro2"))
    assert as_beta["loss"] == pytest.approx(as_fro2["loss"], rel=1e-12)
    assert as_beta["divergence"] == pytest.approx(as_fro2["loss"], rel=1e-12)


def test_general_beta_trains_by_gradient_and_by_mu(make_cfg):
    common = ("data=synthetic", "model.loss=beta", "model.beta=1.5", "model.rank=20", "trainer.max_steps=400")
    for optimizer in (("optimizer=mu",), ("optimizer=adam", "optimizer.lr=0.01")):
        metrics = train(make_cfg(*common, *optimizer))
        assert metrics["relative_error"] < 0.05
        assert metrics["loss"] == metrics["divergence"] > 0


@pytest.mark.parametrize("optimizer", ["mu", "adam"])
def test_streamed_rows_give_the_in_memory_result(make_cfg, tmp_path, optimizer):
    X = sp.random(90, 60, density=0.2, random_state=0, format="csr")
    X.data = np.ceil(X.data * 4)
    Xm = X.toarray()
    Xm[np.random.default_rng(0).random(Xm.shape) < 0.1] = np.nan
    sp.save_npz(tmp_path / "x.npz", X)
    np.save(tmp_path / "m.npy", Xm)
    for name in ("x.npz", "m.npy"):
        runs = []
        for rows in ("null", "32"):
            common = ("data=file", f"data.path={tmp_path / name}", "model.loss=kl", f"optimizer={optimizer}")
            metrics = train(make_cfg(*common, "model.rank=4", "trainer.max_steps=20", f"data.batch_rows={rows}"))
            with np.load(tmp_path / "factors.npz") as f:
                runs.append((metrics["divergence"], f["W"], f["H"]))
        assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-5)
        np.testing.assert_allclose(runs[1][1], runs[0][1], rtol=1e-4, atol=1e-6)


def test_new_rows_are_solved_on_the_models_divergence(tmp_path, capsys):
    from nmf_lightning.transform import main, transform

    rng = np.random.default_rng(0)
    H = rng.random((3, 12))
    X = rng.poisson(rng.random((40, 3)) @ H * 4).astype(np.float64)
    W_kl = transform(X, H, "mu", beta=1.0, max_iter=300)
    W_fro = transform(X, H, "hals", max_iter=300)
    kl = [_beta_divergence(X, W, H, 1) for W in (W_kl, W_fro)]
    assert kl[0] < kl[1]  # each solves its own loss
    np.savez(tmp_path / "factors.npz", W=W_kl, H=H)
    np.save(tmp_path / "new.npy", X)
    main([str(tmp_path), str(tmp_path / "new.npy"), "--out", str(tmp_path / "w.npy"), "--beta", "1", "--device", "cpu"])
    np.testing.assert_allclose(np.load(tmp_path / "w.npy"), transform(X, H, "mu", beta=1.0), rtol=1e-6)
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(NMFInputError, match="solver='hals' fits the Frobenius loss only, not beta=1; use solver='mu'"):
        transform(X, H, "hals", beta=1.0)
    with pytest.raises(NMFInputError, match=r"the Itakura-Saito divergence \(beta=0\) is defined for X > 0 only"):
        transform(X, H, "mu", beta=0.0)


def test_is_on_masked_x_with_an_empty_row_stays_finite_and_transform_refuses_zeros():
    from nmf_lightning import NMF

    rng = np.random.default_rng(0)
    X = rng.random((30, 20)) + 0.1
    X[0, :] = np.nan  # its row of W goes to 0 under MU: W H = 0 at missing entries only
    est = NMF(3, beta_loss="itakura-saito", solver="mu", init="random", random_state=0, max_iter=50).fit(X)
    assert np.isfinite(est.reconstruction_err_)
    with pytest.raises(ValueError, match="is defined for X > 0 only, and X has zero entries"):
        est.transform(np.zeros((2, 20)))
    with pytest.raises(ValueError, match="is defined for X > 0 only, and X has zero entries"):
        est.score(np.zeros((2, 20)))


def test_bfloat16_sums_the_divergence_in_float32():
    X = _x(False, 200, 100)
    W, H = (torch.from_numpy(A) for A in _factors(200, 100))
    exact = float(to_block(X, torch.float64).divergence(W, H, 1.0))
    t = to_block(X, torch.bfloat16)
    value = t.divergence(W.bfloat16(), H.bfloat16(), 1.0)
    assert value.dtype == torch.float32 and float(value) == pytest.approx(exact, rel=1e-2)
