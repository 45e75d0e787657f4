"""Benchmark: supernet training throughput against dense fine-tuning of the same model.

    python bench/supernet_throughput.py [--models vit_digits deit_small_patch16_224] [--steps 10] [--repeats 3]
                                        [--device cuda] [--amp]

For each model (random weights), times training steps side by side in one run:
- dense: fine-tuning the dense model with cross entropy;
- supernet: the factorised model at a freshly sampled subnet per step (low-rank-aware
  sampling over the full rank grid), distilled from the dense model (teacher forward
  included, as in the supernet stage).
Prints images per second (median of --repeats runs) and the supernet/dense ratio. On
CUDA, ``--amp`` trains both under bfloat16 autocast, as the stages do with ``compute.amp``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import timm
import torch
import torch.nn.functional as F

import flora_steps.runtime.models  # noqa: F401  (registers vit_digits)
from flora_steps.core import DEFAULT_TARGETS, factorise, find_linear_layers, set_ranks
from flora_steps.core.space import SubnetSampler, full_space
from flora_steps.runtime.training import autocast, build_optimizer, distillation_loss

RATIOS = [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 1.0]


def images_per_second(step, batch: int, steps: int, repeats: int, device: torch.device) -> float:
    step()  # warm-up
    rates = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(batch * steps / (time.perf_counter() - started))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_digits", "deit_small_patch16_224"])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 16], help="batch size per model")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA only)")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"on {where}, amp {args.amp and device.type == 'cuda'}")
    for name, batch in zip(args.models, args.batch, strict=True):
        dense = timm.create_model(name).to(device)
        x = torch.randn(batch, *dense.pretrained_cfg["input_size"], device=device)
        y = torch.randint(0, dense.num_classes, (batch,), device=device)
        supernet = copy.deepcopy(dense)
        layers = find_linear_layers(supernet, DEFAULT_TARGETS)
        factorise(supernet, layers)
        space = full_space(
            {n: (supernet.get_submodule(n).in_features, supernet.get_submodule(n).out_features) for n in layers}, RATIOS
        )
        sampler, rng = SubnetSampler(space), np.random.default_rng(0)
        teacher = copy.deepcopy(dense).eval().requires_grad_(False)
        dense_optimizer = build_optimizer(dense, 1e-4, 0.05)
        supernet_optimizer = build_optimizer(supernet, 1e-4, 0.05)

        def dense_step() -> None:
            with autocast(device, args.amp):
                loss = F.cross_entropy(dense(x).float(), y)
            dense_optimizer.zero_grad()
            loss.backward()
            dense_optimizer.step()

        def supernet_step() -> None:
            set_ranks(supernet, space.ranks(sampler.sample(rng)))
            with autocast(device, args.amp):
                with torch.no_grad():
                    targets = teacher(x).float()
                loss = distillation_loss(supernet(x).float(), targets, y, 1.0, 0.0)
            supernet_optimizer.zero_grad()
            loss.backward()
            supernet_optimizer.step()

        dense_rate = images_per_second(dense_step, batch, args.steps, args.repeats, device)
        supernet_rate = images_per_second(supernet_step, batch, args.steps, args.repeats, device)
        print(
            f"{name:28s} batch {batch:3d}  dense {dense_rate:9.1f} img/s  supernet {supernet_rate:9.1f} img/s"
            f"  ratio {supernet_rate / dense_rate:.2f}  (median of {args.repeats} x {args.steps} steps, "
            f"{torch.get_num_threads()} threads)"
        )


if __name__ == "__main__":
    main()
