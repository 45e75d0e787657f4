"""Benchmark: rank configs priced per second by the MACs counter, against flop_counter.

    python bench/macs_counter.py [--model deit_base_patch16_224] [--configs 20000] [--repeats 5]

Traces the model once (on the meta device), then prices random rank configs of the
default target layers with ``CostModel.macs``. For comparison it times
``torch.utils.flop_counter`` on one materialised (meta) model, which is what each
config would cost without the counter. Prints medians over ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import timm
import torch

import flora_steps.runtime.models  # noqa: F401  (registers vit_digits)
from flora_steps.core import DEFAULT_TARGETS, count_macs, find_linear_layers, trace_costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_base_patch16_224")
    parser.add_argument("--configs", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    with torch.device("meta"):
        model = timm.create_model(args.model)
    shape = model.pretrained_cfg["input_size"]
    started = time.perf_counter()
    costs = trace_costs(model, shape)
    trace_seconds = time.perf_counter() - started
    layers = find_linear_layers(model, DEFAULT_TARGETS)
    rng = random.Random(0)
    configs = [{n: rng.randint(1, costs.layers[n].full_rank) for n in layers} for _ in range(args.configs)]

    counter_rates, flop_counter_seconds = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        for config in configs:
            costs.macs(config)
        counter_rates.append(args.configs / (time.perf_counter() - started))
        started = time.perf_counter()
        count_macs(model, shape)
        flop_counter_seconds.append(time.perf_counter() - started)

    rate = statistics.median(counter_rates)
    reference = 1 / statistics.median(flop_counter_seconds)
    print(f"model {args.model}: {len(layers)} target layers, one trace {trace_seconds:.2f} s")
    print(f"CostModel.macs     {rate:12,.0f} configs/s (median of {args.repeats})")
    print(f"flop_counter pass  {reference:12,.1f} configs/s (meta device, median of {args.repeats})")
    print(f"ratio              {rate / reference:12,.0f}x")


if __name__ == "__main__":
    main()
