import math

import numpy as np
import pytest
import torch

from nmf_lightning.linalg import frobenius_sq, sq_error_gram, sq_error_residual
from nmf_lightning.objective import l1, l2, l21, negativity_penalty, reconstruction, relative_error


def _pair(n=7, m=5, k=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, m, generator=g, dtype=dtype)
    W = torch.rand(n, k, generator=g, dtype=dtype).requires_grad_()
    H = torch.rand(k, m, generator=g, dtype=dtype).requires_grad_()
    return X, W, H


def test_losses_match_hand_computation():
    X = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    W = torch.tensor([[1.0], [1.0]])
    H = torch.tensor([[1.0, 1.0]])
    # residual [[0, 1], [2, 3]] -> sum of squares 14
    sq = sq_error_residual(X, W, H)
    assert sq.item() == pytest.approx(14.0)
    assert reconstruction(sq, 4, "fro").item() == pytest.approx(math.sqrt(14))
    assert reconstruction(sq, 4, "fro2").item() == pytest.approx(7.0)
    assert reconstruction(sq, 4, "rmse").item() == pytest.approx(math.sqrt(14 / 4))
    assert relative_error(sq, frobenius_sq(X)).item() == pytest.approx(math.sqrt(14 / 30))


def test_unknown_loss_is_named():
    with pytest.raises(ValueError, match=r"model.loss='l3' is not a known loss"):
        reconstruction(torch.tensor(1.0), 1, "l3")


def test_penalties_match_hand_computation():
    W = torch.tensor([[-1.0, 2.0], [0.0, -3.0]])
    H = torch.tensor([[3.0, 0.0, -2.0], [4.0, 0.0, 0.0]])
    # mean(clamp(-W)) = (1 + 3) / 4 = 1; mean(clamp(-H)) = 2 / 6
    assert negativity_penalty(W, H).item() == pytest.approx(1 + 2 / 6)
    assert l1(W).item() == pytest.approx(6.0)
    assert l2(W).item() == pytest.approx(0.5 * (1 + 4 + 9))
    # column norms of H: 5, 0, 2 -> mean 7/3
    assert l21(H).item() == pytest.approx(7 / 3)


def test_l21_gradient_is_finite_at_a_zero_column():
    H = torch.tensor([[1.0, 0.0], [2.0, 0.0]], requires_grad=True)
    l21(H).backward()
    assert torch.isfinite(H.grad).all()


@pytest.mark.parametrize("layout", ["dense", "csr", "coo"])
def test_gram_form_matches_residual_form_values_and_gradients(layout):
    X, W, H = _pair(n=9, m=6, k=4)
    X = X * (X > 0.5)  # some exact zeros, as sparse data has
    Xin = {"dense": X, "csr": X.to_sparse_csr(), "coo": X.to_sparse()}[layout]
    sq_r = sq_error_residual(X, W, H)
    gW_r, gH_r = torch.autograd.grad(sq_r, (W, H))
    sq_g = sq_error_gram(Xin, W, H)
    gW_g, gH_g = torch.autograd.grad(sq_g, (W, H))
    torch.testing.assert_close(sq_g, sq_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gW_g, gW_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gH_g, gH_r, rtol=1e-10, atol=1e-10)


def test_masked_entry_changes_neither_loss_nor_gradients():
    X, W, H = _pair()
    mask = torch.ones_like(X, dtype=torch.bool)
    mask[2, 3] = False
    losses, grads = [], []
    for value in (0.0, 1e6):
        Xv = X.clone()
        Xv[2, 3] = value
        sq = sq_error_residual(Xv, W, H, mask)
        losses.append(sq.detach())
        grads.append(torch.autograd.grad(sq, (W, H)))
    torch.testing.assert_close(losses[0], losses[1])
    for a, b in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(a, b)
    # and it equals the sum over observed entries computed by hand
    R = (X - W @ H).detach().numpy()
    expected = (R**2).sum() - R[2, 3] ** 2
    assert losses[0].item() == pytest.approx(expected)


def test_frobenius_sq_counts_observed_entries_only():
    X = torch.tensor([[1.0, 2.0], [0.0, 3.0]])
    mask = torch.tensor([[True, False], [True, True]])
    assert frobenius_sq(X, mask).item() == pytest.approx(10.0)
    assert frobenius_sq(X.to_sparse_csr()).item() == pytest.approx(14.0)
    assert frobenius_sq(X).dtype == torch.float64


