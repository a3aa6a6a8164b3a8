"""Where a training process runs: its device, its rank in a ``torchrun`` job, and what ranks share.

``ecglab train`` runs alone or as one of ``WORLD_SIZE`` processes started by ``torchrun`` (NCCL on
GPUs, gloo on CPUs). Everything that talks to the process group lives here, so the training loop
reads the same with one process or many: on a single process the collectives below are plain
pass-throughs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fhir_mappings.errors import InputError


@dataclass(frozen=True)
class DistContext:
    """This process's place in a (possibly single-process) training job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes every file."""
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``cpu``, ``cuda`` (error without a GPU) or ``auto`` (GPU when available)."""
    if name == "cpu":
        return torch.device("cpu")
    if name in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "cuda":
        raise InputError("--device cuda: no CUDA GPU is available on this machine (use --device cpu or auto)")
    if name == "auto":
        return torch.device("cpu")
    raise InputError(f"--device: unknown device {name!r}; expected cpu, cuda or auto")


def init_distributed(device_name: str) -> DistContext:
    """Join the process group when started by torchrun (WORLD_SIZE > 1), else run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank, world_size, local_rank, local_world, device)


def shutdown_distributed(ctx: DistContext) -> None:
    """Leave the process group joined by :func:`init_distributed` (nothing to do when alone)."""
    if ctx.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def configure_threads(num_threads: int, ctx: DistContext) -> int:
    """Set torch's intra-op threads: the config value, or the cores shared among local processes."""
    threads = num_threads or max(1, (os.cpu_count() or 1) // max(1, ctx.local_world_size))
    torch.set_num_threads(threads)
    return threads


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj`` (index = rank), on every rank; ``[obj]`` when running alone."""
    if ctx.world_size == 1:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_predictions(
    rows: np.ndarray, probs: np.ndarray, ctx: DistContext
) -> tuple[np.ndarray, np.ndarray]:
    """All ranks' predictions on every rank, de-duplicated (DistributedSampler pads) and sorted by row."""
    if ctx.world_size > 1:
        gathered = gather_objects((rows, probs), ctx)
        rows = np.concatenate([g[0] for g in gathered])
        probs = np.concatenate([g[1] for g in gathered if len(g[1])])
    unique_rows, first = np.unique(rows, return_index=True)
    return unique_rows, probs[first]


def mean_over_ranks(total: float, count: int, ctx: DistContext) -> float:
    """``Σ total / Σ count`` over all ranks (e.g. the mean batch loss of an epoch); 0 counts as 1."""
    if ctx.world_size > 1:
        totals = torch.tensor([total, float(count)], dtype=torch.float64, device=ctx.device)
        dist.all_reduce(totals)
        return float(totals[0] / totals[1].clamp(min=1))
    return total / max(1, count)


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (nothing to do when alone)."""
    if ctx.world_size > 1:
        dist.barrier()
