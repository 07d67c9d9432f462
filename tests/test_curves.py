"""Training curves: a point every trainer.log_every_n_steps updates, whatever the block sizes."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nmf_lightning.curves import UpdateGrid
from nmf_lightning.train import train

SMALL = ("data=synthetic", "data.n_rows=40", "data.n_cols=30", "data.true_rank=3", "model.rank=3")


def _steps(run, tag):
    ea = EventAccumulator(str(run), size_guidance={"scalars": 0})
    ea.Reload()
    return [e.step for e in ea.Scalars(tag)], ea


@pytest.mark.parametrize(
    "extra",
    [
        ("model.inner_steps=7",),
        ("model.inner_steps=auto",),
        ("optimizer=hals", "model.inner_steps=7"),
        ("optimizer=hals", "model.restarts=2"),
        ("optimizer=mu", "data.holdout=0.2", "model.inner_steps=13"),
    ],
    ids=["adam-7", "adam-auto", "hals-7", "hals-restarts", "mu-masked-13"],
)
def test_a_2000_update_run_has_the_grid_points_whatever_the_blocks(make_cfg, tmp_path, extra):
    # noise keeps the fit off float32's floor, where rounding makes any solver's error bounce
    metrics = train(make_cfg(*SMALL, "data.noise=0.1", "model.l1_W=0.001", "trainer.max_steps=2000", *extra))
    grid = list(range(10, 2001, 10))
    steps, ea = _steps(tmp_path, "train/loss")
    assert steps == grid
    assert [e.step for e in ea.Scalars("train/relative_error")] == grid
    assert [e.step for e in ea.Scalars("train/l1_W")] == grid  # each term of non-zero weight too
    assert "train/penalty" not in ea.Tags()["scalars"]  # weight 0
    losses = [e.value for e in ea.Scalars("train/loss")]
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert ea.Scalars("train/relative_error")[-1].value == pytest.approx(metrics["relative_error"], rel=1e-5)
    if any(e.startswith("optimizer=") for e in extra):  # closed form: never up, but for rounding
        assert all(b <= a * (1 + 1e-3) for a, b in zip(losses, losses[1:], strict=False))


def test_the_grid_follows_log_every_n_steps_and_ends_with_the_last_update(make_cfg, tmp_path):
    train(make_cfg(*SMALL, "trainer.max_steps=95", "trainer.log_every_n_steps=25", "model.inner_steps=10"))
    steps, ea = _steps(tmp_path, "train/loss")
    assert steps == [25, 50, 75, 95]
    # the factors' statistics of a block end are logged where a block ends on the grid, and at the end
    assert [e.step for e in ea.Scalars("train/reconstruction")] == [25, 50, 75, 95]
    assert [e.step for e in ea.Scalars("train/sparsity_W")] == [50, 95]


def test_converged_run_ends_its_curve_where_it_stopped(make_cfg, tmp_path):
    metrics = train(make_cfg(*SMALL, "data.noise=0.3", "optimizer=hals", "model.tol=1e-4", "trainer.max_steps=5000"))
    steps, _ = _steps(tmp_path, "train/loss")
    assert metrics["steps"] < 5000 and steps[-1] == metrics["steps"]
    assert steps[:-1] == list(range(10, steps[-1], 10))


def test_update_grid_keeps_points_on_the_device_and_picks_each_points_best_restart():
    class Recorder:
        def __init__(self):
            self.calls = []

        def log_metrics(self, metrics, step):
            self.calls.append((step, metrics))

    grid = UpdateGrid(5)
    assert [s for s in range(12) if grid.due(s)] == [5, 10]
    grid.add(10, {"train/loss": torch.tensor([3.0, 1.0]), "train/relative_error": torch.tensor([0.3, 0.1])})
    grid.add(5, {"train/loss": torch.tensor([float("nan"), 2.0]), "train/relative_error": torch.tensor([0.9, 0.2])})
    grid.add(5, {"val/rmse": torch.tensor(0.5)})
    logger = Recorder()
    out = grid.flush([logger])
    assert [step for step, _ in logger.calls] == [5, 10]
    assert out[5] == {"train/loss": 2.0, "train/relative_error": pytest.approx(0.2), "val/rmse": 0.5}
    assert out[10]["train/relative_error"] == pytest.approx(0.1)
    assert len(grid) == 0 and grid.flush([logger]) == {}
    with pytest.raises(ValueError, match="log_every_n_steps"):
        UpdateGrid(0)


def test_short_names_and_hparams_put_what_changed_first(tmp_path):
    from omegaconf import OmegaConf

    from nmf_lightning.hparams import SHOWN, run_hparams, short_overrides

    dirname = "callbacks.progress_bar.refresh_rate=0,data=digits,model.rank=8,optimizer.lr=0.01,trainer.accelerator=cpu"
    assert short_overrides(dirname) == "data=digits,rank=8,lr=0.01"
    assert short_overrides("") == "defaults"
    assert short_overrides("model.lam=0.30791800489830157,optimizer.lr=0.001") == "lam=0.3079,lr=0.001"
    sweep = OmegaConf.create({"hydra": {"overrides": {"task": ["data=digits", "model.rank=4,8", "optimizer.lr=0.01"]}}})
    OmegaConf.save(sweep, tmp_path / "multirun.yaml")
    assert short_overrides(dirname, str(tmp_path)) == "rank=8"  # only what tells the jobs apart
    files = tmp_path / "files"
    files.mkdir()
    sweep = OmegaConf.create({"hydra": {"overrides": {"task": ["data=file", "data.path=a/cells.h5ad,b/genes.npy"]}}})
    OmegaConf.save(sweep, files / "multirun.yaml")
    assert short_overrides("data=file,model.rank=2", str(files), "b/genes.npy") == "path=genes"  # (not in its dirname)
    cfg = OmegaConf.create(
        {
            "model": {"rank": 8, "lam": 0.0, "loss": "fro", "init": "random", "project": True, "l21_H": 0.5},
            "optimizer": {"_target_": "x", "lr": 0.01},
            "data": {"holdout": 0.1, "seed": 3},
            "trainer": {"max_steps": 100, "precision": "32-true"},
            "seed": 0,
        }
    )
    overrides = ["model.l21_H=0.5", "data.seed=3", "trainer.accelerator=cpu"]
    params, shown = run_hparams(cfg, {"data": "digits", "optimizer": "adam"}, overrides)
    assert list(params)[:2] == ["l21_H", "data.seed"] and params["data.seed"] == 3  # seed is the top-level one
    assert shown == ["l21_H", "data.seed", "rank", "optimizer", "lr"] and len(shown) == SHOWN
    assert params["optimizer"] == "adam" and params["holdout"] == 0.1 and "accelerator" not in params
    assert params["overrides"] == " ".join(overrides)
    assert params["tol"] == 0.0  # no tol in the config: off
    cfg.model.tol, cfg.model.online = None, True
    assert run_hparams(cfg, {}, overrides)[0]["tol"] == 1e-4  # online mode's own test, the one that runs
    params, shown = run_hparams(cfg, {}, overrides, swept=frozenset({"data.seed"}))
    assert list(params)[:2] == ["data.seed", "l21_H"] and shown == ["data.seed"]  # what the sweep varies, alone


@pytest.mark.parametrize(
    "extra",
    [
        ("optimizer=adam", "optimizer.lr=0.05"),
        ("optimizer=hals",),
        ("optimizer=adam", "optimizer.lr=0.05", "model.project=false", "model.restarts=2"),
    ],
    ids=["adam", "hals", "adam-unprojected-restarts"],
)
def test_a_points_value_is_the_same_whether_inside_a_block_or_at_its_end(make_cfg, tmp_path, extra):
    """Each point carries the metrics of the factors after its update: no off-by-one inside blocks."""
    curves = {}
    for inner in (1, 7):
        out = tmp_path / str(inner)
        out.mkdir()
        overrides = (*SMALL, "data.noise=0.1", "model.l1_W=0.001", *extra)
        train(make_cfg(*overrides, "trainer.max_steps=100", f"model.inner_steps={inner}", f"paths.output_dir={out}"))
        ea = _steps(out, "train/loss")[1]
        tags = ("train/loss", "train/relative_error", "train/l1_W")
        curves[inner] = {t: [e.value for e in ea.Scalars(t)] for t in tags}
    for tag, values in curves[1].items():
        assert curves[7][tag] == pytest.approx(values, rel=1e-4), tag


def test_points_inside_a_block_carry_the_time_they_were_reached(make_cfg, tmp_path):
    train(make_cfg(*SMALL, "optimizer=hals", "trainer.max_steps=3000", "model.inner_steps=3000"))
    _, ea = _steps(tmp_path, "train/loss")
    walls = [e.wall_time for e in ea.Scalars("train/loss")]
    assert walls == sorted(walls) and walls[-1] - walls[0] > 0  # one block, yet the times advance
    assert len(set(walls)) > len(walls) // 2


def test_warnings_go_to_the_log_on_their_own_lines_attributed_to_us(caplog):
    import warnings

    from nmf_lightning.console import NMFWarning, run_console

    with caplog.at_level("WARNING"), run_console():
        warnings.warn("the factors collapsed", NMFWarning, stacklevel=1)
        warnings.warn("a library's own warning", RuntimeWarning, stacklevel=1)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, stacklevel=1)
    ours, theirs = caplog.records
    assert ours.name == "nmf_lightning" and ours.getMessage() == "the factors collapsed"
    assert "a library's own warning (RuntimeWarning: " in theirs.getMessage()


def test_the_held_out_curve_ends_at_the_last_update_when_checks_are_sparser(make_cfg, tmp_path):
    metrics = train(
        make_cfg(
            *SMALL,
            "data.holdout=0.1",
            "trainer.max_steps=95",
            "model.inner_steps=10",
            "trainer.val_check_interval=3",
        )
    )
    ea = _steps(tmp_path, "train/loss")[1]
    checks = ea.Scalars("val/relative_error")
    assert [e.step for e in checks] == [30, 60, 90, 95]
    assert checks[-1].value == pytest.approx(metrics["val_relative_error"], rel=1e-5)
