"""Benchmark: how fast each factor of a low-rank layer runs per MAC, beside the dense layer it replaces.

    python bench/factor_efficiency.py [--model deit_base_patch16_224] [--batch 16]
                                      [--ranks 48 96 128 200 256 384] [--threads 2] [--repeats 7]

For each distinct shape of the model's target layers (DeiT-B: qkv 768 -> 2304, fc1
768 -> 3072, fc2 3072 -> 768) at the real input (batch x tokens rows), times the dense
``F.linear``, each factor of the pair at every rank (``first``: in -> r, ``second``:
r -> out) and the pair, in interleaved rounds (median of ``--repeats``), and prints
their GMAC/s. A pair whose factors run slower per MAC than the dense layer keeps a
subnet's speedup below its MACs ratio whatever the rest of the model does: a small
inner dimension (``second``: r MACs per output value) leaves the dense layer's output
to write for a fraction of its MACs, which memory bandwidth, not arithmetic, limits.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F

from flora_steps.core import DEFAULT_TARGETS, find_linear_layers
from flora_steps.runtime.allocator import use_allocator
from flora_steps.runtime.models import input_shape  # also registers vit_digits


def tokens(model: torch.nn.Module) -> int:
    """Rows a target layer sees per image: the patch tokens plus the prefix tokens."""
    shape = input_shape(model)
    with torch.no_grad():
        return model.forward_features(torch.zeros(1, *shape)).shape[1]


def median_ms(runs: dict[str, Callable[[], torch.Tensor]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each call, timed in interleaved rounds after a warm-up."""
    for call in runs.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, call in runs.items():
            started = time.perf_counter()
            call()
            times[name].append(1000 * (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--ranks", type=int, nargs="+", default=[48, 96, 128, 200, 256, 384])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--allocator",
        choices=["heap", "system"],
        default="heap",
        help="glibc malloc as compute.allocator sets it in the stages (heap: freed memory kept for reuse)",
    )
    args = parser.parse_args()
    use_allocator(args.allocator)
    torch.set_num_threads(args.threads)
    model = timm.create_model(args.model, pretrained=False).eval()
    rows = args.batch * tokens(model)
    layers = [model.get_submodule(name) for name in find_linear_layers(model, DEFAULT_TARGETS)]
    shapes = dict.fromkeys((layer.in_features, layer.out_features) for layer in layers)
    print(f"{args.model}: {rows} rows (batch {args.batch}), {args.threads} threads, median of {args.repeats}")
    with torch.no_grad():
        for features, outputs in shapes:
            x = torch.randn(rows, features)
            dense = torch.randn(outputs, features)
            runs = {"dense": lambda x=x, w=dense: F.linear(x, w)}
            for rank in args.ranks:
                first, second = torch.randn(rank, features), torch.randn(outputs, rank)
                inner = torch.randn(rows, rank)
                runs[f"first {rank}"] = lambda x=x, w=first: F.linear(x, w)
                runs[f"second {rank}"] = lambda x=inner, w=second: F.linear(x, w)
                runs[f"pair {rank}"] = lambda x=x, a=first, b=second: F.linear(F.linear(x, a), b)
            ms = median_ms(runs, args.repeats)
            dense_rate = rows * features * outputs / ms["dense"] / 1e6
            print(f"\n{features} -> {outputs}: dense {ms['dense']:.2f} ms, {dense_rate:.1f} GMAC/s")
            print("rank  first GMAC/s  second GMAC/s  pair GMAC/s  pair / dense per MAC")
            for rank in args.ranks:
                first_rate = rows * features * rank / ms[f"first {rank}"] / 1e6
                second_rate = rows * rank * outputs / ms[f"second {rank}"] / 1e6
                pair_rate = rows * rank * (features + outputs) / ms[f"pair {rank}"] / 1e6
                print(
                    f"{rank:4d}  {first_rate:12.1f}  {second_rate:13.1f}  {pair_rate:11.1f}  "
                    f"{pair_rate / dense_rate:20.2f}"
                )


if __name__ == "__main__":
    main()
