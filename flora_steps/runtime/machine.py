"""The key of a latency table: the device it was timed on, its threads, allocator, batch, precision and library
versions."""

from __future__ import annotations

from typing import Any

import torch

from ..pipeline.machine import cpu_name, library_versions
from .allocator import allocator_in_use

#: The key's columns, first in a latency table's CSV; a table is reused only where every one is the same.
KEY = ("device", "device_name", "threads", "allocator", "batch", "precision", "torch", "timm")


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA, the processor's on the CPU."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def table_key(device: torch.device, batch: int, precision: torch.dtype) -> dict[str, Any]:
    """The key of timings taken in this process on ``device`` at ``batch`` images in ``precision``."""
    return {
        "device": device.type,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "allocator": allocator_in_use(),
        "batch": batch,
        "precision": str(precision).removeprefix("torch."),
        **library_versions(),
    }


def key_difference(measured: dict[str, Any], here: dict[str, Any]) -> str | None:
    """The first key field in which a table's key differs from this process's, as ``field: a, here b``."""
    for field in KEY:
        if str(measured.get(field)) != str(here[field]):
            return f"{field} {measured.get(field)!r}, here {here[field]!r}"
    return None
