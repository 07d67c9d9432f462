"""The Hydra entry point: compose -> check -> instantiate -> fit -> save.

Run ``nmf-train`` (or ``python -m nmf_lightning.train``) with Hydra overrides, e.g.
``nmf-train data=digits model.rank=16 optimizer=sgd optimizer.lr=0.01``.
"""

from __future__ import annotations

import difflib
import inspect
import json
import logging
import math
import os
import pickle
import shlex
import signal
import sys
import warnings
import zipfile
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
import scipy.sparse as sp
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import (
    ConfigCompositionException,
    HydraException,
    InstantiationException,
    MissingConfigException,
    OverrideParseException,
)
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from nmf_lightning.atomic import save_npz, write_text, write_together
from nmf_lightning.callbacks import AtomicCheckpointIO, GracefulStop, RunHparams, StoppedAtOnceError
from nmf_lightning.console import NMFWarning, TqdmHandler, run_console
from nmf_lightning.curves import check_every
from nmf_lightning.distributed import ShardedDDP, check_shardable, global_rank, is_main_process
from nmf_lightning.engine import DivergenceError
from nmf_lightning.gpus import claimed_gpu
from nmf_lightning.hparams import data_name, run_hparams, short_overrides, swept_keys
from nmf_lightning.module import MODEL_CONSTRAINTS, NMFModule
from nmf_lightning.params import CLI_WORDS, CONSTRAINTS, Integer, check_params, one_of
from nmf_lightning.recorder import metric_key, metric_tag
from nmf_lightning.rundir import RunDirError, check_finished, claim_run_dir, continues, discard_refused
from nmf_lightning.solvers import registry
from nmf_lightning.status import SUCCEEDED
from nmf_lightning.validation import NMFInputError, check_accelerator, check_checkpoint_factors, check_precision

log = logging.getLogger(__name__)

# `${nmf.cuda_devices:}` in configs: the number of visible GPUs (at least 1), e.g. for n_jobs
OmegaConf.register_new_resolver("nmf.cuda_devices", lambda: max(1, torch.cuda.device_count()), replace=True)
# `${nmf.short:${hydra.job.override_dirname}}`: a sweep job's folder (and TensorBoard run) name, rank=8,lr=0.01
OmegaConf.register_new_resolver("nmf.short", short_overrides, replace=True)
# `${nmf.data_name:${hydra:runtime.choices.data},${oc.select:data.path,null}}`: a run folder's data, the file's name
OmegaConf.register_new_resolver("nmf.data_name", data_name, replace=True)


def config_dir() -> str:
    """The config tree: inside the installed package (wheel), else the repository's ``configs/``."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"nmf-lightning's configs/ were not found next to {here}; reinstall the package.")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train one NMF as configured and write factors.npz and metrics.json to the output dir.

    Returns the final metrics (the contents of metrics.json). The folder is held for the
    run: one with a finished run is refused unless ``overwrite`` or ``ckpt_path`` is set.
    """
    out = Path(cfg.paths.output_dir)
    overwrite, resume = bool(cfg.get("overwrite")), continues(cfg.get("ckpt_path"), out)
    if not is_main_process():  # a DDP rank of rank 0's run: that one holds the folder and writes
        _quiet_console()
        check_finished(out, overwrite, resume)
        return _train(cfg)
    with claim_run_dir(out, overwrite, resume):
        return _train(cfg)


def _quiet_console() -> None:
    """Other ranks than 0 say only errors on the console (their warnings are rank 0's) and log to their own file.

    Under torchrun or SLURM every rank runs the same command, so its log file would be rank
    0's: it becomes ``<job>_rank<r>.log`` (the ranks nmf-train starts itself are named so already).
    """
    root = logging.getLogger()
    rank = global_rank()
    for handler in list(root.handlers):
        if isinstance(handler, TqdmHandler):
            handler.setLevel(logging.ERROR)
        elif isinstance(handler, logging.FileHandler) and "_rank" not in Path(handler.baseFilename).stem:
            path = Path(handler.baseFilename)
            own = logging.FileHandler(path.with_name(f"{path.stem}_rank{rank}{path.suffix}"))
            own.setFormatter(handler.formatter)
            own.setLevel(handler.level)
            root.removeHandler(handler)
            handler.close()
            root.addHandler(own)


