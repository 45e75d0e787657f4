"""Benchmark: the share of the MACs speedup that compressed models achieve, per inference backend.

    python bench/speedup_backends.py [--model deit_base_patch16_224] [--budget 0.45] [--subnets 3]
                                     [--backends eager compile onnxruntime] [--forms macs fastest tiled bias_after]
                                     [--choose random latency] [--candidates 200]
                                     [--step 16] [--batch 16] [--repeats 5]

Builds, as retrain materialises them (random weights; latency does not depend on the
values), the dense model and ``--subnets`` searched-style subnets at ``--budget`` of
the dense MACs (the search's own sampler over the rank grid, MACs in [budget - 0.02,
budget]); with ``--choose latency``, the ``--subnets`` that a latency table measured here
first (below) predicts to take the least time per MAC among ``--candidates`` such draws:
how far choosing ranks by the table can lift the share. Each in every backend:
- ``eager``: PyTorch as the saved model runs (factorised layers as two ``nn.Linear``);
- ``compile``: ``torch.compile`` (Inductor) of the same model;
- ``frozen``: ``torch.compile`` with Inductor's ``freezing`` (weights as constants: prepacked
  oneDNN matmuls, elementwise ops fused into them), the CPU inference setting;
- ``onnxruntime``: the model exported as ``flora export`` does, run by ONNX Runtime
  (CPU, as many intra-op threads as torch has);
- ``onnxruntime-fused``: that export after ONNX Runtime's transformer optimizer for ViTs
  (``onnxruntime.transformers.optimizer``: each MLP's bias and GELU fused into one
  ``BiasGelu``, each residual add into its LayerNorm as ``SkipLayerNormalization``).
and in every form (``--forms``):
- ``macs``: as ``materialise`` makes them by MACs (a pair below break-even, else dense);
- ``fastest``: each layer in the form a latency table measured here first finds fastest
  (``LatencyTable.fastest_widths``: its rank, a timed rank above it padded with zero
  components, or dense; the same function). The table times each target layer's shape
  dense and as a pair at every multiple of ``--step`` below break-even, at this batch.
- ``bias_after``: the ``macs`` form with every linear layer (the dense model's too) as a
  matmul and then its bias added in place (``BiasAfter``), instead of ``addmm``, which
  first copies the bias into the output and then accumulates the product onto it: a
  second pass over the output that costs most where the inner dimension (a rank) is small.
- ``tiled``: the ``macs`` form with each MLP run on a few tokens of every image at a time
  (``TokenTiled``: tiles of about ``--tile-rows`` rows), against the dense model tiled
  the same way. An MLP acts on each token alone, so the result is the same, but a tile's
  hidden layer (DeiT-B: 3,072 wide) can stay in the cache instead of going through
  memory; a factorised ``fc1`` writes that hidden layer for a fraction of the dense
  layer's MACs. The tiles run along the static token axis, so the ONNX export keeps its
  dynamic batch dimension (feed-forward chunking, as Reformer and Hugging Face's
  ``chunk_size_feed_forward`` call it).
All of them run in interleaved rounds, each in its own order (median and quartiles of
``--repeats``), beside the dense model whose target layers return zeros at no cost (what
the ranks cannot shrink: attention's softmax, the norms, GELU, the other layers). Only
eager PyTorch runs that model as it is: compilers drop the norms whose outputs only the
missing layers read and fold the constant zeros through what they feed (on DeiT-Tiny,
Inductor's freezing kept no GELU and 2 of 25 norms; ONNX Runtime's optimised graph 1 of
12 softmaxes and no norm), so the ceiling below is eager's alone. For
each subnet, form and backend it prints the speedup over the dense model in the same
backend and form, the MACs ratio (dense MACs / subnet MACs) and the share of it
achieved; the speedup over the eager dense model, which is what a user of the
uncompressed model gains; and the ceiling: the speedup if the target layers ran as fast
per MAC as dense ones and the rest kept its time. With ``macs`` and ``tiled`` (or
``bias_after``) both, it also prints each model's time in that form over its time in
``macs``, paired round by round
(median and quartiles): what tiling itself gains, with the machine's drift cancelled.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import tempfile
from pathlib import Path

import numpy as np
import timm
import torch
from torch import nn

from flora_steps.core import (
    DEFAULT_TARGETS,
    CostModel,
    LinearCost,
    factorise,
    find_linear_layers,
    materialise,
    trace_costs,
)
from flora_steps.core.factorise import replace_module
from flora_steps.core.latency import LatencyTable, measure_table, time_rounds
from flora_steps.core.lowrank import break_even_rank
from flora_steps.core.search import CostTable, genome_choices, random_legal
from flora_steps.core.space import full_space
from flora_steps.runtime.allocator import use_allocator
from flora_steps.runtime.models import input_shape  # also registers vit_digits
from flora_steps.tools.export import export_onnx

#: The dense model without its target layers (``without_targets``).
FIXED = "no target layers"
TILED = " tiled"  # the suffix of a model in the tiled form
BIAS = " bias-after"  # the suffix of a model in the bias_after form
SUFFIX = {"tiled": TILED, "bias_after": BIAS}
RATIOS = [0.0625, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0]  # params.yaml's filter.ratios
BAND = 0.02


class OnnxModule(nn.Module):
    """An ONNX Runtime session called like a module (for ``time_rounds``)."""

    def __init__(self, path: Path, threads: int, profiled: bool = False) -> None:
        super().__init__()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        if profiled:  # every run's node timings, written by ``session.end_profiling()`` beside the model
            options.enable_profiling, options.profile_file_prefix = True, str(path.with_suffix(""))
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def forward(self, images: torch.Tensor) -> np.ndarray:
        return self.session.run(None, {self.input: images.numpy()})[0]


def target_shrink(costs: CostModel, targets: list[str], config: dict[str, int]) -> float:
    """The target layers' MACs at ``config`` over theirs in the dense model."""
    return sum(costs.layer_macs(t, config.get(t)) for t in targets) / sum(costs.layer_macs(t) for t in targets)


