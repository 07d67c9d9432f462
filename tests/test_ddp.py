"""Rows sharded over processes (trainer=ddp): two gloo ranks train what one process trains.

The multi-process tests carry the ``ddp`` mark (``-m 'not ddp'`` leaves them out).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import run_cli

from nmf_lightning.distributed import RowShard, split_rows
from nmf_lightning.engine import GradientUpdate, SolverUpdate, sq_error, to_block
from nmf_lightning.engine.blocks import dense_layout
from nmf_lightning.engine.loop import update
from nmf_lightning.engine.updates import PenaltySchedule
from nmf_lightning.objective import Objective
from nmf_lightning.solvers.rules import HALSRule, MURule
from nmf_lightning.train import train
from nmf_lightning.validation import NMFInputError

N, M, K = 37, 23, 4  # 37 rows: the ranks hold 18 and 19
STEPS = 12
QUIET = ("++trainer.enable_progress_bar=false", "++callbacks.progress_bar=null", "trainer.accelerator=cpu")


def test_split_rows_covers_every_row_once_in_whole_blocks():
    assert split_rows(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert split_rows(1797, 2, block=500) == [(0, 1000), (1000, 1797)]
    for n, world, block in ((37, 2, 1), (100, 4, 7), (5, 5, 1)):
        bounds = split_rows(n, world, block)
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
        assert all(start % block == 0 for start, _ in bounds)


# ------------------------------------------------------------------- the engine over two ranks
def _problem(layout: str) -> np.ndarray | sp.csr_matrix:
    rng = np.random.default_rng(1)
    X = rng.random((N, K)) @ rng.random((K, M)) + 0.1 * rng.random((N, M))
    if layout == "sparse":
        return sp.csr_matrix(np.where(rng.random((N, M)) < 0.4, X, 0.0))
    if layout == "masked":
        X[rng.random((N, M)) < 0.2] = np.nan
        X[:18] = np.nan_to_num(X[:18], nan=1.0)  # rank 0's rows have no missing entry: it must still mask
    return X


def _start() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(N, K, generator=g, dtype=torch.float64), torch.rand(K, M, generator=g, dtype=torch.float64)


def _step(solver: str, W: torch.Tensor, H: torch.Tensor, shard: RowShard | None, x_sq: torch.Tensor):
    sums = None if shard is None else shard.sum
    if solver in ("hals", "mu"):
        rule = HALSRule() if solver == "hals" else MURule()
        return SolverUpdate(rule, l1=(0.01, 0.02), l2=(0.03, 0.0), sum_ranks=sums, x_sq=x_sq)
    objective = Objective(loss="fro2", l1_W=0.01, lam=0.1)
    if shard is not None:
        objective = Objective(loss="fro2", l1_W=0.01, lam=0.1, sum_rows=shard.sum_rows, n_rows=N)
    schedule = PenaltySchedule(0.1, growth=10.0, tol=1e-9, every=3) if solver == "adam_lam_growth" else None
    return GradientUpdate(
        torch.optim.Adam([W, H], lr=0.05), objective, project=False, sum_ranks=sums, schedule=schedule
    )


CASES = [(s, layout) for s in ("hals", "mu", "adam") for layout in ("dense", "sparse", "masked")]
CASES.append(("adam_lam_growth", "dense"))  # the penalty schedule reads W's negative mass over every rank


def _run(solver: str, layout: str, shard: RowShard | None) -> dict:
    """STEPS updates from the same start: on all of X (shard None) or on this rank's rows."""
    X = _problem(layout)
    masked, triplets = dense_layout(X)
    rows = slice(None) if shard is None else shard.rows
    t = to_block(X[rows], torch.float64, masked=masked, triplets=triplets)
    x_sq = to_block(X, torch.float64).x_sq
    W0, H0 = _start()
    W, H = torch.nn.Parameter(W0[rows].clone()), torch.nn.Parameter(H0.clone())
    step = _step(solver, W, H, shard, x_sq)
    Hs = []
    for _ in range(STEPS):
        update(t, W, H, step)
        Hs.append(H.detach().clone())
    W = W.detach() if shard is None else shard.gather_rows(W.detach())
    sums = None if shard is None else shard.sum
    lam = torch.tensor(getattr(step, "objective", Objective()).lam)
    return {
        "W": W,
        "H": H.detach(),
        "Hs": torch.stack(Hs),
        "sq": sq_error(t, W[rows], H.detach(), sum_ranks=sums),
        "lam": lam,
    }


