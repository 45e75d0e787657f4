"""Benchmark: how well a latency table predicts the measured latency of compressed models.

    python bench/latency_prediction.py [--models vit_digits deit_small_patch16_224 deit_base_patch16_224]
                                       [--budgets 0.3 0.45 0.6] [--subnets 2] [--batch 16] [--repeats 7]
                                       [--multiple 16]

For each model (random weights; latency does not depend on the values): measures its
latency table as the latency_table stage does (each target layer dense and at each
rank of params.yaml's filter.ratios grid, the fixed part; ``core.latency.measure_table``),
then builds compressed models as retrain materialises them: per budget (fraction of the
dense MACs) ``--subnets`` searched-style subnets (the search's own sampler over the rank
grid, MACs in [budget - 0.02, budget]) and the uniform-rank model with any integer rank
(ranks off the grid: interpolated, with ``--multiple`` plus the misalignment of their
remainder, which the table times on one window of ranks per layer shape; each such model
is also predicted by the grid alone, plain interpolation, for comparison). Times them
with the dense model in interleaved rounds (median of ``--repeats``) and prints each
one's predicted and measured milliseconds per batch and the relative error, the same for
its share of the dense model's latency (what a budget in fractions of it relies on: a
drift of the machine's speed between the table's timing and the model's cancels there),
and the median absolute errors per model.
The latency stage reports the same error for the pipeline's own models.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import numpy as np
import pandas as pd
import timm
import torch
import yaml

from flora_steps.core import DEFAULT_TARGETS, factorise, find_linear_layers, materialise, trace_costs
from flora_steps.core.latency import LatencyTable, measure_table, precision_of, time_rounds
from flora_steps.core.search import CostTable, genome_choices, random_legal
from flora_steps.core.space import full_space, rank_grid
from flora_steps.core.uniform import fit_uniform_ratio
from flora_steps.runtime.allocator import use_allocator
from flora_steps.runtime.models import input_shape  # also registers vit_digits

BAND = 0.02
RATIOS = yaml.safe_load(open("params.yaml"))["filter"]["ratios"]  # noqa: SIM115 - read once


def subnets(dense: torch.nn.Module, budgets: list[float], per_budget: int, seed: int) -> dict[str, dict[str, int]]:
    """Rank configs by name: searched-style subnets and the uniform model at each budget."""
    shape = input_shape(dense)
    layers = find_linear_layers(dense, DEFAULT_TARGETS)
    costs = trace_costs(dense, shape)
    space = full_space({n: (costs.layers[n].in_features, costs.layers[n].out_features) for n in layers}, RATIOS)
    table = CostTable.of_macs(space, costs)
    rng = np.random.default_rng(seed)
    configs = {}
    for budget in budgets:
        for index in range(per_budget):
            genome = None
            while genome is None:
                genome = random_legal(rng, table, (budget - BAND) * costs.dense_macs, budget * costs.dense_macs)
            configs[f"searched {budget} #{index + 1}"] = space.ranks(genome_choices(space, genome))
        configs[f"uniform {budget}"] = fit_uniform_ratio(costs, layers, budget * costs.dense_macs)[1]
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["vit_digits", "deit_small_patch16_224", "deit_base_patch16_224"]
    )
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.3, 0.45, 0.6])
    parser.add_argument("--subnets", type=int, default=2, help="searched-style subnets per budget")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--multiple", type=int, default=16, help="retrain.table_rank_multiple: the misalignment window (0: none)"
    )
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
        dense = timm.create_model(name).eval()
        shape = input_shape(dense)
        layers = find_linear_layers(dense, DEFAULT_TARGETS)
        costs = trace_costs(dense, shape)
        targets = {n: costs.layers[n] for n in layers}
        ranks = {n: rank_grid(c.in_features, c.out_features, RATIOS) for n, c in targets.items()}
        images = torch.randn((args.batch, *shape), device=device)
        frame = measure_table(dense, targets, ranks, images, args.repeats, dtype=dtype, multiple=args.multiple)
        table = LatencyTable.from_frame(frame)
        grid_ranks = {(layer, rank) for layer, grid in ranks.items() for rank in grid}
        on_grid = [
            row.part != "layer" or pd.isna(row.rank) or (row.layer, int(row.rank)) in grid_ranks
            for row in frame.itertuples()
        ]
        grid = LatencyTable.from_frame(frame[on_grid].drop(columns="rank_multiple"))  # without the windows: plainly
        factorised = copy.deepcopy(dense)
        factorise(factorised, layers)
        configs = {"dense": {}, **subnets(dense, args.budgets, args.subnets, args.seed)}
        models = {label: materialise(factorised, config).eval().to(device) for label, config in configs.items()}
        timed = time_rounds({label: (model, images) for label, model in models.items()}, args.repeats, dtype=dtype)
        measured = {label: statistics.median(timed[label]) for label in configs}
        predicted = {label: table.predict_ms(config) for label, config in configs.items()}
        plain = {label: grid.predict_ms(config) for label, config in configs.items()}
        errors, relative_errors, plain_errors, plain_relative = [], [], [], []
        for label, config in configs.items():
            error = predicted[label] / measured[label] - 1
            # the share of the dense model's latency, predicted against measured: what a fraction budget relies on
            relative = (predicted[label] / predicted["dense"]) / (measured[label] / measured["dense"]) - 1
            plain_error = plain[label] / measured[label] - 1
            plain_share = (plain[label] / plain["dense"]) / (measured[label] / measured["dense"]) - 1
            errors.append(abs(error))
            plain_errors.append(abs(plain_error))
            if label != "dense":
                relative_errors.append(abs(relative))
                plain_relative.append(abs(plain_share))
            grid_only = "" if table.timed(config) else f"  (grid alone: {plain_error:+7.1%}, {plain_share:+7.1%})"
            print(
                f"{name:24s} {label:18s} {costs.macs(config) / costs.dense_macs:6.3f} of dense MACs"
                f"  measured {measured[label]:9.2f} ms  predicted {predicted[label]:9.2f} ms  error {error:+7.1%}"
                f"  of dense: measured {measured[label] / measured['dense']:.3f} error {relative:+7.1%}{grid_only}"
            )
        print(
            f"{name:24s} median |error| {statistics.median(errors):.1%} over {len(errors)} models;"
            f" of the dense latency: {statistics.median(relative_errors):.1%} over {len(relative_errors)};"
            f" by the grid alone: {statistics.median(plain_errors):.1%}, {statistics.median(plain_relative):.1%}\n"
        )


if __name__ == "__main__":
    main()
