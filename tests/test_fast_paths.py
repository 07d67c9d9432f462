"""Fast paths give the factors of the plain formulas they replace, and are chosen on their own."""

from functools import partial

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from test_solvers import _problem

from nmf_lightning.engine import GradientUpdate, fit
from nmf_lightning.engine.updates import fused_optimizer
from nmf_lightning.linalg import eps_for, floor_for
from nmf_lightning.objective import Objective
from nmf_lightning.solvers import mu

LAYOUTS = ["dense", "sparse", "masked", "triplets"]


def _reference_mu_h(t, W, H, l1, l2):
    """Lee-Seung's H-update written out: H * W^T X / (W^T (M * W H) + l1 + l2 H)."""
    model = t.Wt_model(W, H) if t.masked else (W.mT @ W) @ H
    return H * t.WtX(W) / (model + l1 + l2 * H).clamp_min(eps_for(H))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("restarts", [1, 3])
@pytest.mark.parametrize(("l1", "l2"), [(0.0, 0.0), (0.1, 0.2)])
def test_mu_in_place_update_equals_the_formula(layout, restarts, l1, l2):
    t, W, H, *_ = _problem(layout=layout)
    if restarts > 1:
        W, H = W.expand(restarts, *W.shape).clone(), H.expand(restarts, *H.shape).clone()
        W = W * torch.linspace(0.5, 1.5, restarts, dtype=W.dtype)[:, None, None]
    stats = mu.h_stats(t, W, H)
    kept = {k: v.clone() for k, v in stats.items()}
    torch.testing.assert_close(mu.h_from_stats(stats, H, l1, l2), _reference_mu_h(t, W, H, l1, l2))
    for key, value in stats.items():  # the summed terms are left as they were (online mode keeps them)
        torch.testing.assert_close(value, kept[key], rtol=0, atol=0)
    W_ref = _reference_mu_h(t.transposed(), H.mT, W.mT, l1, l2).mT
    torch.testing.assert_close(mu.update_w(t, W, H, l1, l2), W_ref)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("restarts", [1, 2])
def test_fused_adam_gives_the_factors_of_torchs_loop(layout, restarts):
    t, W0, H0, *_ = _problem(layout=layout)
    if restarts > 1:
        W0, H0 = W0.expand(restarts, *W0.shape).clone(), H0.expand(restarts, *H0.shape).clone()
    runs = []
    for fused in (None, False):
        W, H = W0.clone().requires_grad_(), H0.clone().requires_grad_()
        optimizer = fused_optimizer(partial(torch.optim.Adam, lr=1e-2, fused=fused), [W, H])
        assert optimizer.param_groups[0]["fused"] is (fused is None)  # None: chosen fused
        fit(t, W, H, GradientUpdate(optimizer, Objective("fro2", n_obs=t.n_obs)), 60)
        runs.append((W.detach(), H.detach()))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-10, atol=1e-12)


def test_only_adam_and_adamw_are_fused_and_an_explicit_choice_is_kept():
    W = torch.zeros(3, 2, requires_grad=True)
    assert fused_optimizer(partial(torch.optim.AdamW, lr=0.1), [W]).param_groups[0]["fused"]
    assert not fused_optimizer(partial(torch.optim.Adam, lr=0.1, foreach=True), [W]).param_groups[0]["fused"]
    assert not fused_optimizer(partial(torch.optim.SGD, lr=0.1), [W]).param_groups[0].get("fused")


def test_accelerated_hals_reaches_a_lower_error_in_as_many_x_products():
    from nmf_lightning.engine import SolverUpdate, sq_error
    from nmf_lightning.solvers.rules import HALSRule

    t, W0, H0, *_ = _problem(n=60, m=40, k=5)
    errors = {}
    for sweeps in (1, 3):
        W, H = W0.clone(), H0.clone()
        fit(t, W, H, SolverUpdate(HALSRule(sweeps)), 10)
        errors[sweeps] = float(sq_error(t, W, H))
    assert errors[3] < errors[1]
    W, H = W0.clone(), H0.clone()
    fit(t, W, H, SolverUpdate(HALSRule(1)), 10)
    assert float(sq_error(t, W, H)) == errors[1]  # sweeps=1 is the plain pass
    with pytest.raises(ValueError, match="optimizer.sweeps must be an integer >= 1"):
        HALSRule(0)