def _check_ckpt_path(cfg: DictConfig) -> int | None:
    """A checkpoint to resume from must be one this run can continue, before any data is loaded: its updates.

    It is read as tensors and numbers only (nothing in it runs), and its factors checked:
    of this run's rank and restarts, finite, and >= 0 where the run keeps them so.
    """
    ckpt = cfg.get("ckpt_path")
    if ckpt is None:
        return None
    if ckpt == "last":
        checkpoint = cfg.get("callbacks", {}).get("model_checkpoint") or {}
        folder = Path(checkpoint.get("dirpath") or Path(cfg.paths.output_dir) / "checkpoints")
        path = folder / "last.ckpt"
        if not path.is_file():
            raise NMFInputError(
                f"ckpt_path=last continues the run in {cfg.paths.output_dir}, but {folder} holds no last.ckpt; "
                "give that run's folder as hydra.run.dir (and the same overrides), or a checkpoint's path."
            )
    else:
        path = Path(str(ckpt)).expanduser()
        if not path.is_file():
            what = "a folder" if path.is_dir() else "not found"
            raise NMFInputError(
                f"ckpt_path={ckpt} is {what}; give a checkpoint file (e.g. <run>/checkpoints/last.ckpt)."
            )
    if not zipfile.is_zipfile(path):
        raise NMFInputError(f"ckpt_path={path} is not a checkpoint (truncated, or another kind of file).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise NMFInputError(
            f"ckpt_path={path} holds other Python objects than a checkpoint's tensors and numbers, which are not "
            "loaded (loading them could run code); resume from a checkpoint nmf-train wrote."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NMFInputError(
            f"ckpt_path={path} cannot be read ({reason}); it is damaged: resume from another."
        ) from None
    factors = state.get("state_dict", {}) if isinstance(state, dict) else {}
    biased = bool(cfg.model.get("biases", False))
    if isinstance(factors, dict) and "W" in factors and ("b" in factors) != biased:
        raise NMFInputError(
            f"ckpt_path={path} was trained with model.biases={str(not biased).lower()}, this run has "
            f"model.biases={str(biased).lower()}; resume with the setting it was trained with."
        )
    projected = bool(cfg.model.get("project", True)) or bool(
        getattr(registry.of_target(str(cfg.optimizer._target_)), "closed_form", False)
    )
    check_checkpoint_factors(
        factors.get("W"),
        factors.get("H"),
        int(cfg.model.rank),
        int(cfg.model.get("restarts", 1)),
        projected,
        f"ckpt_path={path}",
    )
    return int(state.get("global_step", 0))


def _train(cfg: DictConfig) -> dict[str, Any]:
    """Check the configuration, load X, instantiate the run, fit it and export what it found."""
    done = check_config(cfg)
    if done is not None and done >= int(cfg.trainer.max_steps):  # a requeued job whose run had finished
        return _already_done(cfg, done)
    _configure_torch(cfg)
    log.info("Loading data <%s>", _choice("data", cfg.data.get("loader", {}).get("path")))
    datamodule = _build(cfg.data, "data", _convert_="all")
    datamodule.setup("fit")  # load and check X now, before anything is trained or written
    matrix = datamodule.matrix
    rank = cfg.model.rank if cfg.model.rank != "auto" else cfg.model.rank_max  # (auto: the largest it may fit)
    _set_auto_threads(cfg, matrix, int(rank))
    layout = "sparse" if sp.issparse(matrix.X) or getattr(matrix.X, "sparse", False) else "dense"
    n, m = matrix.shape
    observed = datamodule.summary.n_obs
    missing = (
        ""
        if observed == n * m or (layout == "sparse" and not matrix.unstored_missing)
        else f", {n * m - observed:,} missing"
    )
    log.info("X: %s x %s %s%s%s", n, m, layout, missing, " (streamed in row blocks)" if datamodule.streamed else "")
    model, trainer = _instantiate(cfg, datamodule)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except DivergenceError as err:
        path = Path(cfg.paths.output_dir) / "factors_last_finite.npz"
        if trainer.is_global_zero and err.W is not None:
            save_npz(path, W=err.W, H=err.H)
        raise DivergenceError(f"{err} The last finite factors are in {path}.", err.step, err.W, err.H) from None
    return _export(cfg, trainer, model, datamodule.holdout is not None)


def check_config(cfg: DictConfig) -> int | None:
    """What the configuration alone can get wrong, before any data is loaded (the model's own keys at its build).

    Returns the updates of the checkpoint to resume from (None without one).
    """
    done = _check_ckpt_path(cfg)
    check_accelerator(cfg.trainer.get("accelerator"), cfg.trainer.get("devices"), sharded=_sharded(cfg))
    check_precision(cfg.trainer.get("precision"))
    values = {"steps": cfg.trainer.get("max_steps")}
    if "lr" in cfg.optimizer:
        values["lr"] = cfg.optimizer.lr
    check_params(values, name=CLI_WORDS)
    check_every(cfg.trainer.get("log_every_n_steps", 10))
    check_params({"threads": cfg.get("threads")}, {"threads": one_of("auto", None, Integer(1))}, CLI_WORDS)
    top = {"seed": CONSTRAINTS["seed"], "gpu": one_of(None, Integer(0))}
    check_params({"seed": cfg.get("seed"), "gpu": cfg.get("gpu")}, top, CLI_WORDS)
    model = cfg.get("model") or {}
    constraints = {**CONSTRAINTS, **MODEL_CONSTRAINTS}  # the model's keys, as its build checks them
    check_params({k: model[k] for k in model if k in constraints}, constraints, CLI_WORDS)
    matmul = cfg.get("matmul_precision", "highest")
    if matmul not in ("highest", "high", "medium"):
        raise NMFInputError(f"matmul_precision={matmul!r} must be highest, high or medium.")
    return done


def _already_done(cfg: DictConfig, done: int) -> dict[str, Any]:
    """A resumed run whose checkpoint already has ``trainer.max_steps`` updates: nothing to train, say so."""
    out = Path(cfg.paths.output_dir)
    try:
        metrics = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        metrics = {}
    if metrics.get("status") not in SUCCEEDED:
        raise NMFInputError(
            f"ckpt_path={cfg.ckpt_path} already has {done} updates, trainer.max_steps={cfg.trainer.max_steps}: "
            "raise trainer.max_steps to train on from it."
        )
    log.info(
        "the run in %s is complete (%d updates of trainer.max_steps=%d): nothing to train; raise trainer.max_steps "
        "to continue it",
        out,
        done,
        cfg.trainer.max_steps,
    )
    return metrics


#: threads=auto: below this many multiply-adds per product with X, one thread is fastest
SMALL_WORK = 10_000_000


def auto_threads(work: float, cores: int) -> int:
    """``threads=auto``: one thread for a small problem, else every core this process may use.

    On 2 cores, digits (1797 x 64, k = 16) and 500 x 400 (k = 20) run 1.3-1.4x faster on
    one thread than on two, 2000 x 1000 (k = 20) 1.25-1.46x slower; on a busy machine,
    many threads on a small problem collapse (see docs/cli.md, "threads").
    """
    return 1 if work < SMALL_WORK else max(1, cores)


def _set_auto_threads(cfg: DictConfig, matrix: Any, rank: int) -> None:
    """Apply ``threads=auto`` once X's size is known: the stored entries of a product's X times the rank.

    A streamed X is multiplied a row block at a time: the block's size decides, not X's.
    """
    if cfg.get("threads") != "auto":
        return
    X = matrix.X
    entries = X.nnz if sp.issparse(X) else int(np.prod(matrix.shape))
    batch_rows = cfg.data.get("batch_rows")
    if batch_rows and matrix.shape[0] > batch_rows:
        entries = entries * int(batch_rows) / matrix.shape[0]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = auto_threads(float(entries) * rank, cores)
    torch.set_num_threads(threads)
    log.info("threads=auto: %d CPU thread%s", threads, "" if threads == 1 else "s")


def _configure_torch(cfg: DictConfig) -> None:
    """Seeds, CPU threads and float32 matmul precision for this process."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.get("threads") and cfg.threads != "auto":
        torch.set_num_threads(int(cfg.threads))
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "highest"))


def _instantiate(cfg: DictConfig, datamodule: Any) -> tuple[NMFModule, L.Trainer]:
    """The module, the callbacks, the loggers and the trainer, checked against each other before training.

    Nothing is written yet: the loggers open their files when training starts
    (:class:`~nmf_lightning.callbacks.RunHparams`), after the module has checked X against its solver.
    """
    held_out = datamodule.holdout is not None
    callbacks = [_build(c, "callbacks") for c in cfg.get("callbacks", {}).values() if c is not None]
    callbacks.append(GracefulStop())  # SIGTERM, SIGINT, SIGUSR1: finish the update, save, report
    _check_early_stopping(callbacks, held_out)
    optimizer = _build_optimizer(cfg)
    _check_optimizer(optimizer, _choice("optimizer", str(cfg.optimizer.get("_target_")).rsplit(".", 1)[-1]))
    model: NMFModule = _build(_model_config(cfg, callbacks), "model", optimizer=optimizer)
    _check_optimized_metric(cfg, model, held_out)
    loggers = [_build(c, "logger") for c in cfg.get("logger", {}).values() if c is not None]
    choices, overrides, swept = _command_line()
    params, shown = run_hparams(cfg, choices, overrides, swept)
    negatives = not cfg.model.project and not model.spec.info.closed_form
    callbacks.append(RunHparams(params, shown, hp_metric_names(held_out), bool(cfg.model.get("online")), negatives))
    extra = {"plugins": [AtomicCheckpointIO()], **_trainer_overrides(cfg, held_out)}
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, **extra)
    _check_ranks(cfg, trainer, datamodule.matrix.shape[0])
    model.check(datamodule, trainer.precision, trainer.world_size)  # X against the solver: before files are opened
    model.choose_rank(datamodule, trainer.precision, int(cfg.trainer.max_steps), trainer.strategy.root_device)
    params["rank"] = model.spec.rank  # HPARAMS shows the rank trained (the one chosen, for rank=auto)
    logged = {k: v for k, v in params.items() if k != "overrides" and not (isinstance(v, float) and math.isnan(v))}
    log.info("config: %s", ", ".join(f"{k}={v}" for k, v in logged.items()))  # (a closed form has no lr: NaN)
    log.info("overrides: %s", params["overrides"])
    log.info("device: %s, precision %s", _device(trainer), cfg.trainer.precision)
    return model, trainer


def _export(cfg: DictConfig, trainer: L.Trainer, model: NMFModule, held_out: bool) -> dict[str, Any]:
    """Write the run's results, all in one place: factors.npz, metrics.json, the HPARAMS row; rank 0 only."""
    out = Path(cfg.paths.output_dir)
    metrics = {metric_key(k): v for k, v in model.final_metrics.items()}
    if not trainer.is_global_zero:  # rank 0 writes the results (W gathered from every rank)
        return metrics
    metrics["status"] = "completed" if model.stop_signal is None else "interrupted"
    metrics["stop_reason"] = _stop_reason(trainer, model)
    W, H = model.factors()
    reason = degenerate_reason(metrics, *model.factors(raw=True)) if model.stop_signal is None else None
    if reason is not None:
        metrics.update(status="degenerate", reason=reason)
    elif model.stop_signal is None and model.clamped is not None and model.clamped.costly:
        metrics.update(status="not_nonnegative", reason=model.clamped.message(model.spec, CLI_WORDS))
    log.debug("final metrics: %s", json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)}))
    ends = {metric_tag(k): metrics[k] for k in hp_metric_names(held_out)}
    ends = {tag: v for tag, v in ends.items() if not model.grid.ends_at(tag, trainer.global_step, v)}
    for logger in trainer.loggers:  # HPARAMS shows the curves' last points: they are the final metrics
        if ends:
            logger.log_metrics(ends, step=trainer.global_step)
        logger.finalize("success" if reason is None else "failed")
    if reason is not None:
        write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        lr = trainer.optimizers[0].param_groups[0].get("lr") if trainer.optimizers else None
        hint = _degenerate_hint(cfg, lr) if math.isfinite(metrics["relative_error"]) else NAN_HINT
        raise DegenerateError(f"{reason}; {hint}. No factors.npz was written.")
    extra = model.bias_arrays()  # a biased model's mu, b and c, and the scale its predictions are clipped to
    if getattr(model, "rating_range", None) is not None:
        extra["rating_range"] = np.asarray(model.rating_range, dtype=np.float64)
    write_together(
        out,  # both or neither: a kill between them must not leave the factors of one update with another's metrics
        {
            "factors.npz": lambda f: np.savez(f, W=W, H=H, **extra),
            "metrics.json": lambda f: f.write((json.dumps(metrics, indent=2) + "\n").encode()),
        },
    )
    if model.stop_signal is not None:
        raise InterruptedRunError(model.stop_signal, metrics["steps"], out)
    key = cfg.get("optimized_metric") or "relative_error"
    shown = [key] + [k for k in ("relative_error", "loss") if k != key]
    curves = any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers)
    log.info(  # one short line: metrics.json holds every number and the whole stop reason
        "%s after %d updates (%s, %s): %s%s",
        ", ".join(f"{k} {metrics[k]:.6g}" for k in shown if k in metrics),
        metrics["steps"],
        str(metrics["stop_reason"]).split(":")[0],
        metrics["status"],
        out,
        f"; curves: tensorboard --logdir {shlex.quote(str(out))}" if curves else "",
    )
    return metrics