def searched_configs(
    dense: nn.Module,
    costs: CostModel,
    budget: float,
    count: int,
    seed: int,
    latency: LatencyTable | None = None,
    candidates: int = 1,
) -> tuple[dict[str, dict[str, int]], dict]:
    """``count`` searched-style rank configs at ``budget`` and each one's MACs ratio (dense / subnet); with a
    ``latency`` table, the ``count`` it predicts to take the least time per MAC among ``candidates`` drawn at that
    budget (the best share of their MACs ratio: the fastest alone would be the cheapest in MACs)."""
    layers = find_linear_layers(dense, DEFAULT_TARGETS)
    space = full_space({n: (costs.layers[n].in_features, costs.layers[n].out_features) for n in layers}, RATIOS)
    table = CostTable.of_macs(space, costs)
    rng = np.random.default_rng(seed)
    drawn: list[dict[str, int]] = []
    while len(drawn) < max(count, candidates if latency else count):
        genome = random_legal(rng, table, (budget - BAND) * costs.dense_macs, budget * costs.dense_macs)
        if genome is not None:
            drawn.append(space.ranks(genome_choices(space, genome)))
    if latency is not None:
        drawn.sort(key=lambda config: latency.predict_ms(config) / costs.macs(config))
    label = "latency-chosen" if latency else "searched"
    configs = {f"{label} #{index + 1}": config for index, config in enumerate(drawn[:count])}
    ratios = {name: costs.dense_macs / costs.macs(config) for name, config in configs.items()}
    return configs, ratios


class TokenTiled(nn.Module):
    """A token-wise ``module`` (an MLP) run on ``tokens`` tokens of every image at a time: the same result."""

    def __init__(self, module: nn.Module, tokens: int) -> None:
        super().__init__()
        self.module, self.tokens = module, tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.module(part) for part in x.split(self.tokens, dim=-2)], dim=-2)


class BiasAfter(nn.Module):
    """``linear`` as a matmul, then its bias added in place."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        product = torch.matmul(x, self.linear.weight.t())
        return product if self.linear.bias is None else product.add_(self.linear.bias)


def bias_after(model: nn.Module) -> nn.Module:
    """``model`` with every ``nn.Linear`` as ``BiasAfter``; in place."""
    for name in [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]:
        replace_module(model, name, BiasAfter(model.get_submodule(name)))
    return model


def tile_mlps(model: nn.Module, tokens: int) -> nn.Module:
    """``model`` (a timm ViT) with every block's MLP ``TokenTiled``; in place."""
    for block in model.blocks:
        block.mlp = TokenTiled(block.mlp, tokens)
    return model