def _reference_hals_sweep(A, G, B, l1, l2):
    """scikit-learn's coordinate pass written out: A[j] = max(0, A[j] + (B[j] - l1 - (G A)[j]) / G[j, j]).

    G[j, j] is kept above eps of G's largest diagonal entry (a dead component divides by that).
    """
    A, G = A.clone(), G + l2 * torch.eye(G.shape[-1], dtype=G.dtype)
    floor = eps_for(A) * torch.diagonal(G, dim1=-2, dim2=-1).amax(-1, keepdim=True)  # (..., 1)
    for j in range(A.shape[-2]):
        step = (B[..., j, :] - l1 - (G[..., j, None, :] @ A).squeeze(-2)) / torch.maximum(G[..., j, j, None], floor)
        A[..., j, :] = (A[..., j, :] + step).clamp_min(0)
    return A


@pytest.mark.parametrize("restarts", [1, 3])
@pytest.mark.parametrize(("l1", "l2"), [(0.0, 0.0), (0.1, 0.2)])
def test_hals_numpy_and_two_op_torch_passes_equal_the_formula(restarts, l1, l2):
    from nmf_lightning.solvers import hals

    g = torch.Generator().manual_seed(restarts)
    batch = (restarts,) if restarts > 1 else ()
    W = torch.rand(*batch, 40, 6, generator=g, dtype=torch.float64)
    W[..., 2] = 0  # a zero column: G's diagonal entry below eps
    X = torch.rand(*batch, 40, 25, generator=g, dtype=torch.float64)
    H = torch.rand(*batch, 6, 25, generator=g, dtype=torch.float64)
    G, B = W.mT @ W, W.mT @ X
    want = _reference_hals_sweep(H, G, B, l1, l2)
    torch.testing.assert_close(hals.sweep(H, G, B, l1, l2), want, rtol=1e-12, atol=1e-12)  # numpy on the CPU
    got = H.clone()  # the path a GPU (or half precision) takes: two torch ops per row
    G2 = hals._add_diag(G, l2)
    hals._sweep_torch(got, *hals._scaled_torch(G2, B - l1, floor_for(torch.diagonal(G2, dim1=-2, dim2=-1))))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    half = hals.sweep(H.bfloat16(), G.bfloat16(), B.bfloat16(), l1, l2).double()
    assert float((half - want).norm() / want.norm()) < 0.03  # bf16 rounding over one pass


def test_csr_rows_reads_a_block_of_rows_as_scipy_does():
    """Kaczmarz's row blocks of a sparse X, repeated and empty rows included."""
    import numpy as np
    import scipy.sparse as sp

    from nmf_lightning.linalg import csr_rows

    X = sp.random(50, 40, density=0.1, format="csr", random_state=0)
    X[7] = 0
    X.eliminate_zeros()
    t = torch.sparse_csr_tensor(
        torch.from_numpy(X.indptr), torch.from_numpy(X.indices), torch.from_numpy(X.data), X.shape
    )
    idx = torch.tensor([3, 7, 3, 49, 0])
    np.testing.assert_array_equal(csr_rows(t, idx).numpy(), X[idx.numpy()].toarray())


def _row_blocks(layout: str, n: int = 40, m: int = 30, size: int = 13):
    """X in row blocks of ``size`` (the last one shorter), as a streamed pass gives them."""
    from nmf_lightning.engine import to_block

    rng = np.random.default_rng(1)
    X = rng.random((n, m)) * (rng.random((n, m)) > 0.5)
    X = sp.csr_matrix(X) if layout == "sparse" else X
    return [to_block(X[s : s + size], torch.float64, start=s) for s in range(0, n, size)]