class InterruptedRunError(Exception):
    """A stop signal ended the run after a consistent update, with everything saved."""

    def __init__(self, signum: int, steps: int, out: Path):
        self.signum = signum
        super().__init__(
            f"{signal.Signals(signum).name} after {steps} updates: saved factors.npz, metrics.json "
            f"(status interrupted) and checkpoints/last.ckpt in {out}; continue with: {resume_command(out)}"
        )


def resume_command(out: Path) -> str:
    """The command that continues a run where it stopped: its own overrides, its folder and ``ckpt_path=last``."""
    _, overrides, _ = _command_line()
    kept = [o for o in overrides if o.partition("=")[0].lstrip("+~") not in ("hydra.run.dir", "ckpt_path")]
    return shlex.join(["nmf-train", *kept, f"hydra.run.dir={out}", "ckpt_path=last"])


class DegenerateError(RuntimeError):
    """Training ran, but its factors are no factorization: they collapsed to zero."""


def degenerate_reason(metrics: dict[str, Any], W: np.ndarray, H: np.ndarray) -> str | None:
    """Why the trained factors are useless as an NMF (all zero, no better than zero, unmeasurable), or None.

    ``W``, ``H`` and the error judged are the factors as trained: factors that went negative
    and fit worse once clamped did not collapse (their status is ``not_nonnegative``).
    """
    error = metrics.get("trained_relative_error", metrics["relative_error"])
    if not math.isfinite(error) or not math.isfinite(metrics["relative_error"]):
        return "the final relative error is not a number"
    for name, A in (("W", W), ("H", H)):
        if not np.any(A):
            return f"the factors collapsed: {name} is all zero (relative error {error:.4g})"
    if error >= DEGENERATE_ERROR:
        return f"the factors collapsed: relative error {error:.4g}, no better than all-zero factors (1.0)"
    return None


