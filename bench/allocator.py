"""Benchmark: the C library allocator's share in compressed models' CPU latency (``compute.allocator``).

    python bench/allocator.py [--model deit_base_patch16_224] [--budget 0.45] [--subnets 2]
                              [--processes 3] [--batch 16] [--repeats 5]

glibc's ``malloc`` maps blocks above its mmap threshold (at most 32 MiB) from the kernel
afresh, unless freed memory at its heap's top happens to hold them; the pages of a
freshly mapped block are faulted in on first touch. At DeiT-B's batch of 16, every
MLP's hidden layer (38.7 MB) is such a block. Whether a forward pass pays those faults
depends on the heap's state, which differs from process to process.
``flora_steps.runtime.allocator.use_allocator("heap")`` (``compute.allocator: heap``) serves
every block from the heap and keeps freed memory there.

The allocator is a setting of the whole process, so each one runs in processes of its
own, ``--processes`` of each, alternately (system, heap, system, ...). Every process
builds the dense model and ``--subnets`` searched-style subnets at ``--budget`` of the
dense MACs (``bench/speedup_backends.py``'s, same seed: the same subnets in every
process), times them in interleaved rounds (median of ``--repeats``) and counts the minor
page faults per forward pass. Printed per process: the dense model's milliseconds and
faults, each subnet's milliseconds, faults, speedup and share of its MACs ratio; then per
allocator the median over its processes of each subnet's share.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import timm
import torch
from speedup_backends import searched_configs

from flora_steps.core import DEFAULT_TARGETS, factorise, find_linear_layers, materialise, trace_costs
from flora_steps.runtime import allocator
from flora_steps.runtime.models import input_shape  # also registers vit_digits

KINDS = ("system", "heap")


def faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@torch.no_grad()
def measure(args: argparse.Namespace) -> dict:
    """One process's timings with the allocator ``args.child`` (set before any model is built)."""
    if allocator.use_allocator(args.child) != args.child:
        raise SystemExit(f"{args.child}: the C library is not glibc")
    torch.manual_seed(args.seed)
    dense = timm.create_model(args.model).eval()
    shape = input_shape(dense)
    images = torch.randn((args.batch, *shape))
    costs = trace_costs(dense, shape)
    configs, ratios = searched_configs(dense, costs, args.budget, args.subnets, args.seed)
    factorised = copy.deepcopy(dense)
    factorise(factorised, find_linear_layers(dense, DEFAULT_TARGETS))
    models = {"dense": dense} | {name: materialise(factorised, config).eval() for name, config in configs.items()}
    del factorised
    times: dict[str, list[float]] = {name: [] for name in models}
    faulted: dict[str, list[int]] = {name: [] for name in models}
    for index in range(2 + args.repeats):
        for name, model in models.items():
            before, started = faults(), time.perf_counter()
            model(images)
            elapsed, after = 1000 * (time.perf_counter() - started), faults()
            if index >= 2:
                times[name].append(elapsed)
                faulted[name].append(after - before)
    return {
        name: {
            "ms": statistics.median(times[name]),
            "faults": int(statistics.median(faulted[name])),
            "macs_ratio": ratios.get(name, 1.0),
        }
        for name in models
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_base_patch16_224")
    parser.add_argument("--budget", type=float, default=0.45, help="fraction of dense MACs")
    parser.add_argument("--subnets", type=int, default=2)
    parser.add_argument("--processes", type=int, default=3, help="processes per allocator, alternately")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return
    print(f"{args.model}, batch {args.batch}, CPU, {torch.get_num_threads()} threads, median of {args.repeats}")
    shares: dict[str, dict[str, list[float]]] = {kind: {} for kind in KINDS}
    for process in range(args.processes):
        for kind in KINDS:
            command = [sys.executable, __file__, *sys.argv[1:], "--child", kind]
            result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            dense = result.pop("dense")
            line = f"{kind:6s} #{process + 1} dense {dense['ms']:7.1f} ms {dense['faults']:7d} faults"
            for name, subnet in result.items():
                speedup = dense["ms"] / subnet["ms"]
                share = speedup / subnet["macs_ratio"]
                shares[kind].setdefault(name, []).append(share)
                line += f" | {name} {subnet['ms']:7.1f} ms {subnet['faults']:7d} faults {speedup:.2f}x {share:6.1%}"
            print(line, flush=True)
    for kind in KINDS:
        for name, values in shares[kind].items():
            low, high = np.min(values), np.max(values)
            print(f"{kind:6s} {name}: share of the MACs ratio {np.median(values):.1%} (range {low:.1%} to {high:.1%})")


if __name__ == "__main__":
    main()
