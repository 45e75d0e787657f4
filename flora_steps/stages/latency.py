"""Measure the inference latency of the dense model and of every compressed model, beside the table's prediction.

    python -m flora_steps.stages.latency --params params.yaml

Every model `retrain` made (the first seed's, of every method at each of its budgets:
SVD uniform, the control, FLORA, ViT-Slim, FLORA on ViT-Slim, OFB, FLORA on OFB) and the
dense base model run forward passes of `retrain.latency_batch` random images, interleaved round by
round so that machine noise hits all of them alike; the median and quartiles over
`retrain.latency_repeats` rounds are reported, on the CPU and also on CUDA when
present (in bfloat16 with compute.amp). Beside each, the latency table's prediction
(`latency_table`: fixed part plus each target layer at its rank, or for ViT-Slim's
models the pruned fixed part at their parts' share plus each attention and MLP at its
width; for OFB's models `latency_table_ofb`: the fixed part at their embedding width
plus each attention and MLP at theirs; for FLORA on a pruned model, the latency table
of that model, `latency_table_on_slim` or `_on_ofb`) and its error. The tables must have been
measured under the same key (device, threads, allocator, batch, precision, library versions):
else one line says which differs. Writes `results/latency/`:

- `latency.csv`: per model and device, the median and quartile milliseconds per
  batch, the speedup over the dense model, the predicted milliseconds and the
  prediction's relative error, and the error of the predicted share of the dense
  model's latency (the prediction over the same table's prediction of the dense model;
  for FLORA on a pruned model, its share of that model by that model's table times that
  model's share of the dense one by ViT-Slim's or OFB's table; a drift of the machine's
  speed between a table and this stage cancels there)
- `metrics.json`: per device, each model's median, and both errors' median absolute
  value
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial

import numpy as np
import pandas as pd
import torch

from ..core.latency import LatencyTable, StructureTable, WidthTable, precision_of, time_rounds
from ..pipeline.catalogue import METHOD_STAGES, STAGES
from ..pipeline.methods import BASES, METHODS
from ..pruning.structure import block_heads, part_widths
from ..runtime.artifacts import ModelSpec, load_model, write_csv, write_json
from ..runtime.context import StageContext, run_as_program, stage_main
from ..runtime.latency import read_latency_table, read_structure_table, read_tables
from ..runtime.models import input_shape
from ..runtime.progress import progress

log = logging.getLogger(__name__)


def pruned_prediction(
    widths: WidthTable | None, structures: StructureTable | None, spec: ModelSpec, heads: Mapping[str, int]
) -> tuple[float, float]:
    """A pruned model's predicted ms from its widths (factorised layers aside), and the same table's prediction of
    the dense model: OFB's table where it prunes heads or the embedding width, else ViT-Slim's widths (``heads``:
    each block's in the dense model); NaN without that table."""
    if spec.embed_dim is not None or any(kept.heads is not None for kept in spec.pruned.values()):
        if structures is None:
            return float("nan"), float("nan")
        embed = spec.embed_dim or structures.embed_dim
        blocks = {
            name: (kept.heads or heads[name], kept.head_dim, kept.mlp_hidden) for name, kept in spec.pruned.items()
        }
        return structures.predict_ms(embed, blocks), structures.dense_ms
    if widths is None:
        return float("nan"), float("nan")
    return widths.predict_ms(part_widths(spec.pruned, heads)), widths.dense_ms


def dense_in_pruned_terms(
    table: LatencyTable,
    widths: WidthTable | None,
    structures: StructureTable | None,
    spec: ModelSpec,
    heads: Mapping[str, int],
) -> float:
    """The dense model's ms in the terms of a pruned model's rank table (``table``): that model's prediction there
    over its share of the dense model by ViT-Slim's widths or OFB's table, which are timed beside the dense model's
    (``pruned_prediction``): what the shares of FLORA's models on it divide by; NaN without those."""
    pruned_ms, dense_ms = pruned_prediction(widths, structures, spec, heads)
    return table.dense_ms * dense_ms / pruned_ms


def prediction(
    dense: LatencyTable,
    ranks: LatencyTable,
    widths: WidthTable | None,
    structures: StructureTable | None,
    spec: ModelSpec,
    heads: Mapping[str, int],
) -> tuple[float, float]:
    """The tables' prediction for a saved model, and the dense model's latency in the same table's terms (what its
    predicted share of the dense model divides by): from its ranks by its base model's table (``ranks``; ``dense``,
    the dense model's, or the pruned base's for FLORA on it); from its pruned widths where it keeps every head and the
    embedding width (ViT-Slim's; ``heads``: each block's); from its heads, channels, units and embedding width by
    OFB's table (OFB's). NaN where the table times none of its kind.

    FLORA on a pruned base: its share of the base by the base's table, times the base's share of the dense model by
    the pruned method's table (timed beside the dense model's), so that no share spans two tables timed apart
    (``dense_in_pruned_terms``)."""
    if not spec.pruned:
        return ranks.predict_ms(spec.factorised), dense.dense_ms
    if spec.factorised:
        return ranks.predict_ms(spec.factorised), dense_in_pruned_terms(ranks, widths, structures, spec, heads)
    return pruned_prediction(widths, structures, spec, heads)


def timing_table(
    timed: Mapping[tuple[str, float], np.ndarray], predicted: Mapping[tuple[str, float], tuple[float, float]]
) -> pd.DataFrame:
    """Per model (the dense one first): median and quartile ms, speedup over dense, the prediction and its relative
    error, and the error of the predicted share of the dense model's latency (what a fraction budget relies on:
    the prediction over the same table's prediction of the dense model; ``predicted``: both, per model)."""
    rows = []
    for (method, budget), values in timed.items():
        q1, median, q3 = np.percentile(values, [25, 50, 75])
        rows.append({"method": method, "budget": budget, "latency_ms": median, "q1_ms": q1, "q3_ms": q3})
    table = pd.DataFrame(rows).assign(predicted_ms=[predicted[key][0] for key in timed])
    reference = np.array([predicted[key][1] for key in timed])
    dense = table.iloc[0]
    table["speedup"] = dense["latency_ms"] / table["latency_ms"]
    table["prediction_error"] = table["predicted_ms"] / table["latency_ms"] - 1
    table["share_error"] = (table["predicted_ms"] / reference) / (table["latency_ms"] / dense["latency_ms"]) - 1
    return table.round(4)


def run(context: StageContext) -> None:
    params = context.params
    models = {("dense", 1.0): load_model(context.input("dense"))}  # keyed by (method, budget)
    for method, stage in METHOD_STAGES.items():
        budgets = getattr(params.budgets, STAGES[stage].foreach)
        for budget, path in zip(budgets, context.inputs(method), strict=True):
            models[method, budget] = load_model(path)
    shape = input_shape(models["dense", 1.0][0])
    heads = block_heads(models["dense", 1.0][0])
    batch, repeats = params.retrain.latency_batch, params.retrain.latency_repeats
    devices = [torch.device("cpu")] + ([context.device] if context.device.type == "cuda" else [])
    tables, metrics = [], {}
    for device in devices:
        precision = precision_of(device, params.compute.amp)
        ranks, widths = read_tables(context.input("table"), device, params)
        base_ranks = {"dense": ranks} | {  # FLORA on a pruned base: that model's own table
            name: read_latency_table(context.input(base.stage("table")), device, params, base.stage("latency_table"))
            for name, base in BASES.items()
            if name != "dense"
        }
        structures = read_structure_table(context.input("table_ofb"), device, params)
        images = torch.randn((batch, *shape), device=device)
        runs = {name: (model.eval().to(device), images) for name, (model, _) in models.items()}
        timed = time_rounds(runs, repeats, dtype=precision, rounds=partial(progress, desc=f"latency {device.type}"))
        predicted = {
            (method, budget): prediction(ranks, base_ranks[METHODS[method].base], widths, structures, spec, heads)
            for (method, budget), (_, spec) in models.items()
        }
        timings = timing_table(timed, predicted)
        timings.insert(2, "device", device.type)
        timings.insert(3, "batch", batch)
        tables.append(timings)
        metrics[device.type] = {
            "models_ms": {f"{row.method} {row.budget}": row.latency_ms for row in timings.itertuples()},
            "prediction_median_abs_error": round(float(timings["prediction_error"].abs().median()), 4),
            "share_median_abs_error": round(float(timings["share_error"].iloc[1:].abs().median()), 4),
            "predicted_models": int(timings["predicted_ms"].notna().sum()),
        }
        log.info(
            "%s: dense %.3f ms per batch of %d; the prediction's median |error| %.1f%%, of the share of dense %.1f%%",
            device.type,
            timings["latency_ms"].iloc[0],
            batch,
            100 * metrics[device.type]["prediction_median_abs_error"],
            100 * metrics[device.type]["share_median_abs_error"],
        )
        for model, _ in models.values():
            model.to("cpu")
    write_csv(context.output("latency"), pd.concat(tables, ignore_index=True))
    write_json(context.output("metrics"), metrics | {"batch": batch, "repeats": repeats, "seconds": context.seconds()})


def main(argv: list[str] | None = None) -> int:
    return stage_main("latency", __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    run_as_program(main)
