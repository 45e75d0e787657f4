"""Figures of the report: each function takes plain tables and returns a matplotlib Figure.

The figures the decompose and filter stages draw themselves are in ``layer_figures``
(which imports nothing of the report's comparisons, so editing those reruns only the
report). Saving (deterministic, no timestamps) is `flora_steps.runtime.artifacts.save_figure`.
"""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..pipeline.methods import METHODS
from .tradeoff import WIDE_SEGMENT


def macs_unit(macs: float) -> tuple[float, str]:
    """Divisor and unit name that make ``macs`` a readable number (GMACs for real models, MMACs for small)."""
    return (1e9, "GMACs") if macs >= 1e8 else (1e6, "MMACs")


def _signed(value: float, reduction: bool = False) -> str:
    """A signed number with one decimal; an infinite interval end as ±∞, a reduction's upper one as < 100."""
    if np.isinf(value):
        return "−∞" if value < 0 else "< 100" if reduction else "+∞"
    return f"{value:+.1f}"


def _verdicts(comparison: pd.DataFrame, method: str, baseline: str, number: str) -> list[str]:
    """One line per budget of ``method`` against ``baseline``: ``number`` (delta_top1 in points, or
    extra_reduction in percent) with its interval and verdict, and where the baseline's curve was
    interpolated across a segment wider than ``WIDE_SEGMENT`` in MACs, how wide."""
    prefix = {"delta_top1": "delta", "extra_reduction": "extra"}[number]
    lines = []
    for _, row in comparison[(comparison["method"] == method) & (comparison["baseline"] == baseline)].iterrows():
        if row[f"{prefix}_verdict"] == "out of range" and number == "extra_reduction" and pd.notna(row["extra_bound"]):
            verdict = f"below {100 * row['extra_bound']:+.1f} ({baseline}'s cheapest model is more accurate)"
        elif row[f"{prefix}_verdict"] == "out of range":
            verdict = f"out of {baseline}'s range"
        else:
            reduction = number == "extra_reduction"
            low, high, value = (
                _signed(100 * row[key], reduction) for key in (f"{prefix}_low", f"{prefix}_high", number)
            )
            verdict = f"{value} [{low}, {high}], {row[f'{prefix}_verdict']}"
            if row[f"{prefix}_span"] > WIDE_SEGMENT:
                verdict += f"; {baseline} interpolated across {row[f'{prefix}_span']:.3g}× MACs"
        lines.append(f"budget {row['budget']:g}: {verdict}")
    return lines


#: The figure's words for each headline number (``methods.Headline``).
HEADLINES = {"delta_top1": "top-1 at equal MACs (points)", "extra_reduction": "fewer MACs at equal top-1 (%)"}