def test_float32_gram_agrees_with_float64_at_notebook_scale():
    X, W, H = _pair(n=50, m=40, k=5, dtype=torch.float32)
    sq32 = sq_error_gram(X, W, H).item()
    sq64 = sq_error_residual(X.double(), W.double(), H.double()).item()
    assert np.isclose(sq32, sq64, rtol=1e-4)


@pytest.mark.parametrize("layout", ["dense", "csr", "masked"])
def test_batched_restarts_give_one_value_per_restart(layout):
    X, _, _ = _pair(n=8, m=6, k=3)
    g = torch.Generator().manual_seed(1)
    W = torch.rand(4, 8, 3, generator=g, dtype=torch.float64, requires_grad=True)
    H = torch.rand(4, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(8, 6, generator=g) > 0.3 if layout == "masked" else None
    if layout == "masked":
        batched = sq_error_residual(X, W, H, mask)
    else:
        batched = sq_error_gram(X.to_sparse_csr() if layout == "csr" else X, W, H)
    assert batched.shape == (4,)
    gW, gH = torch.autograd.grad(batched.sum(), (W, H))
    for r in range(4):
        Wr, Hr = W[r].detach().requires_grad_(), H[r].detach().requires_grad_()
        single = sq_error_residual(X, Wr, Hr, mask)
        torch.testing.assert_close(batched[r], single)
        sW, sH = torch.autograd.grad(single, (Wr, Hr))
        torch.testing.assert_close(gW[r], sW)
        torch.testing.assert_close(gH[r], sH)
    assert negativity_penalty(W, H).shape == l1(W).shape == l21(H).shape == (4,)


def test_observed_entries_form_matches_the_masked_residual():
    from nmf_lightning.linalg import sq_error_observed

    X, W, H = _pair(n=9, m=7, k=3)
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(9, 7, generator=g) < 0.3
    rows, cols = mask.nonzero(as_tuple=True)
    for Wb, Hb in ((W, H), (torch.stack([W, 2 * W]), torch.stack([H, H / 3]))):
        dense = sq_error_residual(X * mask, Wb, Hb, mask)
        sparse = sq_error_observed(rows, cols, X[rows, cols], Wb, Hb)
        torch.testing.assert_close(sparse, dense)
        got = torch.autograd.grad(sparse.sum(), (W, H), retain_graph=True)
        for a, b in zip(got, torch.autograd.grad(dense.sum(), (W, H)), strict=True):
            torch.testing.assert_close(a, b)


def test_negative_mass_is_the_share_clamping_takes_away():
    from nmf_lightning.objective import negative_mass

    A = torch.tensor([[1.0, -1.0], [2.0, 0.0]])
    assert negative_mass(A).item() == pytest.approx(0.25)  # |-1| of 4
    assert negative_mass(A.clamp(min=0)).item() == 0 and negative_mass(torch.zeros(2, 2)).item() == 0
    batched = torch.stack([A, A.abs()])
    np.testing.assert_allclose(negative_mass(batched).numpy(), [0.25, 0.0])


def test_the_penalty_schedule_grows_lam_on_its_grid_until_the_factors_are_non_negative():
    from nmf_lightning.engine.loop import Convergence
    from nmf_lightning.engine.updates import PenaltySchedule

    schedule = PenaltySchedule(10.0, growth=10.0, tol=1e-3, every=5)
    negative, nonnegative = torch.tensor([[1.0, -0.5]]), torch.tensor([[1.0, 1e-4]])
    grew = [schedule.observe(done, negative, nonnegative) for done in range(1, 11)]
    assert grew == [False] * 4 + [True] + [False] * 4 + [True] and schedule.lam == 1000.0 and not schedule.met
    assert not schedule.observe(15, nonnegative, nonnegative) and schedule.lam == 1000.0 and schedule.met
    resumed = PenaltySchedule(10.0, growth=10.0, tol=1e-3, every=5)
    resumed.load_state_dict(schedule.state_dict())
    assert (resumed.lam, resumed.met) == (1000.0, True)
    # tol stops a fit only once the schedule's constraint holds too
    gate = PenaltySchedule(1.0, growth=2.0, tol=1e-3, every=5)
    convergence = Convergence(tol=0.1, window=1, ready=lambda: gate.met)
    flat = lambda: torch.tensor(1.0)  # noqa: E731 - an objective that does not move
    assert [convergence.check(done, flat) for done in (1, 2)] == [False, False]
    gate.observe(5, nonnegative, nonnegative)
    assert convergence.check(3, flat)
