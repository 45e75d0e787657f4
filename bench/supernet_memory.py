"""Benchmark: supernet training step time and peak memory per micro-batch size (GPU; CPU at small size).

    python bench/supernet_memory.py [--model deit_base_patch16_224] [--micro-batches 32 64 128 256] [--steps 5]

For each micro-batch size, runs supernet training steps of the model (random weights,
factorised with the paper's eighths grid) at its *largest* subnet — every layer at
full rank, the worst case for memory — distilled from the dense model (teacher
forward included) under bfloat16 autocast on CUDA, and prints the median step time,
images per second and, on CUDA, the peak allocated memory. The largest micro-batch
that fits is what a profile's ``supernet.micro_batch`` can use on that card; GPU
hours follow from images per second. Without CUDA it runs on the CPU in float32 and
reports no memory (use small models and sizes there).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import timm
import torch

import flora_steps.runtime.models  # noqa: F401  (registers vit_digits)
from flora_steps.core import DEFAULT_TARGETS, factorise, find_linear_layers, set_ranks
from flora_steps.runtime.training import autocast, build_optimizer, distillation_loss


def measure(model_name: str, micro_batch: int, steps: int, device: torch.device) -> tuple[float, float | None]:
    """(median seconds per step, peak GiB on CUDA or None) of supernet steps at the largest subnet."""
    dense = timm.create_model(model_name).to(device)
    supernet = copy.deepcopy(dense)
    factorise(supernet, find_linear_layers(supernet, DEFAULT_TARGETS))
    set_ranks(supernet, {})  # every factor at full rank: the largest subnet
    teacher = dense.eval().requires_grad_(False)
    optimizer = build_optimizer(supernet, 5e-5, 0.01)
    images = torch.randn(micro_batch, *dense.pretrained_cfg["input_size"], device=device)
    labels = torch.randint(0, dense.num_classes, (micro_batch,), device=device)

    def step() -> None:
        with autocast(device, True):
            with torch.no_grad():
                targets = teacher(images).float()
            loss = distillation_loss(supernet(images).float(), targets, labels, 1.0, 0.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step()  # warm-up
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_base_patch16_224")
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model} on {where}")
    for micro_batch in args.micro_batches:
        torch.manual_seed(0)
        try:
            seconds, peak = measure(args.model, micro_batch, args.steps, device)
        except torch.OutOfMemoryError:
            print(f"  micro-batch {micro_batch:4d}: out of memory")
            torch.cuda.empty_cache()
            continue
        memory = "" if peak is None else f"  peak {peak:6.1f} GiB"
        print(
            f"  micro-batch {micro_batch:4d}: {seconds * 1000:8.1f} ms/step  {micro_batch / seconds:8.1f} img/s{memory}"
        )


if __name__ == "__main__":
    main()