def _degenerate_hint(cfg: DictConfig, lr: float | None) -> str:
    """What to lower: the penalties that are on, or the learning rate (``lr``: the one trained with)."""
    penalties = [f"model.{k}={cfg.model[k]}" for k in PENALTIES if cfg.model.get(k)]
    hints = [f"lower the penalty ({', '.join(penalties)})"] if penalties else []
    if lr is not None:
        hints.append(f"lower the learning rate (e.g. optimizer.lr={float(lr) / 10:g})")
    return " or ".join(hints) if hints else "check X and model.rank"


def _model_config(cfg: DictConfig, callbacks: list[Any]) -> DictConfig:
    """cfg.model, with fixed blocks of updates when early stopping reads the validations.

    Blocks sized by the clock would make the validation points, and so where the run
    stops, depend on the machine.
    """
    if any(isinstance(c, EarlyStopping) for c in callbacks) and cfg.model.get("inner_steps") == "auto":
        log.info("early stopping: validating every %d updates (model.inner_steps)", EARLY_STOPPING_BLOCK)
        return OmegaConf.merge(cfg.model, {"inner_steps": EARLY_STOPPING_BLOCK})
    return cfg.model


def _trainer_overrides(cfg: DictConfig, held_out: bool) -> dict[str, Any]:
    """Trainer arguments that follow from the data and the sweep: validation, device index."""
    # the datamodule hands each DDP rank its own rows: no sampler of Lightning's splits them again
    extra: dict[str, Any] = {"use_distributed_sampler": False}
    if not held_out:
        extra["limit_val_batches"] = 0
    if held_out and cfg.trainer.get("val_check_interval") is None:
        extra["val_check_interval"] = 1  # after every block of updates
    if cfg.get("gpu") is not None:
        extra["devices"] = [int(cfg.gpu)]
    return extra


