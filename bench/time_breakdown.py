"""Benchmark: where compressed ViTs' inference time goes, per backend, by each backend's own profiler.

    python bench/time_breakdown.py [--model deit_base_patch16_224] [--budget 0.45] [--subnets 2]
                                   [--backends eager frozen onnxruntime] [--batch 16] [--repeats 5]

The dense model and ``--subnets`` searched-style subnets at ``--budget`` of the dense MACs
(``bench/speedup_backends.py``'s, as retrain materialises them), each run in every backend
(``speedup_backends.in_backend``: eager PyTorch, ``torch.compile`` with Inductor's freezing,
ONNX Runtime on the export). Every forward pass is split by the backend's profiler
(``torch.profiler`` with shapes; ONNX Runtime's session profiling) into the target layers'
matmuls (``decompose.targets``' layers, or their factorised pairs, by their shapes) and the
rest: what the ranks cannot shrink (attention, the norms, GELU, the biases, the layers
that are not targets, the framework; ONNX Runtime adds a target layer's bias as a node of
its own, counted in the rest, where PyTorch's ``addmm`` adds it in the layer). Unlike a model whose target layers return zeros
(``speedup_backends.without_targets``), this runs the real graph, which no compiler folds.

Printed per backend, median of ``--repeats`` interleaved rounds (each round in its own
order): each model's time, its target layers' and the rest; per subnet the speedup's share
of its MACs ratio, its pairs' rate per MAC over the dense target layers', and the ceiling:
the share if the pairs ran as fast per MAC as the dense layers. Then the largest part of
the dense model's time the rest may take for ``--goal`` of the MACs ratio to be reachable
at all (pairs at the dense rate).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import timm
import torch
from speedup_backends import OnnxModule, in_backend, searched_configs, target_shrink
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from flora_steps.core import DEFAULT_TARGETS, factorise, find_linear_layers, materialise, trace_costs
from flora_steps.runtime.models import input_shape  # also registers vit_digits

#: The profiler's matmul events of a linear layer in PyTorch, and where each one's input and weight shapes lie.
TORCH_MATMULS = {"aten::addmm": (1, 2), "aten::mm": (0, 1)}
FORWARD = "forward"  # the record_function around each profiled PyTorch forward pass


def other_shapes(dense: nn.Module, targets: list[str]) -> set[tuple[int, int]]:
    """(in, out) of the linear layers that are not targets: a matmul of another shape belongs to a target."""
    return {
        (module.in_features, module.out_features)
        for name, module in dense.named_modules()
        if isinstance(module, nn.Linear) and name not in targets
    }


def torch_split(model: nn.Module, images: torch.Tensor, others: set[tuple[int, int]]) -> tuple[float, float]:
    """Milliseconds of one forward pass of a PyTorch module and of its target layers' matmuls in it."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler, record_function(FORWARD):
        model(images)
    total = targets = 0.0
    for event in profiler.events():
        if event.name == FORWARD:
            total += event.cpu_time_total / 1000
        elif event.name in TORCH_MATMULS:
            inputs, weight = (event.input_shapes[i] for i in TORCH_MATMULS[event.name])
            if (inputs[-1], weight[-1]) not in others:
                targets += event.cpu_time_total / 1000
    return total, targets


def onnx_splits(session: OnnxModule, others: set[tuple[int, int]]) -> list[tuple[float, float]]:
    """Milliseconds of each profiled run of an ONNX Runtime session and of its target layers' MatMul nodes (a
    MatMul whose weight is an initializer lists one input shape)."""
    events = json.loads(Path(session.session.end_profiling()).read_text())
    runs = [event for event in events if event.get("cat") == "Session" and event["name"] == "model_run"]
    targets = np.zeros(len(runs))
    starts = np.array([run["ts"] for run in runs])
    for event in events:
        arguments = event.get("args", {})
        if event.get("cat") != "Node" or arguments.get("op_name") != "MatMul":
            continue
        inputs, outputs = arguments.get("input_type_shape", []), arguments.get("output_type_shape", [])
        if len(inputs) != 1:  # both operands computed: attention's product, not a layer
            continue
        shape = (next(iter(inputs[0].values()))[-1], next(iter(outputs[0].values()))[-1])
        if shape not in others:
            targets[np.searchsorted(starts, event["ts"], side="right") - 1] += event["dur"] / 1000
    return [(run["dur"] / 1000, float(spent)) for run, spent in zip(runs, targets, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_base_patch16_224")
    parser.add_argument("--budget", type=float, default=0.45, help="fraction of dense MACs")
    parser.add_argument("--subnets", type=int, default=2)
    parser.add_argument(
        "--backends", nargs="+", default=["eager", "frozen", "onnxruntime"], choices=["eager", "frozen", "onnxruntime"]
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--goal", type=float, default=0.95, help="share of the MACs ratio to bound the rest for")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    print(f"{args.model}, batch {args.batch}, CPU, {torch.get_num_threads()} threads, median of {args.repeats}")
    dense = timm.create_model(args.model).eval()
    shape = input_shape(dense)
    images = torch.randn((args.batch, *shape))
    costs = trace_costs(dense, shape)
    targets = find_linear_layers(dense, DEFAULT_TARGETS)
    others = other_shapes(dense, targets)
    configs, macs_ratio = searched_configs(dense, costs, args.budget, args.subnets, args.seed)
    factorised = copy.deepcopy(dense)
    factorise(factorised, targets)
    models = {"dense": dense} | {name: materialise(factorised, config).eval() for name, config in configs.items()}
    del factorised
    splits: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        runs = {}
        for backend in args.backends:
            for name, model in models.items():
                profiled = backend == "onnxruntime"  # ONNX Runtime profiles every run of its session
                runs[backend, name] = in_backend(model, backend, shape, Path(folder), name, profiled)
        order = np.random.default_rng(args.seed)
        for index in range(2 + args.repeats):  # two untimed rounds: compiling, caches
            for key in (list(runs)[i] for i in order.permutation(len(runs))):
                backend, name = key
                if backend == "onnxruntime":
                    runs[key](images)
                else:
                    split = torch_split(runs[key], images, others)
                    if index >= 2:
                        splits.setdefault(key, []).append(split)
        for key, module in runs.items():
            if key[0] == "onnxruntime":
                splits[key] = onnx_splits(module, others)[2:]
    bound = None
    for backend in args.backends:
        median = {name: tuple(statistics.median(part) for part in zip(*splits[backend, name])) for name in models}
        dense_ms, dense_targets = median["dense"]
        rest = dense_ms - dense_targets
        for name, (total, spent) in median.items():
            line = (
                f"{backend:12s} {name:14s} {total:8.1f} ms: target layers {spent:8.1f}, the rest {total - spent:7.1f}"
            )
            line += f" ({(total - spent) / total:.1%})"
            if name in configs:
                shrink = target_shrink(costs, targets, configs[name])
                ratio = macs_ratio[name]
                ceiling = dense_ms / (rest + dense_targets * shrink)
                line += (
                    f"  share of MACs ratio {dense_ms / total / ratio:6.1%}, pairs per MAC {dense_targets * shrink / spent:.2f}"
                    f" of dense, ceiling {ceiling / ratio:6.1%}"
                )
                # the rest's largest part of the dense time with which the goal is reachable at the dense rate
                bound = (1 / (args.goal * ratio) - shrink) / (1 - shrink)
            print(line)
    if bound is not None:
        print(
            f"{args.goal:.0%} of the MACs ratio needs the rest at most {bound:.1%} of the dense model's time "
            f"(last subnet, its target layers at the dense rate per MAC)"
        )


if __name__ == "__main__":
    main()
