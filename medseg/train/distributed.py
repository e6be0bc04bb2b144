"""Data-parallel training with ``torchrun`` (single node or multi-node rendezvous).

``torchrun --nproc_per_node=N -m medseg train ...`` sets ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE`` and the rendezvous address in the environment; :func:`init_distributed` reads
them, joins the process group (NCCL on GPUs, gloo on CPU) and pins each process to
``cuda:LOCAL_RANK``. Without those variables everything degrades to one process and the
helpers below are no-ops. Multi-node: the same command on every node with torchrun's
``--nnodes``, ``--node_rank`` / ``--rdzv_backend=c10d --rdzv_endpoint=HOST:PORT`` flags.

Conventions used by the engine: each rank draws its own patches (seed + rank), the batch size
in the config is per rank (global batch = ``batch_size * world_size``), validation cases are
shared out across ranks and their metrics gathered, and only rank 0 writes files.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from medseg.runtime import resolve_device

__all__ = ["DistInfo", "all_gather_objects", "barrier", "cleanup", "init_distributed", "mean_across", "wrap_ddp"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str = "auto", *, timeout_min: float = 30.0) -> DistInfo:
    """Join the ``torchrun`` process group when the environment says so; pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=resolve_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(minutes=timeout_min)}
        if device.type == "cuda":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world, device=device)


def wrap_ddp(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """``DistributedDataParallel`` around ``model`` when running distributed, else ``model``.

    The wrapper is built with ``static_graph=True``: a config may leave parameters idle in every
    training step (the decoder's heads of levels 1.. with ``model.deep_supervision=false``, MONAI
    ``DynUNet``'s deep-supervision head, a block that only feeds an auxiliary loss), and plain DDP
    then waits for their gradients forever ("Expected to have finished reduction in the prior
    iteration"). A static graph records in the first step which parameters receive a gradient
    (from the autograd hooks, so a loss computed outside ``forward`` counts) and marks the others
    ready in every later step, without ``find_unused_parameters``' graph walk per step. It holds
    because a training step's graph does not change between iterations.

    Args:
        model: the bare network, already on ``info.device``.
        info: this process's place in the process group.

    Returns:
        The DDP wrapper, or ``model`` itself in a single-process run.
    """
    if not info.enabled:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, static_graph=True)


def mean_across(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a (detached) tensor over all ranks; the tensor itself when not distributed."""
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` when not distributed."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    """Wait until every rank gets here (a no-op when not distributed)."""
    if info.enabled and dist.is_initialized():
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Leave the process group (safe to call twice).

    The caller drops its ``DistributedDataParallel`` wrapper first: its reducer holds the process
    group, and ``destroy_process_group`` only forgets c10d's own references. A group that outlives
    it is freed whenever the garbage collector gets to the wrapper, possibly at interpreter exit,
    where gloo's worker threads are torn down with the interpreter (the likely cause of a rare
    SIGABRT, "terminate called without an active exception", of a 2-rank CPU test run at its very
    end). So: collect first, then destroy.
    """
    if info.enabled and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