def _sharded(cfg: DictConfig) -> bool:
    """Whether the trainer runs the row-sharded DDP strategy (``trainer=ddp``)."""
    strategy = cfg.trainer.get("strategy")
    return isinstance(strategy, DictConfig) and strategy.get("_target_") == SHARDED_DDP


def _check_ranks(cfg: DictConfig, trainer: L.Trainer, n_rows: int) -> None:
    """What DDP cannot shard is refused here, before any rank is started (the solver's part: NMFModule.check)."""
    if trainer.world_size <= 1:
        return
    check_shardable(n_rows, trainer.world_size, cfg.data.get("batch_rows"))
    if not isinstance(trainer.strategy, ShardedDDP):
        raise NMFInputError(
            f"trainer.strategy={type(trainer.strategy).__name__} would sync W, whose rows differ between ranks; "
            "use trainer=ddp (nmf-lightning's row-sharded DDP strategy)."
        )


def _stop_reason(trainer: L.Trainer, model: NMFModule) -> str:
    """Why the run ended: max_steps, convergence (model.tol), early stopping or an interrupt."""
    if trainer.interrupted:
        return "interrupted"
    reason = model.stop_reason
    for callback in trainer.callbacks:
        if isinstance(callback, EarlyStopping) and callback.stopping_reason_message:
            reason = f"early stopping: {callback.stopping_reason_message}"
    restored = getattr(model, "restored_from_step", None)
    if restored is not None:
        reason += f" (factors restored from update {restored}, the best validation check)"
    return reason


