"""What a run is called, which hyperparameters its HPARAMS row shows first, and its curves' layout.

TensorBoard names a run by its folder and shows five hyperparameter columns by default:
those that differ between runs, then the rest by name. A run here marks as differing the
keys its command line changed, then the ones users compare most (rank, optimizer, lr,
λ, loss), so the table opens on what a sweep varied.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from nmf_lightning.engine.problem import effective_tol
from nmf_lightning.internals import file_writer

#: the flat hyperparameters of a run, in the order they matter to a comparison, and their config keys
KEYS = {
    "rank": "model.rank",
    "optimizer": "optimizer",
    "lr": "optimizer.lr",
    "lam": "model.lam",
    "loss": "model.loss",
    "init": "model.init",
    "restarts": "model.restarts",
    "tol": "model.tol",
    "holdout": "data.holdout",
    "data": "data",
    "project": "model.project",
    "l1_W": "model.l1_W",
    "l1_H": "model.l1_H",
    "l2_W": "model.l2_W",
    "l2_H": "model.l2_H",
    "l21_H": "model.l21_H",
    "max_steps": "trainer.max_steps",
    "precision": "trainer.precision",
    "seed": "seed",
}
#: columns TensorBoard's HPARAMS table shows before a user picks others
SHOWN = 5
#: command-line keys that say where or how a run goes, not what it is
_NOT_HPARAMS = re.compile(
    r"^(hydra|paths|callbacks|logger|launcher|hparams_search|ckpt_path|threads|gpu|spread_gpus"
    r"|trainer\.(accelerator|devices|enable_\w+|default_root_dir)|data\.num_workers)\b"
)


def short_name(key: str) -> str:
    """``model.rank`` -> ``rank``, ``optimizer=hals``'s key -> ``optimizer``; ``+``/``~`` dropped."""
    return key.lstrip("+~").rpartition(".")[2]


def data_name(choice: str, path: str | None = None) -> str:
    """A run folder's name for its data: the file's own name for ``data=file`` (``cells.h5ad`` -> ``cells``)."""
    if not path:
        return str(choice)
    stem = Path(str(path)).name.split(".")[0] or str(choice)
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem)


def short_overrides(override_dirname: str, sweep_dir: str | None = None, path: str | None = None) -> str:
    """A sweep job's name from Hydra's ``key=value,...``: ``model.rank=8,optimizer.lr=0.01`` -> ``rank=8,lr=0.01``.

    With the ``sweep_dir``, only the keys the sweep varies (what tells its jobs apart);
    the keys every job shares are in the sweep's ``multirun.yaml``. A swept ``data.path``
    (left out of Hydra's name: a path) shows as its file's name (``path=cells``).
    """
    items = re.split(r",(?=[+~]*[\w.]+=)", override_dirname) if override_dirname else []
    pairs = [(k.lstrip("+~"), v) for k, _, v in (item.partition("=") for item in items)]
    pairs = [(k, v) for k, v in pairs if not _NOT_HPARAMS.match(k)]
    swept = swept_keys(sweep_dir) if sweep_dir else set()
    if path and "data.path" in swept:
        pairs = [("data.path", data_name("file", path)), *pairs]
    if any(k in swept for k, _ in pairs):
        pairs = [(k, v) for k, v in pairs if k in swept]
    return ",".join(f"{short_name(k)}={_short_value(v)}" for k, v in pairs) or "defaults"


def _short_value(value: str) -> str:
    """A search sweeper's 0.30791800489830157 as 0.3079; other values as they are."""
    if re.fullmatch(r"-?\d*\.\d{5,}(e-?\d+)?", value):
        return f"{float(value):.4g}"
    return value


