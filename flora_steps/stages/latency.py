"""Measure the inference latency of the dense model and of every compressed model, side by side.

    python -m flora_steps.stages.latency --params params.yaml

Every model `retrain` made (the first seed's, of every method at each of its budgets:
SVD uniform, the control, FLORA, ViT-Slim, FLORA on ViT-Slim, OFB, FLORA on OFB) and the
dense base model run forward passes of `retrain.latency_batch` random images, interleaved round by
round so that machine noise hits all of them alike; the median over
`retrain.latency_repeats` rounds is reported, on the CPU and also on CUDA when
present. Training stages do not time anything, so changing these settings reruns
only this stage. Writes `results/latency/`:

- `latency.csv`: per model and device, the median milliseconds per batch and the
  speedup over the dense model
- `metrics.json`: the same, by device and model
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Hashable, Mapping

import pandas as pd
import torch
from torch import nn

from ..pipeline.catalogue import METHOD_STAGES, STAGES
from ..runtime.artifacts import load_model, write_csv, write_json
from ..runtime.context import StageContext, run_as_program, stage_main
from ..runtime.models import input_shape
from ..runtime.progress import progress

log = logging.getLogger(__name__)


def _forward_seconds(model: nn.Module, images: torch.Tensor) -> float:
    if images.device.type == "cuda":
        torch.cuda.synchronize(images.device)
    started = time.perf_counter()
    model(images)
    if images.device.type == "cuda":
        torch.cuda.synchronize(images.device)
    return time.perf_counter() - started


@torch.no_grad()
def interleaved_latency(
    models: Mapping[Hashable, nn.Module],
    input_shape: tuple[int, ...],
    batch: int,
    device: torch.device,
    repeats: int,
    warmup: int = 3,
) -> dict[Hashable, float]:
    """Median milliseconds per forward pass of each model, timed in interleaved rounds on ``device``.

    The models must already live on ``device``; they are put in eval mode.
    """
    for model in models.values():
        model.eval()
    images = torch.randn((batch, *input_shape), device=device)
    timings: dict[Hashable, list[float]] = {name: [] for name in models}
    for round_index in progress(range(warmup + repeats), desc=f"latency {device.type}", inner=True):
        for name, model in models.items():
            seconds = _forward_seconds(model, images)
            if round_index >= warmup:
                timings[name].append(seconds)
    return {name: 1000 * statistics.median(values) for name, values in timings.items()}


def run(context: StageContext) -> None:
    params = context.params
    models = {("dense", 1.0): load_model(context.input("dense"))[0]}  # keyed by (method, budget)
    for method, stage in METHOD_STAGES.items():
        budgets = getattr(params.budgets, STAGES[stage].foreach)
        for budget, path in zip(budgets, context.inputs(method), strict=True):
            models[method, budget] = load_model(path)[0]
    shape = input_shape(models["dense", 1.0])
    batch, repeats = params.retrain.latency_batch, params.retrain.latency_repeats
    devices = [torch.device("cpu")] + ([context.device] if context.device.type == "cuda" else [])
    rows = []
    for device in devices:
        for model in models.values():
            model.to(device)
        milliseconds = interleaved_latency(models, shape, batch, device, repeats)
        dense = milliseconds["dense", 1.0]
        rows += [
            {"method": method, "budget": budget, "device": device.type, "batch": batch}
            | {"latency_ms": round(value, 3), "speedup": round(dense / value, 4)}
            for (method, budget), value in milliseconds.items()
        ]
        log.info("%s: dense %.2f ms per batch of %d", device.type, dense, batch)
    table = pd.DataFrame(rows)
    write_csv(context.output("latency"), table)
    write_json(
        context.output("metrics"),
        {
            device: {f"{row.method} {row.budget}": row.latency_ms for row in group.itertuples()}
            for device, group in table.groupby("device", sort=False)
        }
        | {"batch": batch, "repeats": repeats, "seconds": context.seconds()},
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main("latency", __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    run_as_program(main)
