"""Benchmark: evolutionary search evaluations per second.

    python bench/search_speed.py [--images 144] [--repeats 3]

Two numbers, each the median of --repeats full searches with the paper's settings
(population 50, 20 generations) at budget 0.5 of dense MACs:
- machinery: the search alone (sampling, mutation, crossover, legality, cache) on
  DeiT-B's full search space with a free fitness function;
- vit_digits: the search as the `search` stage runs it, fitness = top-1 and
  distillation loss of the supernet (random weights) on --images val-sized images.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import timm
import torch

import flora_steps.runtime.models  # noqa: F401  (registers vit_digits)
from flora_steps.core import DEFAULT_TARGETS, factorise, find_linear_layers, trace_costs
from flora_steps.core.search import CostTable, EvolutionSettings, evolve, genome_choices
from flora_steps.core.space import full_space
from flora_steps.runtime.models import input_shape
from flora_steps.stages.search import SubnetScorer

RATIOS = [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 1.0]
BUDGET, BAND = 0.5, 0.02


def supernet_and_space(name: str):
    with torch.device("meta" if name != "vit_digits" else "cpu"):
        model = timm.create_model(name)
    layers = find_linear_layers(model, DEFAULT_TARGETS)
    if name == "vit_digits":
        factorise(model, layers)
    costs = trace_costs(model, input_shape(model))
    space = full_space({n: (costs.layers[n].in_features, costs.layers[n].out_features) for n in layers}, RATIOS)
    return model, space, CostTable.of_macs(space, costs), costs.dense_macs


def evaluations_per_second(table: CostTable, dense_macs: int, fitness, repeats: int) -> tuple[float, int]:
    rates, evaluations = [], 0
    for repeat in range(repeats):
        started = time.perf_counter()
        result = evolve(
            table,
            fitness,
            (BUDGET - BAND) * dense_macs,
            BUDGET * dense_macs,
            EvolutionSettings(),
            np.random.default_rng(repeat),
        )
        rates.append(result.evaluations / (time.perf_counter() - started))
        evaluations = result.evaluations
    return statistics.median(rates), evaluations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=144, help="val images per fitness evaluation (vit_digits)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)

    _, _, table, dense_macs = supernet_and_space("deit_base_patch16_224")
    rate, evaluations = evaluations_per_second(table, dense_macs, lambda genome: float(sum(genome)), args.repeats)
    print(f"machinery (deit_base space)   {rate:10.0f} evaluations/s  ({evaluations} per search)")

    model, space, table, dense_macs = supernet_and_space("vit_digits")
    images = torch.randn(args.images, *input_shape(model))
    labels = torch.randint(0, 10, (args.images,))
    with torch.no_grad():
        teacher_logits = [model.eval()(images)]
    scorer = SubnetScorer(model, [(images, labels)], teacher_logits, temperature=1.0, amp=False)
    rate, evaluations = evaluations_per_second(
        table, dense_macs, lambda genome: scorer(space.ranks(genome_choices(space, genome))), args.repeats
    )
    print(
        f"vit_digits supernet fitness   {rate:10.1f} evaluations/s  ({evaluations} per search, {args.images} images, "
        f"{torch.get_num_threads()} threads)"
    )


if __name__ == "__main__":
    main()
