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
from matplotlib.lines import Line2D
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

from ..pipeline.methods import METHODS, comparisons
from .tradeoff import envelope, pareto_front, top1_at_macs


def macs_unit(macs: float) -> tuple[float, str]:
    """Divisor and unit name that make ``macs`` a readable number (GMACs for real models, MMACs for small)."""
    return (1e9, "GMACs") if macs >= 1e8 else (1e6, "MMACs")


#: Off-scale points are drawn at the panel's edge with this marker (below, above).
OFF_SCALE = ("v", "^")


#: On the log MACs axis, points of two series closer than this factor are moved this far apart.
DODGE = 1.04


def _dodged(own: np.ndarray, others: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x positions of two series on a log axis, with points that share a MACs value (within ``DODGE``) moved
    apart: ``own`` to the right, ``others`` to the left."""
    own, others = own.astype(float).copy(), others.astype(float).copy()
    for i, x in enumerate(own):
        close = np.abs(np.log(others / x)) < np.log(DODGE)
        if close.any():
            own[i] *= np.sqrt(DODGE)
            others[close] /= np.sqrt(DODGE)
    return own, others


def _fitted_range(values: list[float], pad: float = 0.08) -> tuple[float, float]:
    """A y-range over ``values`` (finite ones), padded by ``pad`` of its span (at least a point)."""
    finite = [v for v in values if np.isfinite(v)]
    low, high = min(finite), max(finite)
    margin = max(pad * (high - low), 0.5)
    return low - margin, high + margin


def _points(axis, x: np.ndarray, rows: pd.DataFrame, limits: tuple[float, float], style: dict, **kwargs) -> None:
    """Error-bar points in percent; a point off the y-range is drawn at the edge (a triangle) with its value."""
    top1, low, high = (100 * rows[column].to_numpy() for column in ("top1", "top1_low", "top1_high"))
    inside = (top1 >= limits[0]) & (top1 <= limits[1])
    axis.errorbar(
        x[inside],
        top1[inside],
        yerr=[top1[inside] - low[inside], high[inside] - top1[inside]],
        capsize=2,
        linestyle="none",
        **style,
        **kwargs,
    )
    for xi, value in zip(x[~inside], top1[~inside], strict=True):
        below = value < limits[0]
        edge, marker = (limits[0], OFF_SCALE[0]) if below else (limits[1], OFF_SCALE[1])
        axis.plot([xi], [edge], marker=marker, color=style.get("color"), linestyle="none", clip_on=False)
        axis.annotate(
            f"{value:.1f}",
            (xi, edge),
            textcoords="offset points",
            xytext=(3, 3 if below else -9),
            fontsize=6,
            color=style.get("color"),
        )


def plot_comparison(axis, results: pd.DataFrame, method: str, baseline: str, divisor: float) -> None:
    """One comparison of one protocol: the baseline's points and its curve as the analysis reads it (the Pareto
    front, closed by the dense model, flat beyond its last point; dominated points hollow), the method's points,
    each with its 95% interval, on a log MACs axis, in a y-range that fits the method, the dense model and the baseline's points from
    the front point at or below the method's cheapest to the one at or above its largest; the others off it are
    drawn at its edge."""
    dense = results[results["method"] == "dense"]
    own = results[results["method"] == method].sort_values("macs")
    curve = pd.concat([results[results["method"] == baseline].sort_values("macs"), dense], ignore_index=True)
    macs, top1 = curve["macs"].astype(float).to_numpy(), curve["top1"].astype(float).to_numpy()
    xs, ys = envelope(macs, top1)
    front = set(pareto_front(macs, top1))
    read = [top1_at_macs(macs, top1, m) for m in own["macs"]]
    below, above = xs[xs <= own["macs"].min()], xs[xs >= own["macs"].max()]
    window = curve["macs"].between(below.max() if len(below) else xs[0], above.min() if len(above) else xs[-1])
    limits = _fitted_range(
        [
            *(100 * pd.concat([own, curve[window]])[["top1_low", "top1_high"]].to_numpy().ravel()),
            *(100 * v for v in read if v is not None),
            100 * float(dense["top1"].iloc[0]),
        ]
    )
    style, base_style = METHODS[method].style, METHODS[baseline].style
    axis.plot(xs / divisor, 100 * ys, color=base_style["color"], linewidth=1, zorder=1)
    own_x, base_x = _dodged(own["macs"].to_numpy() / divisor, curve["macs"].to_numpy() / divisor)
    dominated = np.array([i not in front for i in range(len(curve))])
    is_dense = (curve["method"] == "dense").to_numpy()
    for mask, fill in ((~dominated & ~is_dense, {}), (dominated & ~is_dense, {"markerfacecolor": "white"})):
        if mask.any():
            _points(axis, base_x[mask], curve[mask], limits, base_style, **fill)
    _points(axis, base_x[is_dense], curve[is_dense], limits, METHODS["dense"].style)
    _points(axis, own_x, own, limits, style)
    axis.set_ylim(*limits)
    axis.set_xscale("log")  # the compressed models spread out; the segment to dense stays drawn
    axis.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.xaxis.set_major_formatter(ScalarFormatter())
    axis.xaxis.set_minor_formatter(NullFormatter())
    axis.set_title(f"{METHODS[method].short} vs {METHODS[baseline].short}", fontsize=9)
    axis.grid(alpha=0.3)


def plot_differences(axis, comparison: pd.DataFrame, means: pd.DataFrame) -> None:
    """The paired top-1 differences at equal MACs of one protocol: per comparison its mean over budgets first (the
    primary result), then each budget; thick: 95% interval, thin: simultaneous over the rows of its kind."""
    rows = []
    for _, mean in means.iterrows():
        colour = METHODS[mean["method"]].style["color"]
        label = f"{METHODS[mean['method']].short} − {METHODS[mean['baseline']].short}: mean"
        rows.append((label, mean, True, colour))
        own = comparison[(comparison["method"] == mean["method"]) & (comparison["baseline"] == mean["baseline"])]
        rows += [(f"budget {row['budget']:g}", row, False, colour) for _, row in own.iterrows()]
    difference_panel(axis, rows, "Δ top-1 at equal MACs (points)")


def difference_panel(axis, rows: list[tuple[str, pd.Series, bool, str]], xlabel: str) -> None:
    """Paired differences, one per line (label, table row with the ``delta`` columns, primary, colour), top to
    bottom: the value (a diamond for a primary one, in bold), its 95% interval (thick) and its simultaneous
    interval (thin); a row without a value shows its verdict."""
    finite = [
        100 * v for _, row, _, _ in rows for v in (row["delta_sim_low"], row["delta_sim_high"], row["delta_top1"])
    ]
    low, high = _fitted_range([*finite, 0.0])
    for y, (_, row, primary, colour) in enumerate(rows):
        if pd.isna(row["delta_top1"]):
            axis.text(0, y, row["delta_verdict"], fontsize=6, va="center", ha="center")
            continue
        sim = np.clip(100 * np.array([row["delta_sim_low"], row["delta_sim_high"]], dtype=float), low, high)
        marginal = np.clip(100 * np.array([row["delta_low"], row["delta_high"]], dtype=float), low, high)
        axis.plot(sim, [y, y], color=colour, linewidth=0.8)
        axis.plot(marginal, [y, y], color=colour, linewidth=3 if primary else 2, solid_capstyle="butt")
        axis.plot(
            [100 * row["delta_top1"]],
            [y],
            marker="D" if primary else "o",
            color=colour,
            markerfacecolor=colour if primary else "white",
            markersize=5,
        )
    axis.axvline(0, color="black", linewidth=0.8)
    axis.set_yticks(range(len(rows)), [label for label, _, _, _ in rows], fontsize=6)
    for tick, (_, _, primary, _) in zip(axis.get_yticklabels(), rows, strict=True):
        tick.set_fontweight("bold" if primary else "normal")
    axis.set_ylim(len(rows) - 0.5, -0.5)
    axis.set_xlim(low, high)
    axis.set_xlabel(xlabel, fontsize=8)
    axis.set_title("paired differences: 95% (thick), simultaneous (thin)", fontsize=8)
    axis.grid(alpha=0.3, axis="x")


def plot_tradeoff(results: pd.DataFrame, comparison: pd.DataFrame, means: pd.DataFrame) -> Figure:
    """The headline figure: per protocol (a row), one panel per comparison (test top-1 against MACs, with 95%
    intervals and the baseline's curve as interpolated) and a panel of the paired differences.

    ``results``, ``comparison`` and ``means`` are the report's tables (``tables.results_table``,
    ``comparison_table``), with a ``protocol`` column.
    """
    divisor, unit = macs_unit(results["macs"].max())
    protocols = list(dict.fromkeys(results["protocol"]))
    pairs = [(m, b) for m, b in comparisons() if (results["method"] == m).any()]
    figure = Figure(figsize=(2.9 * len(pairs) + 4.2, 3.3 * len(protocols) + 0.6), layout="constrained")
    grid = figure.subplots(len(protocols), len(pairs) + 1, squeeze=False, width_ratios=[1] * len(pairs) + [1.45])
    for row, protocol in enumerate(protocols):
        shown = results[results["protocol"] == protocol]
        for column, (method, baseline) in enumerate(pairs):
            plot_comparison(grid[row, column], shown, method, baseline, divisor)
            grid[row, column].set_xlabel(unit, fontsize=8)
        plot_differences(
            grid[row, -1], comparison[comparison["protocol"] == protocol], means[means["protocol"] == protocol]
        )
        grid[row, 0].set_ylabel(f"{protocol}\ntest top-1 (%)", fontsize=9)
    handles = [
        Line2D([], [], linestyle="none", **METHODS[name].style, label=METHODS[name].label)
        for name in dict.fromkeys(name for pair in pairs for name in pair)
    ]
    handles += [
        Line2D([], [], color="gray", linewidth=1, label="baseline as interpolated (Pareto front, closed by dense)"),
        Line2D([], [], linestyle="none", marker="o", color="gray", markerfacecolor="white", label="dominated"),
        Line2D([], [], linestyle="none", marker=OFF_SCALE[0], color="gray", label="off scale (its top-1 beside)"),
    ]
    figure.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=7, frameon=False)
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


def plot_ablations(table: pd.DataFrame, styles: Mapping[str, Mapping], labels: Mapping[str, str]) -> Figure:
    """The ablation figure: per protocol (a row), each method's test top-1 at each of FLORA's budgets with its 95%
    interval (FLORA first, its line drawn), and a panel of each ablation's paired difference to FLORA, its mean
    over budgets first. ``table`` is ``ablations.ablation_table``'s, with a ``protocol`` column; ``styles`` and
    ``labels`` give each method's marker style and name."""
    protocols = list(dict.fromkeys(table["protocol"]))
    methods = list(dict.fromkeys(table["method"]))
    budgets = sorted(table["budget"].dropna().unique())
    figure = Figure(figsize=(10, 3.4 * len(protocols) + 0.7), layout="constrained")
    grid = figure.subplots(len(protocols), 2, squeeze=False, width_ratios=[1, 1.2])
    for row, protocol in enumerate(protocols):
        shown = table[(table["protocol"] == protocol) & table["budget"].notna()]
        axis = grid[row, 0]
        for index, method in enumerate(methods):
            own = shown[shown["method"] == method].sort_values("budget")
            x = np.array([budgets.index(b) for b in own["budget"]]) + 0.1 * (index - (len(methods) - 1) / 2)
            top1, low, high = (100 * own[column].to_numpy() for column in ("top1", "top1_low", "top1_high"))
            style = {"linestyle": "-" if index == 0 else "none", "color": styles[method]["color"]}
            axis.errorbar(x, top1, yerr=[top1 - low, high - top1], capsize=2, marker=styles[method]["marker"], **style)
        axis.set_xticks(range(len(budgets)), [f"{b:g}" for b in budgets])
        axis.set_xlabel("budget (fraction of dense MACs)", fontsize=8)
        axis.set_ylabel(f"{protocol}\ntest top-1 (%)", fontsize=9)
        axis.grid(alpha=0.3)
        rows = []
        for method in methods[1:]:
            own = table[(table["protocol"] == protocol) & (table["method"] == method)]
            colour = styles[method]["color"]
            for _, entry in own.iterrows():
                primary = pd.isna(entry["budget"])
                text = f"{labels[method]} − FLORA: mean" if primary else f"budget {entry['budget']:g}"
                rows.append((text, entry, primary, colour))
        difference_panel(grid[row, 1], rows, "Δ top-1 vs FLORA at the same budget (points)")
    handles = [
        Line2D([], [], color=styles[m]["color"], marker=styles[m]["marker"], linestyle="none", label=labels[m])
        for m in methods
    ]
    figure.legend(handles=handles, loc="outside lower center", ncol=len(methods), fontsize=7, frameon=False)
    return figure