def _build(node: DictConfig, group: str, **kwargs: Any) -> Any:
    """``instantiate``, with the configuration's errors said as such (exit code 2) and our own let through.

    A bug inside a constructor keeps its traceback.
    """
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, NMFInputError):
            raise cause from None
        if cause is None or isinstance(cause, ImportError) or _signature_error(cause):
            raise NMFInputError(f"the {group} config cannot be built: {cause or err}") from None
        raise cause from err


def _signature_error(err: BaseException) -> bool:
    """Whether a TypeError says a call did not match its function's arguments (a config's keys), not a bug within."""
    text = str(err)
    return isinstance(err, TypeError) and ("argument" in text and ("unexpected" in text or "missing" in text))


def _build_optimizer(cfg: DictConfig) -> Any:
    """The optimizer's factory, without the keys its target does not take.

    An experiment sets keys of its own optimizer (``lr``, ``betas``); picking another
    optimizer group on the command line keeps them in the merged config, and a
    closed-form solver takes none of them: they are left out, with a warning that names them.
    """
    node = cfg.optimizer
    target = _locate(node.get("_target_"))
    if target is None:
        return _build(node, "optimizer", _convert_="all")
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):  # no signature to read: build it as it is
        return _build(node, "optimizer", _convert_="all")
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return _build(node, "optimizer", _convert_="all")
    extra = [k for k in node if not str(k).startswith("_") and k not in parameters]
    if extra:
        info = registry.of_target(str(node.get("_target_")))
        name = info.name if info is not None else _choice("optimizer", node.get("_target_"))
        warnings.warn(
            f"optimizer={name} takes no {', '.join(extra)} (set by the config for another optimizer); "
            "they are left out.",
            NMFWarning,
            stacklevel=2,
        )
        node = OmegaConf.create({k: v for k, v in node.items() if k not in extra})
    return _build(node, "optimizer", _convert_="all")


def _check_optimizer(factory: Any, name: str) -> None:
    """Build the optimizer once over stand-in factors: a setting it refuses (``optimizer.betas=abc``) is named now.

    (Training builds it again over W and H; the first build in a process is the slow one.)
    """
    if not callable(factory):
        return
    keywords = factory.keywords if isinstance(factory, partial) else {}
    if "lr" in keywords and keywords["lr"] in ("auto", None):  # lr=auto is set from the factors at the start
        factory = partial(factory, lr=1e-3)
    try:
        factory([torch.zeros(2, 1, requires_grad=True), torch.zeros(1, 2, requires_grad=True)])
    except (TypeError, ValueError) as err:
        shown = ", ".join(f"optimizer.{k}={v!r}" for k, v in keywords.items())
        raise NMFInputError(f"optimizer={name} cannot be built from its settings ({shown or 'none'}): {err}") from None


def _locate(target: Any) -> Any:
    """The class or function a ``_target_`` names, or None when it cannot be found (the build then says why)."""
    try:
        return hydra.utils.get_object(str(target)) if target else None
    except Exception:  # noqa: BLE001 - a bad target is reported by _build, with Hydra's words
        return None


#: what a user's input or configuration gets wrong (exit code 2, one line): the project's input errors, and
#: Hydra's and OmegaConf's own (a missing value, a bad interpolation)
CONFIG_ERRORS = (NMFInputError, HydraException, OmegaConfBaseException)
#: the config target of the row-sharded DDP strategy (trainer=ddp)
SHARDED_DDP = "nmf_lightning.distributed.ShardedDDP"
#: a final relative error at least this high is no fit (all-zero factors have 1.0)
DEGENERATE_ERROR = 0.999
#: what to do about a run whose error cannot be measured
NAN_HINT = (
    "X's values may be too small or too large for the training precision: rescale X "
    "(e.g. divide by its largest value) or use trainer.precision=64-true"
)
#: the penalty weights of model/, in the order a hint names them
PENALTIES = ("lam", "l1_W", "l1_H", "l2_W", "l2_H", "l21_H")
#: with early stopping and model.inner_steps=auto, validate every this many updates
EARLY_STOPPING_BLOCK = 100
#: final metrics shown in TensorBoard's HPARAMS tab, in its column order
HP_METRICS = ("relative_error", "loss", "rmse", "divergence", "reconstruction")
#: ... and, with data.holdout > 0, the held-out ones
VAL_METRICS = ("val_relative_error", "val_rmse", "val_divergence")


