"""Running a stage as several processes under ``torchrun``: the process group and what crosses it.

A distributed stage (``Stage.distributed``) joins the process group before it runs
and leaves it after (``stage.run_stage``). Inside, training uses DDP and every
evaluation is sharded: each process scores its own contiguous share of the images
(``shard``) and the sums are combined (``sum_over_processes``), so all processes get
the same numbers and take the same decisions (the search's next generation, say).
Only the first process writes results.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Subset


def world() -> tuple[int, int]:
    """(rank, world size) of this process under ``torchrun``; (0, 1) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_first() -> bool:
    """True in the process that writes results (the only one outside ``torchrun``)."""
    return world()[0] == 0


def join(device: torch.device) -> torch.device:
    """Join the ``torchrun`` process group (NCCL on GPUs, gloo on CPU); returns this process's device."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def leave() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """True when this process is one of several in a joined process group."""
    return dist.is_initialized() and dist.get_world_size() > 1


def shard(dataset: Dataset) -> Dataset:
    """This process's contiguous share of ``dataset`` (all of it outside ``torchrun``).

    Shares differ in size by at most one image and, concatenated in rank order, are
    the dataset in its order: gathered per-image results need no reordering.
    """
    rank, world_size = world()
    if world_size == 1:
        return dataset
    bounds = [len(dataset) * part // world_size for part in range(world_size + 1)]
    return Subset(dataset, range(bounds[rank], bounds[rank + 1]))


def sum_over_processes(values: Sequence[float], device: torch.device) -> list[float]:
    """Each of ``values`` summed over all processes (``values`` itself outside a process group)."""
    if not active():
        return list(values)
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return totals.tolist()


def gather_lists(items: list[Any]) -> list[Any]:
    """Every process's ``items``, concatenated in rank order (``items`` itself outside a process group)."""
    if not active():
        return items
    gathered: list[list[Any]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def barrier() -> None:
    """Wait for every process (nothing to wait for outside a process group)."""
    if active():
        dist.barrier()


def weights_in_sync(model: nn.Module) -> bool:
    """True when every process of the running process group holds exactly the same parameters."""
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    same = torch.tensor([float(torch.equal(flat, reference))], device=flat.device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item())