class Vanished(nn.Module):
    """A target layer that costs nothing: zeros of its output's shape, made once (making them at every call, an
    allocation and a fill of each output, took 62 of the 505 ms of DeiT-B's part the ranks do not touch)."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features
        self.zeros = torch.zeros(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.out_features)
        if self.zeros.shape != shape:  # nothing downstream writes to a layer's output in place
            self.zeros = x.new_zeros(shape)
        return self.zeros


def without_targets(dense: nn.Module) -> nn.Module:
    """``dense`` with every target layer ``Vanished``: the time of everything the ranks cannot shrink."""
    model = copy.deepcopy(dense)
    for name in find_linear_layers(dense, DEFAULT_TARGETS):
        replace_module(model, name, Vanished(model.get_submodule(name).out_features))
    return model


def in_backend(
    model: nn.Module, backend: str, shape: tuple[int, ...], folder: Path, name: str, profiled: bool = False
) -> nn.Module:
    """``model`` (eval) as ``backend`` runs it (``profiled``: an ONNX Runtime session that profiles its runs)."""
    if backend == "eager":
        return model
    if backend == "compile":
        return torch.compile(model)
    if backend == "frozen":
        return torch.compile(model, options={"freezing": True})
    path = folder / f"{name.replace(' ', '_').replace('#', '')}.onnx"
    export_onnx(model, shape, path)
    if backend == "onnxruntime-fused":
        from onnxruntime.transformers import optimizer

        heads, width = model.blocks[0].attn.num_heads, model.embed_dim
        optimizer.optimize_model(str(path), model_type="vit", num_heads=heads, hidden_size=width).save_model_to_file(
            str(path)
        )
    return OnnxModule(path, torch.get_num_threads(), profiled)


def ladder_table(dense: nn.Module, costs: CostModel, images: torch.Tensor, step: int, repeats: int) -> LatencyTable:
    """A latency table of ``dense``'s target layers at every multiple of ``step`` below break-even."""
    layers = costs.layers
    targets: dict[str, LinearCost] = {name: layers[name] for name in find_linear_layers(dense, DEFAULT_TARGETS)}
    ranks = {
        name: range(step, break_even_rank(shape.in_features, shape.out_features), step)
        for name, shape in targets.items()
    }
    return LatencyTable.from_frame(measure_table(dense, targets, ranks, images, repeats, warmup=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_base_patch16_224")
    parser.add_argument("--budget", type=float, default=0.45, help="fraction of dense MACs")
    parser.add_argument("--subnets", type=int, default=3)
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["eager", "compile", "onnxruntime"],
        choices=["eager", "compile", "frozen", "onnxruntime", "onnxruntime-fused"],
    )
    parser.add_argument(
        "--forms", nargs="+", default=["macs", "fastest"], choices=["macs", "fastest", "tiled", "bias_after"]
    )
    parser.add_argument("--tile-rows", type=int, default=512, help="rows per tile of the tiled form's MLPs")
    parser.add_argument("--step", type=int, default=16, help="the latency table's rank step")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--allocator",
        choices=["heap", "system"],
        default="heap",
        help="glibc malloc as compute.allocator sets it in the stages (heap: freed memory kept for reuse)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--choose",
        nargs="+",
        choices=["random", "latency"],
        default=["random"],
        help="random: --subnets drawn at the budget; latency: the --subnets the latency table predicts to take "
        "the least time per MAC among --candidates drawn at the budget (both: side by side)",
    )
    parser.add_argument("--candidates", type=int, default=200)
    args = parser.parse_args()
    use_allocator(args.allocator)
    torch.manual_seed(args.seed)
    print(f"{args.model}, batch {args.batch}, CPU, {torch.get_num_threads()} threads, median of {args.repeats}")
    dense = timm.create_model(args.model).eval()
    shape = input_shape(dense)
    images = torch.randn((args.batch, *shape))
    costs = trace_costs(dense, shape)
    table = None
    if "fastest" in args.forms or "latency" in args.choose:
        with torch.no_grad():
            table = ladder_table(dense, costs, images, args.step, args.repeats)
        print(
            f"table: fixed part {table.fixed_ms:.1f} ms of the dense model's {table.dense_ms:.1f} ms "
            f"({table.fixed_ms / table.dense_ms:.1%}), {costs.other_macs / costs.dense_macs:.1%} of its MACs"
        )
    configs, macs_ratio = {}, {}
    for mode in args.choose:
        chooser = table if mode == "latency" else None
        chosen, ratios = searched_configs(dense, costs, args.budget, args.subnets, args.seed, chooser, args.candidates)
        configs |= chosen
        macs_ratio |= ratios
    factorised = copy.deepcopy(dense)
    factorise(factorised, find_linear_layers(dense, DEFAULT_TARGETS))
    plain = {"dense": dense, FIXED: without_targets(dense)}
    if "macs" in args.forms:
        plain |= {f"{name} macs": materialise(factorised, config).eval() for name, config in configs.items()}
    if "fastest" in args.forms:
        for name, config in configs.items():
            widths = table.fastest_widths(config)
            changed = {layer: width for layer, width in widths.items() if width != config[layer]}
            print(
                f"{name}: {sum(w is None for w in changed.values())} layers dense, "
                f"{sum(w is not None for w in changed.values())} padded; predicted "
                f"{table.predict_ms(config):.1f} ms by MACs form, "
                f"{table.predict_ms({t: w for t, w in widths.items() if w is not None}):.1f} ms fastest"
            )
            plain[f"{name} fastest"] = materialise(factorised, config, widths).eval()
    if "tiled" in args.forms:
        tokens = max(1, math.ceil(args.tile_rows / args.batch))
        print(f"tiled: MLPs on {tokens} tokens of each image at a time ({tokens * args.batch} rows)")
        for name in ("dense", FIXED, *configs):
            model = plain[name] if name in ("dense", FIXED) else materialise(factorised, configs[name]).eval()
            plain[name + TILED] = tile_mlps(copy.deepcopy(model), tokens)
    if "bias_after" in args.forms:
        for name in ("dense", FIXED, *configs):
            model = plain[name] if name in ("dense", FIXED) else materialise(factorised, configs[name]).eval()
            plain[name + BIAS] = bias_after(copy.deepcopy(model))
    del factorised
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        runs = {
            (backend, name): (in_backend(model, backend, shape, Path(folder), name), images)
            for backend in args.backends
            for name, model in plain.items()
        }
        timed = time_rounds(runs, args.repeats, warmup=2, shuffle=args.seed)
    median = {key: statistics.median(values) for key, values in timed.items()}
    spread = {key: np.percentile(values, [25, 75]) for key, values in timed.items()}
    references = tuple(name + suffix for suffix in ("", TILED, BIAS) for name in ("dense", FIXED))
    for backend in args.backends:
        for name in (name for name in references if name in plain):
            q1, q3 = spread[backend, name]
            folded = "  (folded by the compiler: not the fixed part)" if FIXED in name and backend != "eager" else ""
            print(f"{backend:12s} {name:20s} {median[backend, name]:9.1f} ms  [{q1:.1f}, {q3:.1f}]{folded}")
    targets = find_linear_layers(dense, DEFAULT_TARGETS)
    for name in plain:
        if name in references:
            continue
        subnet = name.rsplit(" ", 1)[0]
        ratio = macs_ratio[subnet]
        shrink = target_shrink(costs, targets, configs[subnet])
        form = next((suffix for suffix in (TILED, BIAS) if name.endswith(suffix)), "")
        for backend in args.backends:
            # the target layers as fast per MAC as dense ones, the rest of the model as it is (eager only: a compiler
            # folds the model without them)
            dense_ms, fixed_ms = median[backend, "dense" + form], median[backend, FIXED + form]
            ceiling = dense_ms / (fixed_ms + (dense_ms - fixed_ms) * shrink) if backend == "eager" else float("nan")
            speedup = dense_ms / median[backend, name]
            q1, q3 = spread[backend, name]
            versus = median["eager", "dense"] / median[backend, name] if "eager" in args.backends else float("nan")
            print(
                f"{backend:12s} {name:20s} {median[backend, name]:9.1f} ms  [{q1:.1f}, {q3:.1f}]  "
                f"speedup {speedup:5.2f}x  MACs ratio {ratio:5.2f}x  achieved {speedup / ratio:6.1%}  "
                f"vs eager dense {versus:5.2f}x  ceiling {ceiling:5.2f}x ({ceiling / ratio:.1%})"
            )
    for form in (form for form in SUFFIX if {"macs", form} <= set(args.forms)):
        for backend in args.backends:
            for name in ("dense", *configs):
                plain_time = timed[backend, name if name == "dense" else f"{name} macs"]
                gain = timed[backend, name + SUFFIX[form]] / plain_time  # round by round: the same moment's noise
                q1, q3 = np.percentile(gain, [25, 75])
                print(f"{backend:12s} {name:20s} {form} / macs time {np.median(gain):.3f} [{q1:.3f}, {q3:.3f}]")


if __name__ == "__main__":
    main()
