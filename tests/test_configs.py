from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from nmf_lightning.data import NMFDataModule
from nmf_lightning.module import NMFModule
from nmf_lightning.solvers import Solver, registry
from nmf_lightning.train import config_dir

CONFIGS = Path(config_dir())


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def test_every_group_has_its_options():
    assert {"toy", "synthetic", "known_factors", "digits", "newsgroups", "file"} <= set(_options("data"))
    assert {s.name for s in registry.SOLVERS} == set(_options("optimizer"))  # a config for every solver, and no other
    assert {"newsgroups_adam", "toy_masked_l21", "synthetic_known_factors"} <= set(_options("experiment"))


@pytest.mark.parametrize("name", _options("data"))
def test_data_configs_compose_and_instantiate(make_cfg, name):
    cfg = make_cfg(f"data={name}", *(["data.path=x.npy"] if name == "file" else []))
    dm = instantiate(cfg.data, _convert_="all")
    assert isinstance(dm, NMFDataModule) and callable(dm.loader)


@pytest.mark.parametrize("name", _options("optimizer"))
def test_optimizer_configs_build_torch_optimizers(make_cfg, name):
    solver = registry.lookup(name).closed_form
    cfg = make_cfg(f"optimizer={name}", *([] if solver else ["optimizer.lr=0.005"]))
    opt = instantiate(cfg.optimizer, _convert_="all")([torch.nn.Parameter(torch.ones(2))])
    assert isinstance(opt, torch.optim.Optimizer)
    assert isinstance(opt, Solver) if solver else opt.param_groups[0]["lr"] == 0.005


def test_adam_default_is_the_notebook_recipe_with_an_lr_sized_to_the_data(make_cfg):
    factory = instantiate(make_cfg().optimizer, _convert_="all")
    assert factory.keywords["lr"] == "auto" and tuple(factory.keywords["betas"]) == (0.9, 0.9)
    opt = instantiate(make_cfg("experiment=newsgroups_adam").optimizer, _convert_="all")(
        [torch.nn.Parameter(torch.ones(2))]
    )
    assert isinstance(opt, torch.optim.Adam)  # the notebook's recipe keeps its absolute lr
    assert opt.param_groups[0]["lr"] == 1e-3 and tuple(opt.param_groups[0]["betas"]) == (0.9, 0.9)


@pytest.mark.parametrize("name", _options("experiment"))
def test_experiments_compose_as_plain_overrides(make_cfg, name):
    cfg = make_cfg(f"experiment={name}")
    model = instantiate(cfg.model, optimizer=instantiate(cfg.optimizer, _convert_="all"))
    assert isinstance(model, NMFModule)


def test_newsgroups_experiment_is_the_notebook_recipe(make_cfg):
    cfg = make_cfg("experiment=newsgroups_adam")
    assert cfg.data.loader.path.endswith("newsgroups")
    assert (cfg.model.rank, cfg.model.lam, cfg.model.init, cfg.model.init_scale) == (
        100,
        10.0,
        "normal_abs",
        0.01,
    )
    assert (cfg.seed, cfg.trainer.max_steps, cfg.optimizer.lr) == (42, 1000, 1e-3)
    assert list(cfg.data.categories) == ["alt.atheism", "talk.religion.misc", "comp.graphics", "sci.space"]


@pytest.mark.parametrize("group", ["trainer", "logger", "callbacks"])
def test_other_groups_compose_and_instantiate(make_cfg, group):
    for name in _options(group):
        cfg = make_cfg(f"{group}={name}", "trainer.accelerator=cpu")
        if group == "trainer":
            if name == "gpu":
                assert cfg.trainer.accelerator == "cpu"  # the later override wins
                continue
            instantiate(cfg.trainer)
        else:
            for node in cfg[group].values():
                if node is not None:  # the fixture switches the progress bar off
                    assert instantiate(node) is not None


@pytest.mark.parametrize("name", _options("optimizer"))
def test_each_optimizer_config_names_its_registry_entry(make_cfg, name):
    cfg = make_cfg(f"optimizer={name}")
    assert registry.of_target(cfg.optimizer._target_) is registry.lookup(name)


def test_a_capability_the_registry_denies_is_refused_in_the_solvers_words():
    """Every refusal derives from the registry: a solver declared without sparse support is refused on sparse X."""
    import dataclasses

    from nmf_lightning.params import CLI_WORDS, Layout, check_compatible
    from nmf_lightning.validation import NMFInputError

    dense_only = dataclasses.replace(registry.lookup("als"), sparse=False)
    check_compatible(dense_only, CLI_WORDS, layout=Layout())
    with pytest.raises(NMFInputError, match=r"optimizer=als needs X dense, and X is sparse; use optimizer=hals, mu"):
        check_compatible(dense_only, CLI_WORDS, layout=Layout(sparse=True))


def test_a_run_folder_is_named_after_its_data_file():
    from nmf_lightning.hparams import data_name

    assert data_name("file", "/data/cells.h5ad") == "cells"
    assert data_name("file", "runs/pbmc 68k.v2.npz") == "pbmc_68k"
    assert data_name("digits", None) == "digits" and data_name("digits") == "digits"
    hydra_cfg = (Path(config_dir()) / "hydra" / "default.yaml").read_text()
    assert "${nmf.data_name:${hydra:runtime.choices.data},${oc.select:data.path,null}}" in hydra_cfg
