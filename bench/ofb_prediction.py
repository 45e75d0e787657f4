"""Benchmark: how well OFB's latency table predicts OFB's models, against their measured time.

    python bench/ofb_prediction.py [--results results] [--repeats 60] [--batch 16]

Reads a finished run's dense model (``<results>/pretrain``) and OFB's fine-tuned models
(``<results>/retrain/ofb/*`` and ``retrain/ofb_latency/*``), measures OFB's latency table
as the latency_table_ofb stage does (``pruning.ofb.timed_structures`` at params.yaml's
``ofb`` grids and ``table_embed_widths``, ``core.latency.measure_structure_table``), then
times the dense model and every OFB model in interleaved rounds. For each model it
prints the measured and predicted milliseconds per batch, both as fractions of the
dense model's (measured in the same rounds; the table's prediction), and the
prediction with the residual at the full embedding width only (what the table had
before it timed narrowed models). Runs on the CPU with params.yaml's compute.threads.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml

from flora_steps.core import trace_costs
from flora_steps.core.latency import StructureTable, measure_structure_table, time_rounds
from flora_steps.pruning.ofb import OFBGrids, timed_structures
from flora_steps.pruning.structure import block_heads
from flora_steps.runtime.allocator import use_allocator
from flora_steps.runtime.artifacts import load_model
from flora_steps.runtime.models import input_shape

PARAMS = yaml.safe_load(Path("params.yaml").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument(
        "--allocator",
        choices=["heap", "system"],
        default="heap",
        help="glibc malloc as compute.allocator sets it in the stages (heap: freed memory kept for reuse)",
    )
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    use_allocator(args.allocator)
    torch.set_num_threads(PARAMS["compute"]["threads"] or torch.get_num_threads())
    torch.manual_seed(0)
    dense, _ = load_model(args.results / "pretrain/model.safetensors")
    shape, cfg = input_shape(dense), PARAMS["ofb"]
    images = torch.randn(args.batch, *shape)
    grids = OFBGrids(cfg["head_ratios"], cfg["head_dim_ratios"], cfg["mlp_ratios"], cfg["embed_ratios"])
    blocks, skeletons, models = timed_structures(dense, grids, trace_costs(dense, shape), cfg["table_embed_widths"])
    frame = measure_structure_table(dense.eval(), blocks, skeletons, images, args.repeats, models=models)
    table = StructureTable.from_frame(frame)
    before = replace(table, residual={table.embed_dim: table.residual[table.embed_dim]})
    print(f"{args.results}, batch {args.batch}, {torch.get_num_threads()} thread(s), median of {args.repeats}")
    print("residual by embedding width:", {embed: round(ms, 3) for embed, ms in sorted(table.residual.items())})
    heads = block_heads(dense)
    runs, structures = {"dense": (dense, images)}, {}
    for folder in sorted([*args.results.glob("retrain/ofb/*"), *args.results.glob("retrain/ofb_latency/*")]):
        model, spec = load_model(folder / "model.safetensors")
        name = f"{folder.parent.name} {folder.name}"
        runs[name] = (model.eval(), images)
        widths = {
            block: (kept.heads or heads[block], kept.head_dim, kept.mlp_hidden) for block, kept in spec.pruned.items()
        }
        structures[name] = (spec.embed_dim or table.embed_dim, widths)
    timed = {key: float(np.median(values)) for key, values in time_rounds(runs, args.repeats).items()}
    print(f"dense: measured {timed['dense']:.3f} ms, predicted {table.dense_ms:.3f}")
    for name, (embed, widths) in structures.items():
        predicted, old = table.predict_ms(embed, widths), before.predict_ms(embed, widths)
        measured = timed[name] / timed["dense"]
        print(
            f"{name}: measured {timed[name]:.3f} ms, predicted {predicted:.3f} ({predicted / timed[name] - 1:+.1%}); "
            f"fraction of dense measured {measured:.3f}, predicted {predicted / table.dense_ms:.3f} "
            f"({predicted / table.dense_ms / measured - 1:+.1%}); residual at full width only "
            f"{old / before.dense_ms:.3f} ({old / before.dense_ms / measured - 1:+.1%})"
        )


if __name__ == "__main__":
    main()
