"""The ablation table: FLORA and each of its ablations (``methods.ABLATIONS``) at FLORA's budgets, and each
ablation's paired top-1 difference to FLORA, with intervals.

Every ablation is searched at FLORA's budgets, so it is compared with FLORA at the same
budget (both subnets lie in the same legal MACs band; their MACs are in the table), run by
run and paired on the same runs, fine-tuning seeds and test images (``stats.PairedBootstrap``).
A method's first row is its mean over budgets (the primary result), then one row per budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ..pipeline.methods import ABLATION_METHODS, METHODS
from .stats import PairedBootstrap, interval, simultaneous
from .tables import Compared, Evaluated, bracket, number_columns, percent, simultaneous_text, with_interval

REFERENCE = "flora"
ABLATION_COLUMNS = [
    "method",
    "budget",
    "macs",
    "top1",
    "top1_low",
    "top1_high",
    "flora_macs",
    "flora_top1",
    *number_columns("delta"),
    "search_seconds",
]


def _models(models: Sequence[Evaluated], method: str, budget: float) -> list[Evaluated]:
    return sorted((m for m in models if m.method == method and m.budget == budget), key=lambda m: m.run)


def _difference(own: Sequence[Evaluated], flora: Sequence[Evaluated], bootstrap: PairedBootstrap) -> Compared:
    """An ablation's top-1 minus FLORA's at one budget: per run on the same replicates, combined over runs."""
    if [m.run for m in own] != [m.run for m in flora]:
        raise ValueError(f"{own[0].method} and {REFERENCE} come from different runs")
    per_run = np.array(
        [bootstrap.in_run(a.correct) - bootstrap.in_run(f.correct) for a, f in zip(own, flora, strict=True)]
    )
    value = float(np.mean([a.correct.mean() - f.correct.mean() for a, f in zip(own, flora, strict=True)]))
    identical = all(np.array_equal(a.correct, f.correct) for a, f in zip(own, flora, strict=True))
    return Compared(value, bootstrap.combine(per_run), identical)


def ablation_table(
    models: Sequence[Evaluated], bootstrap: PairedBootstrap, seconds: Mapping[str, float] | None = None
) -> pd.DataFrame:
    """FLORA's and each ablation's rows (its mean over budgets, then every budget): MACs, top-1 with its 95%
    interval, FLORA's at the same budget, and the paired difference to FLORA with its 95% interval and verdict
    (unadjusted) and its simultaneous interval and verdict (over the table's means, and over its per-budget rows).
    ``seconds``: each method's search cost (its filter, supernet and searches), on its mean row."""
    budgets = sorted({m.budget for m in models if m.method == REFERENCE})
    methods = [REFERENCE, *(name for name in ABLATION_METHODS if any(m.method == name for m in models))]
    rows, differences = [], []
    for method in methods:
        top1, own_rows, own_differences = [], [], []
        for budget in budgets:
            own, flora = _models(models, method, budget), _models(models, REFERENCE, budget)
            correct = np.stack([m.correct for m in own])
            top1.append(bootstrap.top1(correct))
            low, high = interval(top1[-1])
            own_rows.append(
                {
                    "method": method,
                    "budget": budget,
                    "macs": float(np.mean([m.macs for m in own])),
                    "top1": float(correct.mean()),
                    "top1_low": max(low, 0.0),
                    "top1_high": min(high, 1.0),
                    "flora_macs": float(np.mean([m.macs for m in flora])),
                    "flora_top1": float(np.mean([m.correct.mean() for m in flora])),
                }
            )
            own_differences.append(None if method == REFERENCE else _difference(own, flora, bootstrap))
        low, high = interval(np.mean(top1, axis=0))
        mean_row = {
            "method": method,
            "budget": np.nan,
            **{key: float(np.mean([r[key] for r in own_rows])) for key in ("macs", "top1", "flora_macs", "flora_top1")},
            "top1_low": max(low, 0.0),
            "top1_high": min(high, 1.0),
            "search_seconds": (seconds or {}).get(method, np.nan),
        }
        mean = None
        if method != REFERENCE:
            mean = Compared(
                float(np.mean([d.value for d in own_differences])),
                np.mean([d.samples for d in own_differences], axis=0),
                all(d.identical for d in own_differences),
            )
        rows += [mean_row, *own_rows]
        differences += [mean, *own_differences]
    return _with_differences(rows, differences)


def _with_differences(rows: list[dict], differences: list[Compared | None]) -> pd.DataFrame:
    """The rows with their differences' columns; simultaneous intervals over the means and over the budgets."""
    for family in (True, False):  # the means over budgets, then the per-budget rows
        members = [
            i
            for i, (r, d) in enumerate(zip(rows, differences, strict=True))
            if d is not None and pd.isna(r["budget"]) == family
        ]
        ends = simultaneous(np.array([differences[i].samples for i in members])) if members else []
        for index, joint in zip(members, ends, strict=True):
            rows[index] |= differences[index].columns("delta", joint)
    return pd.DataFrame(rows, columns=ABLATION_COLUMNS)


def label(method: str) -> str:
    """A method's short name in the ablation table and figure."""
    return METHODS[method].short if method in METHODS else ABLATION_METHODS[method].short


def readable_ablations(table: pd.DataFrame, macs_divisor: float, macs_unit: str) -> pd.DataFrame:
    """The ablation table for Markdown/LaTeX: top-1 and differences in percent (points), intervals in brackets."""
    compared = table["method"] != REFERENCE
    shown = pd.DataFrame(
        {
            "method": table["method"].map(label),
            "budget": table["budget"].map(lambda b: "mean" if pd.isna(b) else f"{b:g}"),
            macs_unit: (table["macs"] / macs_divisor).map(lambda v: f"{v:.3f}"),
            "top-1 % [95% interval]": [
                f"{percent(v)} {bracket(lo, hi, False)}"
                for v, lo, hi in zip(table["top1"], table["top1_low"], table["top1_high"], strict=True)
            ],
            "Δ top-1 vs FLORA [95% interval]": np.where(compared, with_interval(table, "delta"), "—"),
            "verdict (unadjusted)": np.where(compared, table["delta_verdict"], "—"),
            "simultaneous interval: verdict": np.where(compared, simultaneous_text(table, "delta"), "—"),
            "search cost (s)": table["search_seconds"].map(lambda v: "" if pd.isna(v) else f"{v:.1f}"),
        }
    )
    return shown.assign(protocol=table["protocol"])[["protocol", *shown.columns]] if "protocol" in table else shown
