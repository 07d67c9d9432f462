import numpy as np
import pytest
import torch
from sklearn.decomposition._nmf import _initialize_nmf

from nmf_lightning.init import initialize


def _X(n=30, m=20, seed=0):
    return torch.from_numpy(np.random.RandomState(seed).rand(n, m))


@pytest.mark.parametrize("init", ["random", "normal_abs", "nndsvd", "nndsvda", "nndsvdar"])
def test_init_shapes_dtype_and_non_negative(init):
    X = _X()
    W, H = initialize(X, 5, init, generator=torch.Generator().manual_seed(0))
    assert W.shape == (30, 5) and H.shape == (5, 20)
    assert W.dtype == X.dtype and H.dtype == X.dtype
    assert (W >= 0).all() and (H >= 0).all()


def test_random_init_is_scaled_to_the_data_like_scikit_learn():
    X = _X(200, 100) * 9.0
    W, H = initialize(X, 10, "random", generator=torch.Generator().manual_seed(0))
    # E|N(0,1)| = sqrt(2/pi); entries of W H then have mean k * avg^2 * 2/pi = mean(X) * 2/pi
    expected = X.mean().item() * 2 / np.pi
    assert (W @ H).mean().item() == pytest.approx(expected, rel=0.1)


def test_normal_abs_reproduces_the_notebook_draws():
    torch.manual_seed(42)
    W_nb = torch.abs(torch.normal(0, 0.01, size=(6, 3)))
    H_nb = torch.abs(torch.normal(0, 0.01, size=(3, 4)))
    W, H = initialize(torch.ones(6, 4), 3, "normal_abs", generator=torch.Generator().manual_seed(42), scale=0.01)
    torch.testing.assert_close(W, W_nb)
    torch.testing.assert_close(H, H_nb)


def test_seed_makes_init_reproducible():
    X = _X()
    a = initialize(X, 4, "random", generator=torch.Generator().manual_seed(3))
    b = initialize(X, 4, "random", generator=torch.Generator().manual_seed(3))
    c = initialize(X, 4, "random", generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("init", ["nndsvd", "nndsvda"])
def test_nndsvd_matches_scikit_learn(init, monkeypatch):
    # scikit-learn takes a randomized SVD; give both sides the exact one to compare to rounding
    import sklearn.decomposition._nmf as sk_nmf

    def exact_svd(X, n_components, **_):
        U, S, Vt = np.linalg.svd(X, full_matrices=False)
        return U[:, :n_components], S[:n_components], Vt[:n_components]

    name = "_randomized_svd" if hasattr(sk_nmf, "_randomized_svd") else "randomized_svd"
    monkeypatch.setattr(sk_nmf, name, exact_svd)
    Xn = np.random.RandomState(1).rand(40, 25)
    W_sk, H_sk = _initialize_nmf(Xn, 6, init=init, random_state=0)
    W, H = initialize(torch.from_numpy(Xn), 6, init, generator=torch.Generator().manual_seed(0))
    if init == "nndsvda":  # scikit-learn fills zeros with X's mean; here with the factors' scale, sqrt(mean / k)
        fill = np.sqrt(Xn.mean() / 6)
        W_sk, H_sk = (np.where(a == Xn.mean(), fill, a) for a in (W_sk, H_sk))
    np.testing.assert_allclose(W.numpy(), W_sk, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(H.numpy(), H_sk, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("init", ["random", "nndsvd", "nndsvda", "nndsvdar"])
def test_the_start_of_c_x_is_the_start_of_x_scaled(init):
    X = _X(30, 20)
    W, H = initialize(X, 4, init, generator=torch.Generator().manual_seed(0))
    for c in (1e-30, 1e-6, 1e6, 1e30):
        Wc, Hc = initialize(c * X, 4, init, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(Wc, W * c**0.5, rtol=1e-9, atol=0)
        torch.testing.assert_close(Hc, H * c**0.5, rtol=1e-9, atol=0)


def test_nndsvd_needs_rank_at_most_min_dimension():
    with pytest.raises(ValueError, match=r"needs model.rank <= min\(n, m\) = 20"):
        initialize(_X(), 21, "nndsvd", generator=torch.Generator())


def test_unknown_init_is_named():
    with pytest.raises(ValueError, match="model.init='svd' is not a known init"):
        initialize(_X(), 2, "svd", generator=torch.Generator())
