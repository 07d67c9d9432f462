"""Rows sharded over processes: each rank holds a slice of X's rows and of W, H on all of them.

The distributed NMF pattern (MPI-FAUN/PLANC, pyDNMFk): per update each rank sums its
rows' statistics for H (``W^T W`` and ``W^T X``, or its part of H's gradient) and one
all-reduce adds them up, so every rank takes the same H-update and H stays identical
without being broadcast. What crosses the wire per update is k^2 + k m numbers (per
restart), whatever the number of rows.

:class:`RowShard` is this process's part and its collectives; :class:`ShardedDDP` is
Lightning's DDP strategy with W and X kept out of DDP's parameter sync, and child ranks
started inside the Hydra job they belong to (a multirun job's folder too).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor

from nmf_lightning.internals import SubprocessScriptLauncher
from nmf_lightning.validation import NMFInputError

log = logging.getLogger(__name__)

#: environment variables the launcher sets for its children (restored when a run ends, for the next job)
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
#: on gloo (CPUs), sums over at most this many ranks gather the parts and add them up: on a busy CPU an
#: all-gather waits for the other ranks once, gloo's ring all-reduce several times (2 ranks: 0.6 ms
#: against 2 ms per update here, for 5 KB as for 80 KB)
GATHER_RANKS = 8
#: Hydra overrides of the sweep or the run folder, which a child rank of a job replaces
_SWEEP_ONLY = ("hydra.run", "hydra.sweep", "hydra.mode", "hydra.job.name", "hydra.output_subdir", "hydra/launcher",
               "hydra/sweeper", "hydra.launcher", "hydra.sweeper", "hydra.job.num", "hydra.job.id")  # fmt: skip
#: environment variables that name a process's rank, whichever launcher started it
_RANK_ENV = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


def split_rows(n: int, world: int, block: int = 1) -> list[tuple[int, int]]:
    """Contiguous row ranges, one per rank, as even as whole blocks of ``block`` rows allow.

    Streamed X (``data.batch_rows``) is split on its row blocks, so each rank reads whole blocks.
    """
    blocks = -(-n // block)
    return [(min(n, blocks * r // world * block), min(n, blocks * (r + 1) // world * block)) for r in range(world)]


def check_shardable(n: int, world: int, batch_rows: int | None = None) -> None:
    """Every rank needs rows of its own: refuse more ranks than X has rows (row blocks when streamed)."""
    blocks = -(-n // (batch_rows or 1))
    if blocks < world:
        unit = f"row blocks of data.batch_rows={batch_rows}" if batch_rows else "rows"
        raise NMFInputError(
            f"DDP runs {world} ranks, each on its own rows of X, but X has {blocks} {unit}; "
            "use fewer trainer.devices (or a smaller data.batch_rows)."
        )


def is_main_process() -> bool:
    """Whether this process is rank 0 (or the only one): the one that writes a run's results."""
    return all(int(os.environ.get(name, 0) or 0) == 0 for name in _RANK_ENV)