def _worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {}
    for solver, layout in CASES:
        shard = RowShard.of_this_process(N)
        before = shard.sent_bytes, shard.calls
        results[f"{solver}-{layout}"] = _run(solver, layout, shard)
        if layout == "dense":  # what crosses the wire: STEPS updates, then the gather and the error
            results[f"{solver}-{layout}"]["comm"] = (shard.sent_bytes - before[0], shard.calls - before[1])
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every case on two gloo ranks, in one spawn (a process start costs seconds here)."""
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(2, f"file://{out / 'store'}", str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.ddp
@pytest.mark.parametrize(("solver", "layout"), CASES)
def test_two_ranks_take_the_updates_of_one_process(two_ranks, solver, layout):
    one = _run(solver, layout, None)
    for ranked in two_ranks:
        got = ranked[f"{solver}-{layout}"]
        for name in ("W", "H", "sq", "lam"):
            np.testing.assert_allclose(got[name].numpy(), one[name].numpy(), rtol=1e-10, atol=1e-12)
    if solver == "adam_lam_growth":
        assert float(one["lam"]) > 0.1  # the schedule grew the weight: the ranks agreed on W's negative mass
    # H identical on every rank after every update: the same sums, the same update, nothing broadcast
    torch.testing.assert_close(two_ranks[0][f"{solver}-{layout}"]["Hs"], two_ranks[1][f"{solver}-{layout}"]["Hs"],
                               rtol=0, atol=0)  # fmt: skip


@pytest.mark.ddp
@pytest.mark.parametrize("solver", ["hals", "mu", "adam"])
def test_an_update_all_reduces_k_squared_plus_k_m_numbers(two_ranks, solver):
    sent, calls = two_ranks[0][f"{solver}-dense"]["comm"]
    # numbers per all-reduce of an update: W^T X and W^T W; adam: H's gradient and the error,
    # then W's two penalties (L1, negativity), each completed over the ranks by one scalar
    per_update = {"hals": [K * M + K * K], "mu": [K * M + K * K], "adam": [K * M + 1, 1, 1]}[solver]
    assert calls == STEPS * len(per_update) + 1  # + the final error's
    assert sent == (STEPS * sum(per_update) + 1) * 8  # float64


# ------------------------------------------------------------------- through the CLI
def _files(tmp_path: Path) -> dict[str, Path]:
    """A dense and a sparse X on disk, 61 rows (the ranks hold 30 and 31)."""
    rng = np.random.default_rng(2)
    X = rng.random((61, 5)) @ rng.random((5, 33)) + 0.05 * rng.random((61, 33))
    np.save(tmp_path / "dense.npy", X)
    sp.save_npz(tmp_path / "sparse.npz", sp.csr_matrix(np.where(rng.random(X.shape) < 0.3, X, 0.0)))
    return {"dense": tmp_path / "dense.npy", "sparse": tmp_path / "sparse.npz"}


def _factors(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(folder / "factors.npz") as f:
        return f["W"], f["H"]


def _ddp(tmp_path: Path, out: Path, *overrides: str):
    result = run_cli(*QUIET, "trainer=ddp", "trainer.devices=2", f"hydra.run.dir={out}", *overrides, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.ddp
@pytest.mark.parametrize(
    ("layout", "overrides"),
    [
        ("dense", ("optimizer=hals",)),
        pytest.param("sparse", ("optimizer=mu", "model.l1_H=0.01", "data.holdout=0.2"), marks=pytest.mark.slow),
        # 7 blocks of 10 rows: rank 0 holds 3, rank 1 holds 4, so rank 0's pass is padded
        pytest.param(
            "dense",
            ("optimizer=adam", "optimizer.lr=0.01", "data.batch_rows=10", "model.l2_W=0.1"),
            marks=pytest.mark.slow,
        ),
    ],
    ids=["hals-dense", "mu-sparse-holdout", "adam-streamed"],
)
def test_ddp_through_the_cli_equals_one_process(make_cfg, tmp_path, layout, overrides):
    path = _files(tmp_path)[layout]
    common = ("data=file", f"data.path={path}", "model.rank=5", "trainer.max_steps=40", "trainer.precision=64-true")
    common += ("logger=none", *overrides)
    _ddp(tmp_path, tmp_path / "ddp", *common)
    one = train(make_cfg(*common, f"paths.output_dir={tmp_path / 'one'}"))
    for a, b in zip(_factors(tmp_path / "ddp"), _factors(tmp_path / "one"), strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12 * np.abs(b).max())
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp["relative_error"] == pytest.approx(one["relative_error"], rel=1e-10)
    assert ddp["W_sparsity"] == pytest.approx(one["W_sparsity"]) and ddp["steps"] == 40
    if "val_relative_error" in one:  # held-out entries fall on both ranks' rows
        assert ddp["val_relative_error"] == pytest.approx(one["val_relative_error"], rel=1e-10)
    # rank 0 writes the results; rank 1 only its log
    written = sorted(p.name for p in (tmp_path / "ddp").iterdir())
    assert written == [".hydra", "checkpoints", "factors.npz", "metrics.json", "train.log", "train_rank1.log"]


@pytest.mark.slow  # a subprocess or a multirun: -m slow (and CI) runs it
@pytest.mark.ddp
def test_a_ddp_multirun_keeps_each_jobs_ranks_in_its_folder(make_cfg, tmp_path):
    path = _files(tmp_path)["dense"]
    sweep = tmp_path / "sweep"
    conf = tmp_path / "conf"  # the user's own primary config: the child ranks must compose it too
    conf.mkdir()
    (conf / "mine.yaml").write_text("defaults:\n  - train\n  - _self_\ntrainer:\n  max_steps: 20\n")
    result = run_cli(
        "-m", "-cd", str(conf), "-cn", "mine", *QUIET, "trainer=ddp", "trainer.devices=2", "data=file",
        f"data.path={path}", "optimizer=hals", "model.rank=3,4", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0_rank=3", "1_rank=4"]
    for job, rank in zip(jobs, (3, 4), strict=True):
        assert _factors(job)[0].shape == (61, rank)
        assert json.loads((job / "metrics.json").read_text())["status"] == "completed"
        assert (job / "train_rank1.log").is_file() and len(list(job.glob("events.out.tfevents.*"))) >= 1
        assert json.loads((job / "metrics.json").read_text())["steps"] == 20  # the config both ranks composed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conf", "dense.npy", "sparse.npz", "sweep"]  # nothing else
    # float32: the factors of one process, to rounding
    one = tmp_path / "one"
    train(make_cfg("data=file", f"data.path={path}", "optimizer=hals", "model.rank=3", "trainer.max_steps=20",
                   "logger=none", f"paths.output_dir={one}"))  # fmt: skip
    for a, b in zip(_factors(jobs[0]), _factors(one), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


@pytest.mark.slow  # a subprocess or a multirun: -m slow (and CI) runs it
@pytest.mark.ddp
def test_checkpoints_move_between_one_process_and_two_ranks(make_cfg, tmp_path):
    path = _files(tmp_path)["dense"]
    common = ("data=file", f"data.path={path}", "model.rank=5", "trainer.precision=64-true", "logger=none")
    common += ("optimizer=adam", "optimizer.lr=0.01")
    straight = train(make_cfg(*common, "trainer.max_steps=40", f"paths.output_dir={tmp_path / 'straight'}"))
    # two ranks -> one process
    _ddp(tmp_path, tmp_path / "ddp", *common, "trainer.max_steps=20")
    ckpt = tmp_path / "ddp" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["state_dict"]["W"].shape == (61, 5)  # all of W, gathered
    resumed = train(
        make_cfg(*common, "trainer.max_steps=40", f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path / 'r'}")
    )
    # one process -> two ranks
    train(make_cfg(*common, "trainer.max_steps=20", f"paths.output_dir={tmp_path / 'one'}"))
    _ddp(
        tmp_path,
        tmp_path / "r2",
        *common,
        "trainer.max_steps=40",
        f"ckpt_path={tmp_path / 'one/checkpoints/last.ckpt'}",
    )
    assert resumed["steps"] == 40
    assert resumed["relative_error"] == pytest.approx(straight["relative_error"], rel=1e-10)
    for folder in ("r", "r2"):  # Adam's moments of W travel with it
        for a, b in zip(_factors(tmp_path / folder), _factors(tmp_path / "straight"), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12 * np.abs(b).max())


@pytest.mark.slow  # a subprocess or a multirun: -m slow (and CI) runs it
@pytest.mark.ddp
def test_torchrun_starts_the_ranks_and_rank_0_writes(tmp_path):
    """Under torchrun (or SLURM) every rank runs the same command; each logs to its own file."""
    path = _files(tmp_path)["dense"]
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
    ]
    command += ["-m", "nmf_lightning.train", *QUIET, "trainer=ddp", "trainer.devices=2", "data=file"]
    command += [f"data.path={path}", "optimizer=mu", "model.rank=3", "trainer.max_steps=10", f"hydra.run.dir={out}"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _factors(out)[0].shape == (61, 3)
    assert json.loads((out / "metrics.json").read_text())["ddp_ranks"] == 2
    assert "Loading data" in (out / "train_rank1.log").read_text()
    assert (out / "train.log").read_text().count("Loading data") == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP2 = ("trainer=ddp", "trainer.devices=2")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ((*DDP2, "optimizer=kaczmarz"), r"optimizer=kaczmarz samples rows anywhere in X .* trainer=ddp with 2 ranks"),
        ((*DDP2, "data.batch_rows=100", "model.online=true"), r"model.online=true updates H after every row block"),
        ((*DDP2, "data.batch_rows=2000"), r"DDP runs 2 ranks, each on its own rows of X, but X has 1 row blocks"),
        (("trainer.devices=2",), r"trainer.devices=2: one run on several devices shards X's rows .* trainer=ddp"),
        (("trainer.devices=2", "+trainer.strategy=ddp"), r"trainer.devices=2: one run on several devices"),
    ],
    ids=["kaczmarz", "online", "one-block-for-two-ranks", "devices-without-ddp", "lightning-ddp"],
)
def test_what_ddp_cannot_shard_is_refused_before_any_process_starts(make_cfg, overrides, message):
    with pytest.raises(NMFInputError, match=message):
        train(make_cfg("data=digits", "optimizer=hals", *overrides))
    assert "LOCAL_RANK" not in os.environ  # no rank was launched