@functools.lru_cache(maxsize=8)
def swept_keys(sweep_dir: str) -> frozenset[str]:
    """Keys a multirun varies: its sweep overrides (``model.rank=2,4``) and search space (Optuna's params)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys: set[str] = set()
    path = Path(sweep_dir) / "multirun.yaml"
    sweep = OmegaConf.load(path) if path.is_file() else OmegaConf.create()
    task = list(OmegaConf.select(sweep, "hydra.overrides.task", default=None) or [])
    for override in OverridesParser.create().parse_overrides(task):
        if override.is_sweep_override():
            keys.add(override.key_or_group)
    params = OmegaConf.select(sweep, "hydra.sweeper.params", default=None)
    if params is None and HydraConfig.initialized():  # a search sweeper writes no multirun.yaml first
        params = HydraConfig.get().sweeper.get("params")
    keys |= set(params or {})
    return frozenset(keys)


def overridden_keys(overrides: list[str]) -> list[str]:
    """Config keys a command line changed (``model.rank=8`` -> ``model.rank``), hyperparameters only."""
    keys = [item.partition("=")[0].lstrip("+~") for item in overrides]
    return [k for k in dict.fromkeys(keys) if k and not _NOT_HPARAMS.match(k)]


def run_hparams(
    cfg: DictConfig, choices: dict[str, Any], overrides: list[str], swept: frozenset[str] = frozenset()
) -> tuple[dict[str, Any], list[str]]:
    """The run's flat hyperparameters (changed keys first) and the names to show first.

    ``choices`` are the config groups picked (Hydra's runtime choices); ``overrides`` the
    command line's ``key=value`` items, whose keys come first under their short names
    (a full key where the short one would be ambiguous), those a sweep varies (``swept``)
    before the rest, with ``overrides`` itself as text.
    """
    opt = cfg.optimizer
    base = {
        "rank": cfg.model.rank if cfg.model.rank == "auto" else int(cfg.model.rank),  # (auto: set once chosen)
        "optimizer": str(choices.get("optimizer") or opt.get("_target_")),
        "lr": opt.get("lr") if opt.get("lr") == "auto" else float(opt.get("lr", math.nan)),
        "lam": float(cfg.model.lam),
        "loss": str(cfg.model.loss),
        "init": str(cfg.model.init),
        "restarts": int(cfg.model.get("restarts", 1)),
        "tol": effective_tol(cfg.model.get("tol"), bool(cfg.model.get("online")), 10)[0],  # the test run
        "holdout": float(cfg.data.get("holdout", 0.0)),
        "data": str(choices.get("data") or cfg.data.get("loader", {}).get("path")),
        "project": bool(cfg.model.project),
        **{k: float(cfg.model.get(k, 0.0)) for k in ("l1_W", "l1_H", "l2_W", "l2_H", "l21_H")},
        "max_steps": int(cfg.trainer.max_steps),
        "precision": str(cfg.trainer.precision),
        "seed": int(cfg.seed),
    }
    full = {v: k for k, v in KEYS.items()}
    changed: dict[str, Any] = {}
    for key in sorted(overridden_keys(overrides), key=lambda k: k not in swept):
        name = full.get(key) or short_name(key)
        if name in base and KEYS.get(name) != key or name in changed:
            name = key  # e.g. data.seed beside the top-level seed
        value = base[name] if name in base else _value(cfg, choices, key)
        changed[name] = value
    params = {**changed, **{k: v for k, v in base.items() if k not in changed}}
    params["overrides"] = " ".join(overrides) or "(defaults)"
    varied = sum(1 for key in overridden_keys(overrides) if key in swept)
    return params, list(params)[: varied or SHOWN]  # a sweep's table opens on what it varies, then the metrics


def _value(cfg: DictConfig, choices: dict[str, Any], key: str) -> Any:
    if key in choices:
        return str(choices[key])
    value = OmegaConf.select(cfg, key, default=None)
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)


def write_hparams(writer: Any, params: dict[str, Any], metrics: list[str], shown: list[str]) -> None:
    """Write the HPARAMS tab's experiment, session start and end for one run.

    ``metrics`` are scalar tags logged at the end (their order is the table's); the
    ``shown`` hyperparameters are marked as differing, which TensorBoard shows first.
    """
    from tensorboard.plugins.hparams import plugin_data_pb2
    from torch.utils.tensorboard.summary import hparams

    exp, ssi, sei = hparams(params, {m: math.nan for m in metrics})
    content = plugin_data_pb2.HParamsPluginData.FromString(exp.value[0].metadata.plugin_data.content)
    for info in content.experiment.hparam_infos:
        info.differs = info.name in shown
    exp.value[0].metadata.plugin_data.content = content.SerializeToString()
    events = file_writer(writer)
    for summary in (exp, ssi, sei):
        events.add_summary(summary)


def write_layout(writer: Any, online: bool, negatives: bool, restarts: bool) -> None:
    """Lay out the CUSTOM SCALARS tab: errors first, train and held-out on one chart.

    SCALARS sorts groups by name and opens on ``train``. Charts are
    made only for curves the run logs: ``online`` errors, the ``negatives`` of factors
    free to go below 0, each restart's loss.
    """
    group = "online" if online else "train"
    layout: dict[str, dict[str, list]] = {
        "errors": {
            "relative error (train, held-out)": ["Multiline", [f"{group}/relative_error", "val/relative_error"]],
            "RMSE (train, held-out)": ["Multiline", [f"{group}/rmse", "val/rmse"]],
            "divergence (train, held-out)": ["Multiline", [f"{group}/divergence", "val/divergence"]],
        },
        "objective": {
            "loss": ["Multiline", [f"{group}/loss"]],
            "terms": ["Multiline", [rf"{group}/(reconstruction|penalty|l1_W|l1_H|l2_W|l2_H|l21_H)$"]],
        },
        "factors": {"sparsity of W and H": ["Multiline", [rf"{group}/sparsity_[WH]"]]},
    }
    if negatives:
        layout["factors"]["negative share before clamping"] = ["Multiline", [rf"{group}/neg_fraction_[WH]"]]
        layout["factors"]["negative mass before clamping"] = ["Multiline", [rf"{group}/neg_mass_[WH]"]]
        layout["objective"]["penalty weight (grown by model.lam_growth)"] = ["Multiline", [f"{group}/lam"]]
    if restarts:
        layout["restarts"] = {"loss of each restart": ["Multiline", [r"restarts/loss_.*"]]}
    writer.add_custom_scalars(layout)
