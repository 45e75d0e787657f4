"""The report's tables as pandas DataFrames, built from the stages' metrics; and their text forms.

Every table is written three ways (`write_table`): CSV with raw numbers, and
Markdown and LaTeX with readable ones (MACs in G/M units, top-1 in percent).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from .tradeoff import macs_for_accuracy

RESULT_COLUMNS = ["method", "budget", "macs", "params", "top1", "top5", "macs_reduction", "delta_top1"]


def results_table(dense: Mapping, methods: Mapping[str, Mapping[float, Mapping]]) -> pd.DataFrame:
    """Dense, then each method's models by budget: MACs, params, top-1/top-5, MACs reduction, top-1 delta."""
    rows = [
        {
            "method": "dense",
            "budget": 1.0,
            "macs": dense["macs"],
            "params": dense["params"],
            "top1": dense["top1"],
            "top5": dense["top5"],
        }
    ]
    for method, by_budget in methods.items():
        for budget in sorted(by_budget):
            metrics = by_budget[budget]
            rows.append(
                {
                    "method": method,
                    "budget": budget,
                    "macs": metrics["macs"],
                    "params": metrics["params"],
                    "top1": metrics["top1"],
                    "top5": metrics["top5"],
                }
            )
    table = pd.DataFrame(rows)
    table["macs_reduction"] = 1 - table["macs"] / dense["macs"]
    table["delta_top1"] = table["top1"] - dense["top1"]
    return table[RESULT_COLUMNS]


def extra_reduction_table(results: pd.DataFrame) -> pd.DataFrame:
    """Per FLORA budget: the MACs uniform needs for FLORA's top-1 (on its curve closed by dense) and the saving."""
    curve = results[results["method"].isin(["uniform", "dense"])]
    rows = []
    for _, row in results[results["method"] == "flora"].iterrows():
        uniform_macs = macs_for_accuracy(curve["macs"], curve["top1"], row["top1"])
        rows.append(
            {
                "budget": row["budget"],
                "macs": row["macs"],
                "top1": row["top1"],
                "uniform_macs": np.nan if uniform_macs is None else uniform_macs,
                "extra_reduction": np.nan if uniform_macs is None else 1 - row["macs"] / uniform_macs,
            }
        )
    return pd.DataFrame(rows, columns=["budget", "macs", "top1", "uniform_macs", "extra_reduction"])


def ranks_table(layers: pd.DataFrame, configs: Mapping[float, Mapping[str, int]]) -> pd.DataFrame:
    """Rank of every target layer (rows) in every searched subnet (columns); a dense layer shows its full rank."""
    table = pd.DataFrame({"layer": layers["layer"], "full_rank": layers["full_rank"]})
    for budget in sorted(configs):
        table[str(budget)] = [
            configs[budget].get(layer, full) for layer, full in zip(layers["layer"], layers["full_rank"], strict=True)
        ]
    return table


def costs_table(seconds: Sequence[tuple[str, float]]) -> pd.DataFrame:
    """Wall time of each stage run, from the stages' own timers, with the total."""
    table = pd.DataFrame(seconds, columns=["stage", "seconds"])
    return pd.concat([table, pd.DataFrame([{"stage": "total", "seconds": table["seconds"].sum()}])], ignore_index=True)


def readable(table: pd.DataFrame, macs_divisor: float, macs_unit: str) -> pd.DataFrame:
    """A copy for Markdown/LaTeX: MACs in ``macs_unit``, fractions as percentages, params in millions."""
    shown = table.copy()
    missing = {"uniform_macs": "out of range", "extra_reduction": "out of range"}  # never extrapolated
    for column in [c for c in shown.columns if c in ("macs", "uniform_macs")]:
        blank = missing.get(column, "—")
        shown[column] = (shown[column] / macs_divisor).map(lambda v, b=blank: b if pd.isna(v) else f"{v:.3f}")
        shown = shown.rename(columns={column: f"{column} ({macs_unit})"})
    for column in [c for c in shown.columns if c in ("top1", "top5", "macs_reduction", "extra_reduction")]:
        blank = missing.get(column, "—")
        shown[column] = shown[column].map(lambda v, b=blank: b if pd.isna(v) else f"{100 * v:.2f}%")
    if "delta_top1" in shown:
        shown["delta_top1"] = shown["delta_top1"].map(lambda v: f"{100 * v:+.2f}")
    if "params" in shown:
        shown["params"] = (shown["params"] / 1e6).map(lambda v: f"{v:.3f} M")
    if "seconds" in shown:
        shown["seconds"] = shown["seconds"].map(lambda v: f"{v:.1f}")
    return shown


def markdown(table: pd.DataFrame) -> str:
    return table.to_markdown(index=False, disable_numparse=True) + "\n"


def latex(table: pd.DataFrame) -> str:
    escaped = table.rename(columns=lambda c: str(c).replace("_", r"\_").replace("%", r"\%"))
    escaped = escaped.map(lambda v: v.replace("_", r"\_").replace("%", r"\%") if isinstance(v, str) else v)
    return escaped.to_latex(index=False)
