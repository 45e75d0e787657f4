"""Benchmark: inference latency of compressed models against the dense one and the theoretical MACs ratio.

    python bench/inference_latency.py [--models vit_digits deit_base_patch16_224] [--budget 0.45]
                                      [--batch 16] [--repeats 5] [--device cpu]

For each model (random weights; latency does not depend on the values), builds
side by side, as the retrain stage materialises them (factorised layers as two
``nn.Linear``):
- searched-style: a non-uniform rank config, one rank tuple per block drawn by the
  search's own sampler from the full rank grid, with MACs in [budget - 0.02, budget];
- uniform: one rank ratio for all target layers, the largest that fits the budget,
  with any integer rank and with ranks rounded to multiples of 8 (aligned matmuls).
Times interleaved forward passes (median of --repeats) and prints the speedup over
dense against the theoretical MACs ratio (dense MACs / compressed MACs), and the
share of the theoretical speedup achieved.
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import timm
import torch
from torch import nn

from flora_steps.core import DEFAULT_TARGETS, factorise, find_linear_layers, materialise, trace_costs
from flora_steps.core.latency import precision_of, time_rounds
from flora_steps.core.search import CostTable, genome_choices, random_legal
from flora_steps.core.space import full_space
from flora_steps.core.uniform import fit_uniform_ratio
from flora_steps.runtime.allocator import use_allocator
from flora_steps.runtime.models import input_shape  # also registers vit_digits

RATIOS = [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 1.0]
BAND = 0.02


def compressed_models(dense: nn.Module, budget: float, seed: int) -> dict[str, tuple[nn.Module, int]]:
    """Dense, searched-style and uniform models at ``budget`` of dense MACs, with their MACs."""
    shape = input_shape(dense)
    factorised = copy.deepcopy(dense)
    layers = find_linear_layers(factorised, DEFAULT_TARGETS)
    factorise(factorised, layers)
    costs = trace_costs(factorised, shape)
    space = full_space({n: (costs.layers[n].in_features, costs.layers[n].out_features) for n in layers}, RATIOS)
    table = CostTable.of_macs(space, costs)
    rng = np.random.default_rng(seed)
    genome = None
    while genome is None:
        genome = random_legal(rng, table, (budget - BAND) * costs.dense_macs, budget * costs.dense_macs)
    searched = space.ranks(genome_choices(space, genome))
    _, uniform = fit_uniform_ratio(costs, layers, budget * costs.dense_macs)
    _, aligned = fit_uniform_ratio(costs, layers, budget * costs.dense_macs, multiple=8)
    return {
        "dense": (dense, costs.dense_macs),
        "searched-style": (materialise(factorised, searched), costs.macs(searched)),
        "uniform": (materialise(factorised, uniform), costs.macs(uniform)),
        "uniform x8": (materialise(factorised, aligned), costs.macs(aligned)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_digits", "deit_base_patch16_224"])
    parser.add_argument("--budget", type=float, default=0.45, help="fraction of dense MACs")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--allocator",
        choices=["heap", "system"],
        default="heap",
        help="glibc malloc as compute.allocator sets it in the stages (heap: freed memory kept for reuse)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA only), as compute.amp")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    use_allocator(args.allocator)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dtype = precision_of(device, args.amp)
    print(f"batch {args.batch}, {device}, {dtype}, {torch.get_num_threads()} threads, median of {args.repeats}")
    for name in args.models:
        built = compressed_models(timm.create_model(name), args.budget, args.seed)
        models = {label: model.to(device) for label, (model, _) in built.items()}
        images = torch.randn((args.batch, *input_shape(models["dense"])), device=device)
        runs = {label: (model.eval(), images) for label, model in models.items()}
        timed = time_rounds(runs, args.repeats, warmup=1, dtype=dtype)
        latency = {label: float(np.median(values)) for label, values in timed.items()}
        dense_macs = built["dense"][1]
        for label, (_, macs) in built.items():
            speedup, theoretical = latency["dense"] / latency[label], dense_macs / macs
            print(
                f"{name:24s} {label:15s} {macs / dense_macs:6.3f} of dense MACs  {latency[label]:9.2f} ms"
                f"  speedup {speedup:5.2f}x  theoretical {theoretical:5.2f}x  achieved {speedup / theoretical:6.1%}"
            )


if __name__ == "__main__":
    main()