def hp_metric_names(held_out: bool) -> tuple[str, ...]:
    """The HPARAMS columns: the errors first (held-out before training), then the loss."""
    if not held_out:
        return HP_METRICS
    return (
        "val_relative_error",
        "relative_error",
        "val_rmse",
        "loss",
        "rmse",
        "val_divergence",
        "divergence",
        "reconstruction",
    )


def _check_optimized_metric(cfg: DictConfig, model: NMFModule, held_out: bool) -> None:
    """A sweep's optimized_metric must be a number the run will write: say so before training."""
    key = cfg.get("optimized_metric")
    if key in VAL_METRICS and not held_out:
        raise NMFInputError(
            f"optimized_metric={key} is measured on held-out entries, but data.holdout is 0; "
            "set data.holdout=0.1 (or optimized_metric=relative_error)."
        )
    names = model.final_metric_names(held_out)
    if key is not None and key not in names:
        raise NMFInputError(f"optimized_metric={key} is not a final metric of this run; choose one of {sorted(names)}.")


def _check_early_stopping(callbacks: list[Any], held_out: bool) -> None:
    """Early stopping on held-out metrics needs data.holdout > 0: say so before training."""
    if held_out:
        return
    for callback in callbacks:
        if isinstance(callback, EarlyStopping) and callback.monitor.startswith("val/"):
            raise NMFInputError(
                f"early stopping monitors {callback.monitor}, which needs held-out entries; "
                "set data.holdout=0.1 (or monitor a train/ metric)."
            )


