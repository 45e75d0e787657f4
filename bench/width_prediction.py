"""Benchmark: where the latency table's prediction of ViT-Slim's models goes wrong.

    python bench/width_prediction.py [--results results] [--budgets 0.14 0.26] [--batch 16] [--repeats 40]

Reads a finished run's dense model (``<results>/pretrain``) and ViT-Slim's sliced models
(``<results>/retrain/slim/<budget>``), measures the pruned-width rows of a latency table
as the latency_table stage does (``pruning.structure.timed_parts`` and ``timed_models``
at params.yaml's filter.ratios, ``core.latency.measure_table``), and then times, in
interleaved rounds, the dense model, each ViT-Slim model, and that model's own attention
and MLP modules alone at their exact widths. For each model it prints:
- the measured and predicted milliseconds per batch;
- both as fractions of the dense model's (measured in the same rounds; the table's
  prediction), as fraction budgets use them, and the prediction with the dense model's
  pruned fixed part whatever the share (what the table predicted before it timed the
  uniformly pruned models);
- its parts as the table interpolates them, and as timed at their exact widths (the
  interpolation's error);
- the table's pruned fixed part at the model's share (interpolated between the
  uniformly pruned models less their parts), the dense model's (share 1, all the table
  had before), and the ViT-Slim model less its own parts (the fixed part's error).
Runs on the CPU with params.yaml's compute.threads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import yaml

from flora_steps.core import trace_costs
from flora_steps.core.latency import WidthTable, measure_table, time_rounds
from flora_steps.pruning.structure import block_heads, part_widths, prunable_blocks, timed_models, timed_parts
from flora_steps.runtime.allocator import use_allocator
from flora_steps.runtime.artifacts import load_model
from flora_steps.runtime.models import input_shape

PARAMS = yaml.safe_load(Path("params.yaml").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--budgets", nargs="+", default=["0.14", "0.26"], help="ViT-Slim budgets of the run")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument(
        "--allocator",
        choices=["heap", "system"],
        default="heap",
        help="glibc malloc as compute.allocator sets it in the stages (heap: freed memory kept for reuse)",
    )
    args = parser.parse_args()
    use_allocator(args.allocator)
    torch.set_num_threads(PARAMS["compute"]["threads"] or torch.get_num_threads())
    torch.manual_seed(0)
    dense, _ = load_model(args.results / "pretrain/model.safetensors")
    shape = input_shape(dense)
    images = torch.randn(args.batch, *shape)
    costs = trace_costs(dense, shape)
    heads = block_heads(dense)
    ratios = PARAMS["filter"]["ratios"]
    parts, models = timed_parts(dense, costs, ratios), timed_models(dense, ratios)
    rows = measure_table(dense.eval(), {}, {}, images, args.repeats, parts=parts, pruned_models=models)
    table = WidthTable.from_frame(rows)
    print("pruned fixed part by share:", {share: round(ms, 3) for share, ms in sorted(table.fixed.items())})
    tokens = torch.randn(args.batch, costs.layers[f"{next(iter(heads))}.attn.qkv"].tokens, dense.embed_dim)
    print(f"{args.results}, batch {args.batch}, {torch.get_num_threads()} thread(s), median of {args.repeats}")
    for budget in args.budgets:
        slim, spec = load_model(args.results / f"retrain/slim/{budget}/model.safetensors")
        widths = part_widths(spec.pruned, heads)
        runs = {"dense": (dense, images), "slim": (slim.eval(), images)}
        for name, block in prunable_blocks(slim).items():
            runs |= {f"{name}.attn": (block.attn, tokens), f"{name}.mlp": (block.mlp, tokens)}
        timed = {key: float(np.median(values)) for key, values in time_rounds(runs, args.repeats).items()}
        exact = sum(timed[part] for part in widths)
        interpolated = sum(table.part_ms(name, widths.get(name)) for name in table.options)
        predicted = table.predict_ms(widths)
        share = interpolated / table.full_parts_ms
        before = table.fixed_ms() + interpolated  # the dense model's pruned fixed part, whatever the share
        measured_fraction = timed["slim"] / timed["dense"]
        print(
            f"slim {budget}: measured {timed['slim']:.3f} ms, predicted {predicted:.3f} "
            f"({predicted / timed['slim'] - 1:+.1%}); dense measured {timed['dense']:.3f}, predicted {table.dense_ms:.3f}"
        )
        print(
            f"  fraction of the dense model's: measured {measured_fraction:.3f} (same rounds), predicted "
            f"{predicted / table.dense_ms:.3f} ({predicted / table.dense_ms / measured_fraction - 1:+.1%}); with "
            f"the dense model's fixed part {before / table.dense_ms:.3f} ({before / table.dense_ms / measured_fraction - 1:+.1%})"
        )
        print(f"  parts: interpolated {interpolated:.3f} ms, at their exact widths alone {exact:.3f}")
        print(
            f"  fixed part: the table's {table.fixed_ms(share):.3f} ms at share {share:.3f} (dense's "
            f"{table.fixed_ms():.3f}), the ViT-Slim model less its parts {timed['slim'] - exact:.3f}"
        )


if __name__ == "__main__":
    main()