@pytest.mark.parametrize("layout", ["dense", "sparse"])
@pytest.mark.parametrize("rule", ["hals", "mu"])
def test_online_pass_from_shared_sums_equals_the_plain_formulas(layout, rule):
    """Online mode forms H H^T once per block and fades its sums in place: same factors, errors and sums."""
    from nmf_lightning.engine import SolverUpdate
    from nmf_lightning.engine.loop import update
    from nmf_lightning.solvers.rules import HALSRule, MURule

    blocks = _row_blocks(layout)
    g = torch.Generator().manual_seed(0)
    W0, H0 = torch.rand(40, 4, generator=g, dtype=torch.float64), torch.rand(4, 30, generator=g, dtype=torch.float64)
    make = HALSRule if rule == "hals" else MURule
    step = SolverUpdate(make(), l1=(0.01, 0.02), l2=(0.03, 0.04), online=True, forget=0.6)
    seeded = {k: v.clone() for k, v in make().h_stats(blocks[0], W0[:13], H0).items()}  # a caller's saved sums
    step.stats = {k: v.clone() for k, v in seeded.items()}
    given = step.stats
    W, H = W0.clone(), H0.clone()
    results = [update(lambda: iter(blocks), W, H, step).sq for _ in range(3)]
    for key in seeded:  # the caller's tensors were not written into
        torch.testing.assert_close(given[key], seeded[key], rtol=0, atol=0)

    plain = make()  # the reference: each block's W-update, its error, decayed sums made afresh, H
    Wr, Hr, stats = W0.clone(), H0.clone(), {k: v.clone() for k, v in seeded.items()}
    for result in results:
        running = 0.0
        for t in blocks:
            rows = slice(t.start, t.stop)
            Wr[rows] = plain.update_w(t, Wr[rows], Hr, 0.01, 0.03)
            new = plain.h_stats(t, Wr[rows], Hr)
            running = running + t.sq_error(Wr[rows], Hr)
            decay = 0.6 ** (t.shape[0] / 40)
            stats = {k: decay * stats[k] + v for k, v in new.items()}
            Hr = plain.h_from_stats(stats, Hr, 0.02, 0.04)
        torch.testing.assert_close(result, running)
    torch.testing.assert_close(W, Wr)
    torch.testing.assert_close(H, Hr)
    for key in stats:
        torch.testing.assert_close(step.stats[key], stats[key])


def test_row_major_copies_a_transposed_view_and_keeps_autograd():
    from nmf_lightning.linalg import row_major

    H = torch.rand(3, 50, dtype=torch.float64)
    Ht = row_major(H.mT)
    assert Ht.is_contiguous() and torch.equal(Ht, H.mT) and row_major(Ht) is Ht
    P = torch.rand(3, 5, requires_grad=True)
    (row_major(P.mT) * 2).sum().backward()  # a tracked tensor is copied by torch, so its gradient flows
    torch.testing.assert_close(P.grad, torch.full((3, 5), 2.0))
    with torch.no_grad():
        assert torch.equal(row_major(P.mT), P.mT)


@pytest.mark.parametrize("layout", ["dense", "sparse"])
@pytest.mark.parametrize("rule", ["hals", "mu", "als"])
def test_a_w_solve_for_fixed_h_reuses_its_sums_and_gives_the_rules_w(layout, rule):
    """With H held fixed, X H^T and H H^T are formed once for every pass: the W of the rule's own update."""
    from nmf_lightning.engine import SolverUpdate, fit
    from nmf_lightning.solvers.rules import ALSRule, HALSRule, MURule

    t, W0, H, *_ = _problem(layout=layout)
    make = {"hals": HALSRule, "mu": MURule, "als": ALSRule}[rule]
    W = W0.clone()
    step = SolverUpdate(make(), l1=(0.01, 0.0), l2=(0.02, 0.0), update_H=False)
    fit(t, W, H, step, 5)
    assert step._sums_of is not None and step._sums_of[0] is t  # kept for the next pass
    Wr = W0.clone()
    for _ in range(5):
        Wr = make().update_w(t, Wr, H, 0.01, 0.02)
    torch.testing.assert_close(W, Wr)
