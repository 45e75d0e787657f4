"""Measure the latency table: every target layer at every rank, every block's parts at pruned widths, the fixed parts.

    python -m flora_steps.stages.latency_table --params params.yaml

On the CPU (with compute.threads) and also on CUDA when present (in bfloat16 with
compute.amp), each target layer of the dense model (decompose.targets) runs dense and
as a factorised pair at each rank of its grid (filter.ratios) and of one window from a
multiple of `retrain.table_rank_multiple` to the next (what a rank off the grid costs for
not being a multiple), alone, on a batch of `retrain.latency_batch` images' tokens; the dense model runs beside them, and its time
less its dense target layers' is the fixed part. For ViT-Slim's widths, each block's
attention (every head, the same ratios of its channels per head, and one channel per
head) and MLP (the same ratios of its hidden units, and one unit) run too, and so does
the whole model pruned uniformly at each of those ratios: each model's time less its
parts' is the pruned fixed part at its parts' share of their time in full (the dense
model's at share 1). All of them run in interleaved rounds, `retrain.table_repeats`
timed after three warm-up rounds; median and quartiles are kept. The latency stage predicts every compressed model's time from this table beside
measuring it. Writes `results/latency_table/`:

- `table.csv`: per device, one row per layer and rank (empty rank: dense), per
  attention or MLP and width (channels or units kept), the fixed part, the pruned
  fixed part at each share and the dense model: median and quartile milliseconds per batch, each row
  keyed by device, device name, threads, allocator, batch, precision and torch/timm versions
- `metrics.json`: per device, the key, the dense model's measured and predicted time
"""

from __future__ import annotations

import logging

import pandas as pd

from ..core import find_linear_layers, trace_costs
from ..core.latency import MODEL, LatencyTable, measure_table
from ..core.space import rank_grid
from ..errors import UserError
from ..pruning.structure import timed_models, timed_parts
from ..runtime.artifacts import load_model, write_csv, write_json
from ..runtime.context import StageContext, run_as_program, stage_main
from ..runtime.latency import timing_devices
from ..runtime.models import input_shape

log = logging.getLogger(__name__)


def run(context: StageContext) -> None:
    params = context.params
    dense, spec = load_model(context.input("dense"))
    names = find_linear_layers(dense, params.decompose.targets)
    if not names:
        raise UserError(f"decompose.targets: no linear layer of {spec.model} matches {params.decompose.targets}")
    shape = input_shape(dense)
    costs = trace_costs(dense, shape)
    layers = {name: costs.layers[name] for name in names}
    ranks = {
        name: rank_grid(layer.in_features, layer.out_features, params.filter.ratios) for name, layer in layers.items()
    }
    parts = timed_parts(dense, costs, params.filter.ratios)  # none for a model without ViT blocks
    pruned_models = timed_models(dense, params.filter.ratios)
    repeats = params.retrain.table_repeats
    tables, metrics = [], {}
    for timing in timing_devices(context.device, params, shape, "latency table"):
        rows = measure_table(
            dense,
            layers,
            ranks,
            timing.images,
            repeats,
            dtype=timing.precision,
            rounds=timing.rounds,
            parts=parts,
            pruned_models=pruned_models,
            multiple=params.retrain.table_rank_multiple,
        )
        tables.append(timing.keyed(rows))
        measured = float(rows.loc[rows["part"] == MODEL, "median_ms"].iloc[0])
        predicted = LatencyTable.from_frame(rows).dense_ms
        metrics[timing.device.type] = timing.key | {
            "dense_ms": measured,
            "dense_predicted_ms": round(predicted, 5),
            "rows": len(rows),
        }
        log.info(
            "%s (%s): dense %.3f ms per batch of %d; %d options",
            timing.device.type,
            timing.key["device_name"],
            measured,
            len(timing.images),
            len(rows),
        )
        dense.to("cpu")
    write_csv(context.output("table"), pd.concat(tables, ignore_index=True))
    write_json(context.output("metrics"), metrics | {"repeats": repeats, "seconds": context.seconds()})


def main(argv: list[str] | None = None) -> int:
    return stage_main("latency_table", __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    run_as_program(main)
