"""Inference latency: the median wall time of a model's forward pass."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


@torch.no_grad()
def measure_latency(
    model: nn.Module, input_shape: tuple[int, ...], batch: int, device: torch.device, repeats: int, warmup: int = 3
) -> float:
    """Median milliseconds of one forward pass of ``batch`` random images on ``device`` (eval mode)."""
    was_training = model.training
    model.eval()
    images = torch.randn((batch, *input_shape), device=device)
    timings = []
    for index in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        model(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index >= warmup:
            timings.append(time.perf_counter() - started)
    model.train(was_training)
    return 1000 * statistics.median(timings)