def _device(trainer: L.Trainer) -> str:
    device = trainer.strategy.root_device
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def _command_line() -> tuple[dict[str, Any], list[str], frozenset[str]]:
    """The config groups picked, the command line's overrides and the keys a sweep varies (none outside Hydra)."""
    if not HydraConfig.initialized():
        return {}, [], frozenset()
    hc = HydraConfig.get()
    swept = swept_keys(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else frozenset()
    return dict(hc.runtime.choices), list(hc.overrides.task), swept


def _choice(group: str, fallback: Any) -> str:
    """The config name picked for ``group`` (e.g. data=digits), or a fallback outside Hydra."""
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    return str(choices.get(group) or fallback)


def main() -> None:
    """Console entry point (``nmf-train``): Hydra's own errors (a key or a choice that is not there) in one line.

    Hydra reports a bad override in several lines and exits with code 1; here it is one
    line naming the nearest key or the choices, exit code 2, as for any bad input. With
    ``HYDRA_FULL_ERROR=1`` set by the user, Hydra's error is raised whole.
    """
    full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors instead of printing them: said below
    try:
        _hydra_main()
    except (ConfigCompositionException, MissingConfigException, OverrideParseException) as err:
        if full:
            raise
        print(f"error: {explain_override_error(err)}", file=sys.stderr)
        sys.exit(2)


def explain_override_error(err: Exception) -> str:
    """One line for Hydra's error about the command line: the choices of a group, or the nearest key."""
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options is not None:
        group, _, name = str(err.missing_cfg_file).rpartition("/")
        choices = ", ".join(sorted(str(o) for o in err.options))
        return f"{group}={name} is not one of the {group} configs: {choices}."
    text = str(err).strip()
    override = str(getattr(err, "override", "") or "")
    key, _, value = override.partition("=")
    if isinstance(err, OverrideParseException) and value.startswith("~"):  # the shell expands ~ only at a word's start
        rest = value[1:].lstrip("/")
        return (
            f"{override}: a value cannot start with ~ on Hydra's command line (the shell left it unexpanded); "
            f"write {key}=$HOME/{rest}, or quote it: '{key}=\"{value}\"'."
        )
    cause = err.__cause__
    key = getattr(cause, "full_key", None)
    if key and "not in struct" in str(cause):
        return f"{key} is not a key of the config; {_nearest(key)}"
    return text.splitlines()[0] if text else type(err).__name__


def _nearest(key: str) -> str:
    """The keys beside a missing one, nearest first (the primary config's, with its default groups)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    parent, _, leaf = key.rpartition(".")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train")
    GlobalHydra.instance().clear()
    node = OmegaConf.select(cfg, parent) if parent else cfg
    keys = [str(k) for k in node] if isinstance(node, DictConfig) else []
    close = difflib.get_close_matches(leaf, keys, n=1)
    nearest = f"did you mean {parent + '.' if parent else ''}{close[0]}? " if close else ""
    return f"{nearest}{parent or 'the config'} has {', '.join(sorted(keys))}; a new key takes a +, e.g. +{key}=..."


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    """The Hydra task; returns ``optimized_metric`` for Hydra sweepers.

    In a sweep a failing job writes why into its metrics.json and returns NaN, so the
    other jobs still run.
    """
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
    single = HydraConfig.get().mode == RunMode.RUN
    try:
        return _main(cfg, single)
    except InterruptedRunError as err:  # a scheduler reads 128 + the signal, and may requeue
        log.warning("%s", err)
        sys.exit(128 + err.signum)


def _main(cfg: DictConfig, single: bool) -> float | None:
    """Train; a user error ends a single run with its message and a sweep's job with its record."""
    try:
        if not cfg.get("spread_gpus"):
            with run_console():
                return optimized_value(cfg, train(cfg))
        with claimed_gpu(Path(HydraConfig.get().sweep.dir) / ".gpu_locks", torch.cuda.device_count()) as gpu:
            with open_dict(cfg):
                cfg.gpu = gpu
            log.info("training on GPU %d", gpu)
            with run_console():
                return optimized_value(cfg, train(cfg))
    except InterruptedRunError:
        raise  # not a failure: the run saved everything and stops the sweep too
    except StoppedAtOnceError as err:  # a second Ctrl+C: no consistent state to save
        _fail(130, str(err))
    except KeyboardInterrupt:  # Ctrl+C before training started (the data's scan): nothing was written
        _discard_refused()
        _fail(130, "interrupted before training started (Ctrl+C): nothing was written")
    except RunDirError as err:  # the folder is another run's: report, and write nothing into it
        if single:
            _fail(2, str(err))
        log.error("%s", err)
        return _sweep_failed(err)
    except (DivergenceError, DegenerateError) as err:  # the run failed: exit code 1
        if single:
            _fail(1, str(err))
        log.error("%s: %s", type(err).__name__, err)
        return _record_failure(cfg, err)
    except CONFIG_ERRORS as err:  # the configuration or input: 2, in one line
        if single:
            _discard_refused()
            _fail(2, str(err))
        log.error("%s: %s", type(err).__name__, err)
        return _record_failure(cfg, err)
    except Exception as err:  # a bug: its traceback, and exit code 1
        log.exception("the run failed")
        if single:
            raise
        return _record_failure(cfg, err)


def _discard_refused() -> None:
    """A run refused before it trained leaves no folder of its own behind (its error is on the console).

    Only a single run's guard makes folders (:func:`~nmf_lightning.rundir.discard_refused`
    removes no other), so a sweep's job folders stay.
    """
    out = OmegaConf.select(HydraConfig.get(), "runtime.output_dir") if HydraConfig.initialized() else None
    if out:
        discard_refused(Path(out))


def _fail(code: int, message: str) -> None:
    """End a single run with one line on stderr (and in train.log): 2 = bad input, 1 = the run failed, 130 = Ctrl+C."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "error: %s", (message,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def optimized_value(cfg: DictConfig, metrics: dict[str, Any]) -> float | None:
    """The final value of ``optimized_metric`` (a key of metrics.json), for sweepers."""
    key = cfg.get("optimized_metric")
    if key is None:
        return None
    if key not in metrics:
        raise NMFInputError(f"optimized_metric={key!r} is not a final metric; choose one of {sorted(metrics)}.")
    return float(metrics[key])


def _record_failure(cfg: DictConfig, err: BaseException) -> float:
    """In a sweep, end this job with a metrics.json that says why, and let the others run.

    Hydra's basic sweeper gets NaN as the job's value (it would stop the sweep on an
    exception); a search sweeper such as Optuna gets the exception back, which it
    records as a failed trial before asking for the next one.
    """
    if not is_main_process():  # rank 0 records the job (every rank of a SLURM job runs as a sweep's job)
        return _sweep_failed(err)
    record = {"status": "failed", "error_type": type(err).__name__, "error": str(err)}
    if isinstance(err, DivergenceError):
        record["steps"] = err.step
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "metrics.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    if done.get("status") in (*SUCCEEDED, "degenerate"):
        record = {**done, **record, "status": done["status"] if isinstance(err, DegenerateError) else "failed"}
    write_text(path, json.dumps(record, indent=2) + "\n")
    return _sweep_failed(err)


def _sweep_failed(err: BaseException) -> float:
    """A failed job's value: NaN for the basic sweeper; a search sweeper gets the error (a failed trial)."""
    sweeper = str(HydraConfig.get().sweeper.get("_target_", "")) if HydraConfig.initialized() else ""
    if sweeper and not sweeper.endswith("BasicSweeper"):
        raise err
    return math.nan


if __name__ == "__main__":
    main()