def global_rank() -> int:
    """This process's rank among all of a run's processes, as its launcher (torchrun, SLURM) set it; 0 alone."""
    return next((int(os.environ[name]) for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK") if os.environ.get(name)), 0)


@dataclass
class RowShard:
    """Rows ``start .. stop`` of an ``n``-row X on rank ``rank`` of ``world``, and the sums over ranks.

    Every all-reduce (on gloo over a few ranks: an all-gather and a sum in rank order, the
    same result) counts the numbers it reduces (``sent_bytes``, ``calls``) and the wall time it
    took (``seconds``, waiting for the slowest rank included; on a GPU, NCCL's launch only).
    """

    n: int
    rank: int
    world: int
    start: int
    stop: int
    block: int = 1
    sent_bytes: int = field(default=0, repr=False)
    calls: int = field(default=0, repr=False)
    seconds: float = field(default=0.0, repr=False)

    @classmethod
    def of_this_process(cls, n: int, block: int = 1) -> RowShard:
        """This rank's shard of the default process group."""
        rank, world = dist.get_rank(), dist.get_world_size()
        start, stop = split_rows(n, world, block)[rank]
        return cls(n, rank, world, start, stop, block)

    @classmethod
    def of_rows(cls, n: int, batch_rows: int | None = None) -> RowShard:
        """This rank's shard of an ``n``-row X (whole blocks of ``batch_rows`` when streamed); none may be empty."""
        check_shardable(n, dist.get_world_size(), batch_rows)
        return cls.of_this_process(n, batch_rows or 1)

    @property
    def rows(self) -> slice:
        """This rank's rows of X (and of W)."""
        return slice(self.start, self.stop)

    def sum(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """The sums over ranks of named tensors: one all-reduce per dtype among them (one in practice)."""
        out: dict[str, Tensor] = {}
        by_dtype: dict[torch.dtype, list[str]] = {}
        for name, value in tensors.items():
            by_dtype.setdefault(value.dtype, []).append(name)
        for names in by_dtype.values():
            flat = torch.cat([tensors[name].reshape(-1) for name in names])
            self._all_reduce(flat)
            offset = 0
            for name in names:
                size = tensors[name].numel()
                out[name] = flat[offset : offset + size].view(tensors[name].shape)
                offset += size
        return out

    def sum_rows(self, value: Tensor) -> Tensor:
        """A sum over W's rows (a penalty of W) completed over all ranks; its gradient stays this rank's."""
        total = value.detach().clone()
        self._all_reduce(total)
        return total + (value - value.detach())  # the value is the all-reduced one, bit for bit on every rank

    def max(self, value: Tensor) -> Tensor:
        """The largest value over ranks."""
        value = value.detach().clone()
        self._all_reduce(value, dist.ReduceOp.MAX)
        return value

    def any(self, flag: bool, device: torch.device | str = "cpu") -> bool:
        """Whether any rank says so (a stop signal, a checkpoint due by the clock)."""
        return bool(self.max(torch.tensor(float(flag), device=device)))

    def gather_rows(self, A: Tensor) -> Tensor:
        """All rows of a row-sharded factor (..., rows, k), in row order, on every rank."""
        sizes = [stop - start for start, stop in split_rows(self.n, self.world, self.block)]
        most = max(sizes)
        device = self._device(A)
        padded = A.new_zeros(*A.shape[:-2], most, A.shape[-1], device=device)
        padded[..., : A.shape[-2], :] = A
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[..., :s, :] for p, s in zip(parts, sizes, strict=True)], dim=-2).to(A.device)

    def mark(self) -> tuple[int, float]:
        """What has been all-reduced so far (bytes, seconds): the start of a span :meth:`costs_since` measures."""
        return self.sent_bytes, self.seconds

    def costs_since(self, mark: tuple[int, float], updates: int, wall: float) -> dict[str, float]:
        """What scale-out cost over ``updates`` updates in ``wall`` seconds since ``mark``, for metrics.json."""
        sent, seconds = self.sent_bytes - mark[0], self.seconds - mark[1]
        return {
            "ddp_ranks": self.world,
            "comm_bytes_per_update": sent / max(updates, 1),
            "comm_time_share": seconds / max(wall, 1e-9),
        }

    @property
    def blocks_per_rank(self) -> int:
        """The most row blocks any rank holds: every rank's pass takes this many batches (Lightning syncs each one)."""
        return max(-(-(stop - start) // self.block) for start, stop in split_rows(self.n, self.world, self.block))

    @staticmethod
    def _device(tensor: Tensor) -> torch.device:
        """Where a collective takes ``tensor``: NCCL needs it on this rank's GPU."""
        if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return tensor.device

    def _all_reduce(self, tensor: Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> None:
        start = time.perf_counter()
        device = self._device(tensor)
        if device != tensor.device:  # sums taken on the CPU before the module moved to the GPU
            moved = tensor.to(device)
            dist.all_reduce(moved, op=op)
            tensor.copy_(moved)
        elif op == dist.ReduceOp.SUM and dist.get_backend() == "gloo" and self.world <= GATHER_RANKS:
            parts = [torch.empty_like(tensor) for _ in range(self.world)]
            dist.all_gather(parts, tensor)
            total = parts[0]
            for part in parts[1:]:  # in rank order: the same sum, bit for bit, on every rank
                total += part
            tensor.copy_(total)
        else:
            dist.all_reduce(tensor, op=op)
        self.seconds += time.perf_counter() - start
        self.sent_bytes += tensor.numel() * tensor.element_size()
        self.calls += 1


#: besides W, what a checkpoint holds one row of per row of X: a biased model's row biases (n, 1)
ROW_STATE = ("b",)


def keep_rows(checkpoint: dict, shard: RowShard) -> None:
    """Keep this rank's rows of the whole W (and its optimizer state) in a checkpoint: it resumes on any ranks."""
    map_w_state(checkpoint, lambda A: A[..., shard.rows, :].clone(), checkpoint["state_dict"]["W"].shape)


def gather_rows(checkpoint: dict, shard: RowShard, shape: torch.Size) -> None:
    """Make a checkpoint hold all of W (of ``shape`` on this rank) and of its optimizer state, in row order."""
    map_w_state(checkpoint, shard.gather_rows, shape)


def map_w_state(checkpoint: dict, fn: Callable[[Tensor], Tensor], shape: torch.Size) -> None:
    """Apply ``fn`` to W in a checkpoint, to W's optimizer state (W is the optimizer's first parameter) and to b."""
    state = checkpoint["state_dict"]
    state["W"] = fn(state["W"])
    for name in ROW_STATE:  # row by row with W, with no optimizer state of its own
        if name in state:
            state[name] = fn(state[name])
    for i, optimizer in enumerate(checkpoint.get("optimizer_states", [])):
        if 0 not in optimizer.get("state", {}):
            continue
        # new dicts: a saved optimizer state holds the live optimizer's own per-parameter dicts
        w_state = {
            k: fn(v) if isinstance(v, Tensor) and v.shape == shape else v for k, v in optimizer["state"][0].items()
        }
        checkpoint["optimizer_states"][i] = {**optimizer, "state": {**optimizer["state"], 0: w_state}}


class _JobLauncher(SubprocessScriptLauncher):
    """Lightning's launcher of child ranks, started inside this Hydra job rather than a new one.

    Lightning re-runs the command line with ``hydra.run.dir`` set: under a multirun (``-m``)
    that would start the whole sweep again in each child, in the wrong folder. The children
    here run this job's own overrides, in its output folder, with no second ``.hydra``.
    The environment the launch sets is put back when the run ends, so a sweep's next job
    launches its own children.
    """

    def _call_children_scripts(self) -> None:
        self._saved_env = {name: os.environ.get(name) for name in _LAUNCH_ENV}
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            super()._call_children_scripts()
            return
        from hydra.utils import get_original_cwd

        self._check_can_spawn_children()
        self.procs = []
        os.environ["MASTER_ADDR"] = self.cluster_environment.main_address
        os.environ["MASTER_PORT"] = str(self.cluster_environment.main_port)
        os.environ["NODE_RANK"] = str(self.cluster_environment.node_rank())
        os.environ["LOCAL_RANK"] = str(self.cluster_environment.local_rank())
        os.environ["WORLD_SIZE"] = f"{self.num_processes * self.num_nodes}"
        for local_rank in range(1, self.num_processes):
            env = {**os.environ, "LOCAL_RANK": str(local_rank)}
            self.procs.append(subprocess.Popen(job_command(local_rank), env=env, cwd=get_original_cwd()))

    def restore_environment(self) -> None:
        """Undo the launch's environment (a sweep's next job must launch anew), and wait for the children."""
        for proc in self.procs:
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                log.warning("rank process %d did not exit; stopping it", proc.pid)
                proc.kill()
        self.procs.clear()
        for name, value in getattr(self, "_saved_env", {}).items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def job_command(local_rank: int) -> Sequence[str]:
    """The command that runs this Hydra job (its overrides, its folder) as child rank ``local_rank``."""
    from hydra.core.hydra_config import HydraConfig

    import __main__

    hc = HydraConfig.get()
    if __main__.__spec__ is None:
        command = [sys.executable, os.path.abspath(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    for source in hc.runtime.config_sources:  # the config tree the job was composed from (-cp, -cd)
        if source.provider == "main":
            command += ["--config-path", f"{source.schema}://{source.path}" if source.schema == "pkg" else source.path]
        elif source.provider == "command-line":
            command += ["--config-dir", source.path]
    command += ["--config-name", hc.job.config_name]
    out = hc.runtime.output_dir.replace("\\", "\\\\").replace('"', '\\"')
    return [
        *command,
        *hc.overrides.task,
        *(o for o in hc.overrides.hydra if not o.split("=")[0].lstrip("+~").startswith(_SWEEP_ONLY)),
        f'hydra.run.dir="{out}"',
        "hydra.output_subdir=null",
        f"hydra.job.name={hc.job.name}_rank{local_rank}",
    ]


class ShardedDDP(DDPStrategy):
    """Lightning's DDP strategy for row-sharded NMF (``trainer=ddp``).

    NCCL on GPUs, gloo on CPUs. W and X differ in shape between ranks, so the module names
    them in ``_ddp_params_and_buffers_to_ignore`` and DDP neither verifies nor syncs them;
    H, identical on every rank, is the one parameter DDP holds. Its gradient is never
    averaged by DDP (manual optimization): the engine sums the data term's part over ranks.
    """

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if isinstance(self._launcher, SubprocessScriptLauncher):
            launcher = _JobLauncher(self.cluster_environment, self.num_processes, self.num_nodes)
            self._launcher = launcher

    def teardown(self) -> None:
        """End the process group too, so a sweep's next job (in this process) starts its own."""
        super().teardown()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        if isinstance(self._launcher, _JobLauncher):
            self._launcher.restore_environment()