def plot_tradeoff(results: pd.DataFrame, comparison: pd.DataFrame) -> Figure:
    """Test top-1 against MACs with 95% error bars: every method side by side, the dense model as a line.

    ``results`` has columns method, macs, top1, top1_low, top1_high; ``comparison``
    has, per method, budget and baseline, ``delta_top1`` and ``extra_reduction`` with
    their intervals and verdicts. The dense model is the dotted line (its interval
    shaded), so that the axis spans the compressed models. Beside the axes, under the
    legend, a box lists each compared method's headline against its first baseline
    (``methods.Method.headline``: the top-1 difference at equal MACs, or the extra MACs
    reduction at equal top-1), each with its interval.
    """
    divisor, unit = macs_unit(results["macs"].max())
    figure = Figure(figsize=(10, 4.8), layout="tight")
    axis, side = figure.subplots(1, 2, width_ratios=[2.7, 1.3])
    side.axis("off")
    dense = results[results["method"] == "dense"]
    if len(dense):
        row = dense.iloc[0]
        axis.axhline(100 * row["top1"], color="black", linewidth=0.8, linestyle=":")
        axis.axhspan(100 * row["top1_low"], 100 * row["top1_high"], color="black", alpha=0.06, linewidth=0)
        axis.plot([], [], color="black", linestyle=":", label=f"dense ({row['macs'] / divisor:.3g} {unit})")
    for method in METHODS.values():
        rows = results[results["method"] == method.name].sort_values("macs")
        if not method.retrained or rows.empty:
            continue
        top1 = 100 * rows["top1"]
        axis.errorbar(
            rows["macs"] / divisor,
            top1,
            yerr=[top1 - 100 * rows["top1_low"], 100 * rows["top1_high"] - top1],
            linestyle="none" if method.points else "-",
            capsize=2,
            label=method.label,
            **method.style,
        )
    sections = [
        (
            f"{method.short} vs {METHODS[method.baselines[0]].short},\n{HEADLINES[method.headline]} (unadjusted)",
            _verdicts(comparison, method.name, method.baselines[0], method.headline),
        )
        for method in METHODS.values()
        if method.baselines
    ]
    text = "\n\n".join(f"{title}\n" + "\n".join(lines) for title, lines in sections if lines)
    if text:
        side.text(
            0.02,
            0.0,
            text,
            transform=side.transAxes,
            fontsize=7,
            va="bottom",
            bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.7"},
        )
    axis.set_xlabel(unit)
    axis.set_ylabel("test top-1 (%): mean over seeds, 95% interval")
    axis.set_title("Accuracy vs MACs: every method")
    axis.grid(alpha=0.3)
    side.legend(*axis.get_legend_handles_labels(), fontsize=7, loc="upper left", frameon=False)
    return figure


def plot_search(histories: Mapping[str, pd.DataFrame]) -> Figure:
    """Best and top-k mean val top-1 per generation, one line pair per budget."""
    figure = Figure(figsize=(6, 3.8), layout="tight")
    axis = figure.subplots()
    colours = matplotlib.colormaps["viridis"]
    for index, (budget, history) in enumerate(histories.items()):
        colour = colours(index / max(len(histories) - 1, 1))
        axis.plot(history["generation"], 100 * history["best_top1"], color=colour, label=f"budget {budget}: best")
        axis.plot(
            history["generation"],
            100 * history["top_k_mean_top1"],
            color=colour,
            linestyle="--",
            label=f"budget {budget}: top-k mean",
        )
    axis.set_xlabel("generation")
    axis.set_ylabel("val top-1 (%), supernet weights")
    axis.set_title("Evolutionary search convergence")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    return figure


def plot_ranks(ranks: pd.DataFrame) -> Figure:
    """Heatmap of rank / full rank: target layers (rows) by searched subnet (columns)."""
    figure = Figure(figsize=(2 + 1.1 * ranks.shape[1], 1.2 + 0.28 * ranks.shape[0]), layout="tight")
    axis = figure.subplots()
    image = axis.imshow(
        ranks.to_numpy(dtype=float), aspect="auto", cmap=matplotlib.colormaps["viridis"], vmin=0, vmax=1
    )
    axis.set_xticks(range(ranks.shape[1]), ranks.columns)
    axis.set_yticks(range(ranks.shape[0]), ranks.index, fontsize=7)
    axis.set_xlabel("budget (fraction of dense MACs)")
    axis.set_title("Per-layer ranks of the searched subnets")
    figure.colorbar(image, ax=axis, label="rank / full rank (1 = dense)")
    return figure


def plot_sampling(macs: Mapping[str, np.ndarray], dense_macs: int) -> Figure:
    """Histograms of the MACs of sampled subnets, one per sampling rule."""
    figure = Figure(figsize=(6, 3.6), layout="tight")
    axis = figure.subplots()
    bins = np.linspace(0, 1, 41)
    for rule, values in macs.items():
        axis.hist(values / dense_macs, bins=bins, alpha=0.55, label=f"{rule} sampling")
    axis.set_xlabel("subnet MACs / dense MACs")
    axis.set_ylabel("sampled subnets")
    axis.set_title("Supernet sampling distribution over the filtered space")
    axis.legend(fontsize=8)
    return figure
