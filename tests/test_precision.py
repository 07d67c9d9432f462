"""Training precisions: mixed precision runs every solver, float16 is refused, sums stay in float32 or more."""

import json

import numpy as np
import pytest
import torch

from nmf_lightning import NMF
from nmf_lightning.linalg import gram_sq
from nmf_lightning.solvers import als
from nmf_lightning.solvers.rules import KaczmarzRule
from nmf_lightning.train import train
from nmf_lightning.validation import NMFInputError


@pytest.mark.parametrize("optimizer", ["hals", "als", "mu"])
def test_bf16_mixed_runs_the_closed_form_solvers_to_the_float32_fit(make_cfg, tmp_path, optimizer):
    """Under autocast the Grams come in bf16; the k-row loop and Cholesky run in the factors' float32."""
    errors = {}
    for precision in ("32-true", "bf16-mixed"):
        out = tmp_path / precision
        overrides = ("data=digits", f"optimizer={optimizer}", f"trainer.precision={precision}", "trainer.max_steps=40")
        metrics = train(make_cfg(*overrides, "logger=none", f"paths.output_dir={out}"))
        assert metrics["status"] == "completed"
        errors[precision] = metrics["relative_error"]
    assert errors["bf16-mixed"] == pytest.approx(errors["32-true"], rel=0.05)  # ALS (not monotone) moves most


@pytest.mark.parametrize("precision", ["16-mixed", "16-true", "16"])
def test_float16_is_refused_before_training(make_cfg, tmp_path, precision):
    with pytest.raises(NMFInputError, match=rf"trainer.precision={precision} computes in float16.*bf16-mixed"):
        train(make_cfg("data=toy", "model.rank=2", f"trainer.precision={precision}", f"paths.output_dir={tmp_path}"))
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "factors.npz").exists()
    with pytest.raises(ValueError, match=r"precision=16 computes in float16.*'bf16'"):
        NMF(2, precision="16").fit(np.ones((4, 3)))


def test_an_unknown_precision_is_named_in_one_line(make_cfg, tmp_path):
    with pytest.raises(NMFInputError, match=r"trainer.precision=8 is not one of 32, 32-true, 64, 64-true, bf16"):
        train(make_cfg("data=toy", "model.rank=2", "trainer.precision=8", f"paths.output_dir={tmp_path}"))


def test_bf16_true_reports_the_error_of_its_factors(make_cfg, tmp_path):
    from sklearn.datasets import load_digits

    metrics = train(make_cfg("data=digits", "optimizer=hals", "trainer.precision=bf16-true", "trainer.max_steps=40"))
    run = next(tmp_path.rglob("factors.npz")).parent
    with np.load(run / "factors.npz") as f:
        W, H = f["W"].astype(np.float64), f["H"].astype(np.float64)
    X = load_digits().data
    exact = np.linalg.norm(X - W @ H) / np.linalg.norm(X)
    assert json.loads((run / "metrics.json").read_text())["relative_error"] == metrics["relative_error"]
    assert metrics["relative_error"] == pytest.approx(exact, rel=2e-3)


def test_gram_error_of_half_precision_products_keeps_the_norm_of_x():
    """||X||^2 = 107586.7 is 107520 in bf16 and inf in float16: the Gram form sums in float32."""
    g = torch.Generator().manual_seed(0)
    W, H = torch.rand(50, 4, generator=g, dtype=torch.float64), torch.rand(4, 30, generator=g, dtype=torch.float64)
    X = W @ H + 0.1 * torch.rand(50, 30, generator=g, dtype=torch.float64)
    X = X * (107586.7 / float((X * X).sum())) ** 0.5
    exact = float(((X - W @ H) ** 2).sum())
    x_sq = (X * X).sum()
    for half in (torch.bfloat16, torch.float16):
        Wh, Hh, Xh = W.to(half), H.to(half), X.to(half)
        sq = gram_sq(x_sq, Xh @ Hh.mT, Wh, Wh.mT @ Wh, Hh @ Hh.mT)
        assert sq.dtype == torch.float32 and torch.isfinite(sq)
        assert float(sq) == pytest.approx(exact, rel=0.02)


def test_als_solves_a_singular_gram_by_the_pseudo_inverse():
    """ridge=0 and a dead component: Cholesky fails and the pseudo-inverse (not lstsq, full-rank on a GPU) solves."""
    G = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 3.0]], dtype=torch.float64)
    B = torch.tensor([[4.0, 2.0], [0.0, 0.0], [3.0, 6.0]], dtype=torch.float64)
    torch.testing.assert_close(
        als._solve_psd(G, B), torch.tensor([[2.0, 1.0], [0.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    )
    assert als._solve_psd(G.bfloat16(), B.bfloat16()).dtype == torch.float32


def test_als_solves_each_system_alone_and_a_diverged_one_to_nan():
    """A batch of per-column systems: Cholesky's where it passes, the pseudo-inverse where not, NaN for NaN."""
    G = torch.stack([torch.eye(3) * 2, torch.diag(torch.tensor([2.0, 0.0, 3.0])), torch.full((3, 3), torch.nan)])
    B = torch.ones(3, 3, 1)
    Y = als._solve_psd(G, B)
    torch.testing.assert_close(Y[0], torch.full((3, 1), 0.5))
    torch.testing.assert_close(Y[1], torch.tensor([[0.5], [0.0], [1 / 3]]))
    assert torch.isnan(Y[2]).all()


def test_kaczmarz_sampler_state_from_another_kind_of_device_is_dropped_with_a_warning():
    rule = KaczmarzRule(seed=3)
    rule.set_generator_state(torch.zeros(16, dtype=torch.uint8))  # a CUDA generator's (seed, offset)
    with pytest.warns(UserWarning, match="samples rows afresh from optimizer.seed"):
        gen = rule._gen(torch.zeros(2))
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(3).get_state())


def test_x_that_would_not_fit_on_the_gpu_is_refused_with_the_row_blocks_that_would(monkeypatch):
    """The free memory read is the GPU's (torch.cuda.mem_get_info), not the host's."""
    from nmf_lightning.engine import Source

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * 2**20, 80 * 2**30))
    cuda = torch.device("cuda", 0)
    source = Source.in_memory(np.ones((1000, 1000)), torch.float32, "cpu")  # 4 MB
    need = r"X \(1000 x 1000\) and the factors need about 0.00\d+ GiB"
    free = r"but 0.00293 GiB of memory on cuda:0 is free; .*data.batch_rows=\d+"
    with pytest.raises(NMFInputError, match=f"{need} {free}"):
        source.check_memory(cuda, rank=8, restarts=1, itemsize=4)
    Source.in_memory(np.ones((100, 100)), torch.float32, "cpu").check_memory(cuda, rank=8, restarts=1, itemsize=4)
