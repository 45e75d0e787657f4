"""Measure the inference latency of the dense model and of every compressed model, beside the table's prediction.

    python -m flora_steps.stages.latency --params params.yaml

Every model `retrain` made (the first seed's, of every method at each of its budgets:
SVD uniform, the control, FLORA, ViT-Slim, FLORA on ViT-Slim, OFB, FLORA on OFB) and the
dense base model run forward passes of `retrain.latency_batch` random images, interleaved round by
round so that machine noise hits all of them alike; the median and quartiles over
`retrain.latency_repeats` rounds are reported, on the CPU and also on CUDA when
present (in bfloat16 with compute.amp). Beside each, the latency table's prediction
(`latency_table`: fixed part plus each target layer at its rank) and its error; a
pruned model's structure is not in the table (no prediction). The table must have been
measured under the same key (device, threads, batch, precision, library versions):
else one line says which differs. Writes `results/latency/`:

- `latency.csv`: per model and device, the median and quartile milliseconds per
  batch, the speedup over the dense model, the predicted milliseconds and the
  prediction's relative error
- `metrics.json`: per device, each model's median, and the prediction's median
  absolute relative error
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..core.latency import LatencyTable, precision_of, time_rounds
from ..errors import UserError
from ..pipeline.catalogue import METHOD_STAGES, STAGES
from ..runtime.artifacts import ModelSpec, load_model, read_csv, write_csv, write_json
from ..runtime.context import StageContext, run_as_program, stage_main
from ..runtime.machine import key_difference, table_key
from ..runtime.models import input_shape
from ..runtime.progress import progress

log = logging.getLogger(__name__)


def device_table(table: pd.DataFrame, path: Path, key: dict) -> LatencyTable:
    """The latency table's rows of ``key``'s device, read back; one line when they were measured under another key."""
    rows = table[table["device"] == key["device"]].reset_index(drop=True)
    if rows.empty:
        raise UserError(f"{path}: no timings on {key['device']}; rerun the latency_table stage on this machine")
    difference = key_difference(rows.iloc[0].to_dict(), key)
    if difference is not None:
        raise UserError(
            f"{path}: measured with {difference}; rerun the latency_table stage here "
            "(snakemake -R latency_table, dvc repro -f latency_table)"
        )
    return LatencyTable.from_frame(rows)


def predicted_ms(table: LatencyTable, spec: ModelSpec) -> float:
    """The table's prediction for a saved model: NaN for a pruned structure, which the table does not time."""
    if spec.pruned or spec.embed_dim is not None:
        return float("nan")
    return table.predict_ms(spec.factorised)


def run(context: StageContext) -> None:
    params = context.params
    models = {("dense", 1.0): load_model(context.input("dense"))}  # keyed by (method, budget)
    for method, stage in METHOD_STAGES.items():
        budgets = getattr(params.budgets, STAGES[stage].foreach)
        for budget, path in zip(budgets, context.inputs(method), strict=True):
            models[method, budget] = load_model(path)
    shape = input_shape(models["dense", 1.0][0])
    batch, repeats = params.retrain.latency_batch, params.retrain.latency_repeats
    table = read_csv(context.input("table"))
    devices = [torch.device("cpu")] + ([context.device] if context.device.type == "cuda" else [])
    rows, metrics = [], {}
    for device in devices:
        precision = precision_of(device, params.compute.amp)
        predictor = device_table(table, context.input("table"), table_key(device, batch, precision))
        images = torch.randn((batch, *shape), device=device)
        runs = {name: (model.eval().to(device), images) for name, (model, _) in models.items()}
        timed = time_rounds(runs, repeats, dtype=precision, rounds=partial(progress, desc=f"latency {device.type}"))
        dense = float(np.median(timed["dense", 1.0]))
        for (method, budget), values in timed.items():
            q1, median, q3 = np.percentile(values, [25, 50, 75])
            predicted = predicted_ms(predictor, models[method, budget][1])
            rows.append(
                {"method": method, "budget": budget, "device": device.type, "batch": batch}
                | {"latency_ms": round(median, 4), "q1_ms": round(q1, 4), "q3_ms": round(q3, 4)}
                | {"speedup": round(dense / median, 4), "predicted_ms": round(predicted, 4)}
                | {"prediction_error": round(predicted / median - 1, 4)}
            )
        errors = pd.Series([row["prediction_error"] for row in rows if row["device"] == device.type]).abs()
        metrics[device.type] = {
            "models_ms": {
                f"{row['method']} {row['budget']}": row["latency_ms"] for row in rows if row["device"] == device.type
            },
            "prediction_median_abs_error": round(float(errors.median()), 4),
            "predicted_models": int(errors.notna().sum()),
        }
        log.info(
            "%s: dense %.3f ms per batch of %d; prediction's median |error| %.1f%% over %d models",
            device.type,
            dense,
            batch,
            100 * errors.median(),
            errors.notna().sum(),
        )
        for model, _ in models.values():
            model.to("cpu")
    write_csv(context.output("latency"), pd.DataFrame(rows))
    write_json(context.output("metrics"), metrics | {"batch": batch, "repeats": repeats, "seconds": context.seconds()})


def main(argv: list[str] | None = None) -> int:
    return stage_main("latency", __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    run_as_program(main)
