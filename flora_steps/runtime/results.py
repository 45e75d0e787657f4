"""The report stages' reading and writing: the retrained models' predictions as the report's models, and tables.

The ``report`` and ``ablations`` stages read every retrain's predictions into
``tables.Evaluated`` models (``correct[seed, test image]``), under both protocols, and
write each table as CSV (raw numbers), Markdown and LaTeX (readable).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import UserError
from ..pipeline.catalogue import EVALUATIONS
from ..report.stats import CONFIDENCE
from ..report.tables import NUMBERS, Evaluated, latex, markdown
from .artifacts import read_csv, read_json, write_csv, write_text
from .context import StageContext

REPLICATES = 2000  # bootstrap replicates of every interval
OMITTED_RUNS = (
    "run-to-run variance: the supernet, the searches and the pruning ran once, so these intervals cover "
    "fine-tuning seeds and test images only"
)


def interval_description(runs: int) -> str:
    """How every interval of a report is computed, in words (its ``summary.json``)."""
    over = "runs" if runs > 1 else "fine-tuning seeds"
    return (
        f"{round(100 * CONFIDENCE)}% percentile interval of a paired bootstrap over {over} (t-corrected) and test "
        f"images ({REPLICATES} replicates)"
    )


def write_table(
    context: StageContext, name: str, table: pd.DataFrame, shown: pd.DataFrame, note: str | None = None
) -> None:
    """``<name>.csv`` (raw numbers), ``<name>.md`` and ``<name>.tex`` (readable, ``note`` in their first line)."""
    write_csv(context.output(f"{name}_csv"), table)
    write_text(context.output(f"{name}_md"), (f"{note}\n\n" if note else "") + markdown(shown))
    write_text(context.output(f"{name}_tex"), (f"% {note}\n" if note else "") + latex(shown))


def correct_matrix(path: Path, labels: np.ndarray | None) -> tuple[np.ndarray, list[int], np.ndarray]:
    """``correct[seed, image]`` from a predictions file, its seeds (none for the dense model) and the labels.

    ``labels`` (the dense model's) must match: every model is evaluated on the same test images.
    """
    table = read_csv(path)
    if "seed" not in table:
        table = table.assign(seed=-1)
    seeds = list(dict.fromkeys(table["seed"]))
    rows = [table[table["seed"] == seed].sort_values("image") for seed in seeds]
    own_labels = rows[0]["label"].to_numpy() if rows else np.array([], dtype=int)
    if labels is not None and (
        any(len(r) != len(labels) or not np.array_equal(r["label"].to_numpy(), labels) for r in rows)
    ):
        raise UserError(f"{path}: predictions on other test images than the base model's (rerun the pipeline)")
    correct = np.stack([(r["prediction"] == r["label"]).to_numpy(dtype=float) for r in rows])
    return correct, [int(s) for s in seeds if s >= 0], own_labels


def inherited(model: Evaluated, path: Path, labels: np.ndarray) -> Evaluated:
    """``model`` as its fine-tuning started (the inherited protocol): its predictions then, evaluated once, and only
    the training it inherited."""
    correct, _, _ = correct_matrix(path, labels)
    metrics, training = model.metrics, model.metrics.get("training", {})
    own = {"inherited_steps": training.get("inherited_steps"), "inherited_images": training.get("inherited_images")}
    return Evaluated(
        model.method,
        model.budget,
        {
            **metrics,
            "top1": metrics["top1_before_finetune"],
            "top5": metrics["top5_before_finetune"],
            "seeds": [],
            "training": own | {"total_steps": own["inherited_steps"], "total_images": own["inherited_images"]},
        },
        correct,
        model.run,
    )


class SharedSeeds:
    """The fine-tuning seeds every model of a report must share (paired comparisons need the same seeds)."""

    def __init__(self) -> None:
        self.seeds: list[int] | None = None

    def check(self, seeds: list[int], path: Path) -> None:
        if self.seeds is None:
            self.seeds = seeds
        elif seeds != self.seeds:
            raise UserError(f"{path}: seeds {seeds}, but other models have {self.seeds} (rerun)")


def method_models(
    context: StageContext, method: str, budgets: list[float], labels: np.ndarray, seeds: SharedSeeds
) -> tuple[list[Evaluated], list[Evaluated]]:
    """A method's model at each of its ``budgets`` in every run of the pipeline, fine-tuned and as fine-tuning
    started, from its inputs ``<method>``, ``<method>_predictions`` and ``<method>_inherited_predictions``
    (``catalogue.EVALUATIONS``)."""
    fine_tuned, started = [], []
    runs = zip(
        *(context.inputs_by_run(f"{method}{suffix}") for suffix in EVALUATIONS),
        strict=True,
    )
    for run, (metrics, predictions, before) in enumerate(runs):
        for budget, path, predicted, start in zip(budgets, metrics, predictions, before, strict=True):
            correct, own, _ = correct_matrix(predicted, labels)
            seeds.check(own, predicted)
            model = Evaluated(method, budget, read_json(path, "metrics"), correct, run)
            fine_tuned.append(model)
            started.append(inherited(model, start, labels))
    return fine_tuned, started


def clean(value: float) -> float | None:
    return None if pd.isna(value) else float(value)


def _end(value: float, prefix: str) -> float | str:
    """An interval end for JSON: a number; ``"unbounded"``; an extra reduction's unbounded upper end ``"< 1"``."""
    if math.isfinite(value):
        return float(value)
    return "< 1" if prefix == "extra" and value > 0 else "unbounded"


def compared_number(row: pd.Series, prefix: str) -> dict:
    """One compared number of a table row for JSON: value (``None`` out of range), interval and verdict
    (unadjusted), simultaneous interval and verdict (``interval`` ``None`` out of range)."""
    value = clean(row[NUMBERS[prefix]])
    ends = (None, None) if value is None else (row[f"{prefix}_low"], row[f"{prefix}_high"])
    joint = (None, None) if value is None else (row[f"{prefix}_sim_low"], row[f"{prefix}_sim_high"])
    return {
        "value": value,
        "interval": None if value is None else [_end(end, prefix) for end in ends],
        "verdict": row[f"{prefix}_verdict"],
        "simultaneous_interval": None if value is None else [_end(end, prefix) for end in joint],
        "simultaneous_verdict": row[f"{prefix}_sim_verdict"],
    }
