"""Measure OFB's latency table: every attention and MLP width OFB can choose, at a grid of embedding widths.

    python -m flora_steps.stages.latency_table_ofb --params params.yaml

OFB (`ofb` stage) chooses per block the heads and channels per head of its attention
and the units of its MLP, and one embedding width shared by all blocks; its candidate
grids are `ofb.head_ratios`, `head_dim_ratios`, `mlp_ratios` and `embed_ratios`. On the
CPU (with compute.threads) and also on CUDA when present (in bfloat16 with
compute.amp), each block's attention at every (heads, channels per head) cell and MLP
at every width of those grids (the full widths included) runs alone on a batch of
`retrain.latency_batch` images' tokens at `ofb.table_embed_widths` embedding widths
(evenly spaced over the grid, both ends included; linear between). The model less its
attentions and MLPs (its *skeleton*) runs at those embedding widths too, and so do the
dense model and the model narrowed at each of those widths (every head kept, channels
per head and units at the same place of their grids): each one's time less its
skeleton and parts is the residual at its width, which a prediction adds (linear
between widths; the dense model's prediction is its timing). Blocks of one shape are
timed once. All run in interleaved rounds (each round in its own order),
`retrain.table_repeats` timed after three warm-up rounds; median and quartiles are
kept. `ofb_latency` searches OFB with
this table's prediction as its cost, and the latency stage predicts OFB's models from
it. Writes `results/latency_table_ofb/`:

- `table.csv`: per device, one row per block, embedding width and attention cell or MLP
  width, per skeleton width, per residual width and the dense model: median and quartile milliseconds per
  batch, each row keyed by device, device name, threads, allocator, batch, precision and
  torch/timm versions; only the header for a model OFB cannot prune
- `metrics.json`: per device, the key, the dense model's time and the residual by width
"""

from __future__ import annotations

import logging

import pandas as pd

from ..core import trace_costs
from ..core.latency import STRUCTURE_COLUMNS, StructureTable, measure_structure_table
from ..pruning.ofb import OFBGrids, timed_structures
from ..runtime.artifacts import load_model, write_csv, write_json
from ..runtime.context import StageContext, run_as_program, stage_main
from ..runtime.latency import timing_devices
from ..runtime.machine import KEY
from ..runtime.models import input_shape

log = logging.getLogger(__name__)


def run(context: StageContext) -> None:
    params, cfg = context.params, context.params.ofb
    dense, spec = load_model(context.input("dense"))
    shape = input_shape(dense)
    grids = OFBGrids(cfg.head_ratios, cfg.head_dim_ratios, cfg.mlp_ratios, cfg.embed_ratios)
    repeats = params.retrain.table_repeats
    try:
        blocks, skeletons, models = timed_structures(dense, grids, trace_costs(dense, shape), cfg.table_embed_widths)
    except ValueError as error:
        log.warning("OFB cannot prune %s (%s): the table is empty", spec.model, error)
        write_csv(context.output("table"), pd.DataFrame(columns=[*KEY, *STRUCTURE_COLUMNS]))
        write_json(context.output("metrics"), {"prunable": False, "repeats": repeats, "seconds": context.seconds()})
        return
    tables, metrics = [], {}
    for timing in timing_devices(context.device, params, shape, "OFB latency table"):
        rows = measure_structure_table(
            dense,
            blocks,
            skeletons,
            timing.images,
            repeats,
            dtype=timing.precision,
            rounds=timing.rounds,
            models=models,
        )
        tables.append(timing.keyed(rows))
        table = StructureTable.from_frame(rows)
        metrics[timing.device.type] = timing.key | {
            "dense_ms": table.model_ms,
            "residual_ms": {embed: round(ms, 5) for embed, ms in sorted(table.residual.items())},
            "embed_widths": sorted(table.skeleton),
            "rows": len(rows),
        }
        log.info(
            "%s (%s): dense %.3f ms per batch of %d, of which %.3f ms not in its skeleton and parts timed alone; "
            "%d options",
            timing.device.type,
            timing.key["device_name"],
            table.model_ms,
            len(timing.images),
            table.residual[table.embed_dim],
            len(rows),
        )
        dense.to("cpu")
    write_csv(context.output("table"), pd.concat(tables, ignore_index=True))
    write_json(
        context.output("metrics"), metrics | {"prunable": True, "repeats": repeats, "seconds": context.seconds()}
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main("latency_table_ofb", __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    run_as_program(main)
