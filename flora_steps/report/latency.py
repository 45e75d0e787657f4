"""Accuracy against measured latency: every model's timing beside its top-1, and comparisons at equal latency.

The latency stage times the first run's models (the first seed's weights; a structure
runs equally fast whatever its weights). ``latency_table`` joins those timings with the
report's results; ``on_latency_axis`` hands the comparison machinery
(``tables.comparison_table``) the first run's models with their measured latency in
microseconds (a whole number, as MACs are) where it reads a model's MACs, so that a method is compared with a baseline's curve of
top-1 against measured latency: the top-1 difference at equal latency and the extra
latency reduction at equal top-1, with the same intervals and verdicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pandas as pd
from matplotlib.figure import Figure

from ..pipeline.methods import METHODS
from .tables import Evaluated, bracket, percent

#: The latency table's columns: a model, its size and timing on one device, and its fine-tuned top-1.
LATENCY_COLUMNS = [
    *("method", "budget", "device", "macs", "latency_ms", "q1_ms", "q3_ms", "speedup"),
    *("predicted_ms", "prediction_error", "top1", "top1_low", "top1_high"),
]


def timings_on(timings: pd.DataFrame, device: str) -> pd.DataFrame:
    """The latency stage's rows of one device."""
    return timings[timings["device"] == device].reset_index(drop=True)


def latency_table(results: pd.DataFrame, timings: pd.DataFrame) -> pd.DataFrame:
    """Every timed model (one device's rows of the latency stage) with its MACs and fine-tuned top-1 and interval
    (``results``: the report's results table of the fine-tuned protocol), in the results' order."""
    joined = results[["method", "budget", "macs", "top1", "top1_low", "top1_high"]].merge(
        timings.drop(columns=["batch"]), on=["method", "budget"], how="inner", validate="one_to_one"
    )
    return joined[LATENCY_COLUMNS]


def on_latency_axis(models: Sequence[Evaluated], timings: pd.DataFrame) -> list[Evaluated]:
    """The first run's timed models, each carrying its measured microseconds where the comparison reads its MACs."""
    microseconds = {(row.method, row.budget): 1000 * row.latency_ms for row in timings.itertuples()}
    return [
        replace(model, metrics={**model.metrics, "macs": microseconds[model.method, model.budget]})
        for model in models
        if model.run == 0 and (model.method, model.budget) in microseconds
    ]


def readable_latency(table: pd.DataFrame) -> pd.DataFrame:
    """The latency table for Markdown/LaTeX."""
    return pd.DataFrame(
        {
            "method": table["method"],
            "budget": table["budget"].map(lambda b: f"{b:g}"),
            "device": table["device"],
            "MMACs": (table["macs"] / 1e6).map(lambda v: f"{v:.3f}"),
            "ms per batch [quartiles]": [
                f"{median:.3f} [{low:.3f}, {high:.3f}]"
                for median, low, high in zip(table["latency_ms"], table["q1_ms"], table["q3_ms"], strict=True)
            ],
            "speedup": table["speedup"].map(lambda v: f"{v:.2f}x"),
            "predicted ms (error)": [
                "—" if pd.isna(ms) else f"{ms:.3f} ({error:+.1%})"
                for ms, error in zip(table["predicted_ms"], table["prediction_error"], strict=True)
            ],
            "top-1 % [95% interval]": [
                f"{percent(value)} {bracket(low, high, signed=False)}"
                for value, low, high in zip(table["top1"], table["top1_low"], table["top1_high"], strict=True)
            ],
        }
    )


def plot_latency(table: pd.DataFrame) -> Figure:
    """Test top-1 against MACs and against measured latency, every method, with 95% intervals (and quartiles of the
    latency)."""
    figure = Figure(figsize=(10, 4.2), layout="constrained")
    by_macs, by_latency = figure.subplots(1, 2, sharey=True)
    for method, rows in table.groupby("method", sort=False):
        style = {"linestyle": "none", **METHODS[method].style, "label": METHODS[method].label}
        errors = [100 * (rows["top1"] - rows["top1_low"]), 100 * (rows["top1_high"] - rows["top1"])]
        by_macs.errorbar(rows["macs"] / 1e6, 100 * rows["top1"], yerr=errors, **style)
        spread = [rows["latency_ms"] - rows["q1_ms"], rows["q3_ms"] - rows["latency_ms"]]
        by_latency.errorbar(rows["latency_ms"], 100 * rows["top1"], xerr=spread, yerr=errors, **style)
    by_macs.set_xlabel("MMACs per image")
    by_latency.set_xlabel(f"measured ms per batch ({table['device'].iloc[0]}, median and quartiles)")
    by_macs.set_ylabel("fine-tuned test top-1 (%)")
    for axis in (by_macs, by_latency):
        axis.grid(alpha=0.3)
    handles, labels = by_macs.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=7, frameon=False)
    return figure
