"""Figures of single layers that the decompose and filter stages draw: singular-value spectra and
per-layer sensitivity. Each function takes plain tables and returns a matplotlib Figure.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..core.space import SearchSpace


def plot_spectra(table: pd.DataFrame, patterns: list[str]) -> Figure:
    """Normalised spectra (σ_i / σ_1 against i / full rank), one panel per target pattern."""
    figure = Figure(figsize=(4 * len(patterns), 3.4), layout="tight")
    axes = figure.subplots(1, len(patterns), squeeze=False, sharey=True)
    layer_order = list(dict.fromkeys(table["layer"]))
    colours = matplotlib.colormaps["viridis"]
    for axis, pattern in zip(axes[0], patterns, strict=True):
        layers = [name for name in layer_order if fnmatchcase(name, pattern)]
        for depth, name in enumerate(layers):
            rows = table[table["layer"] == name]
            axis.plot(
                rows["index"] / len(rows),
                rows["relative"],
                color=colours(depth / max(len(layers) - 1, 1)),
                linewidth=1,
                label=name if depth in (0, len(layers) - 1) else None,
            )
        axis.set_title(pattern)
        axis.set_yscale("log")
        axis.set_xlabel("component / full rank")
        axis.grid(alpha=0.3)
        if layers:
            axis.legend(fontsize=6, title="first / last", title_fontsize=6)
    axes[0][0].set_ylabel("σᵢ / σ₁")
    figure.suptitle("Singular-value spectra of the target layers")
    return figure


def single_layer_kl(table: pd.DataFrame, space: SearchSpace) -> pd.DataFrame:
    """KL of the scored tuples that factorise exactly one layer (the rest of the block dense)."""
    records = []
    for block in space.blocks:
        roles = [block.role(layer) for layer in block.layers]
        for _, row in table[table["block"] == block.name].iterrows():
            reduced = [i for i, role in enumerate(roles) if row[role] < block.full_ranks[i]]
            if len(reduced) == 1:
                i = reduced[0]
                records.append((block.layers[i], round(row[roles[i]] / block.full_ranks[i], 4), row["kl"]))
    return pd.DataFrame(records, columns=["layer", "ratio", "kl"])


def plot_sensitivity(single: pd.DataFrame) -> Figure:
    """Heatmap of log10 KL with one layer factorised: layers (rows) by rank ratio (columns)."""
    grid = single.pivot(index="layer", columns="ratio", values="kl").reindex(list(dict.fromkeys(single["layer"])))
    figure = Figure(figsize=(1.5 + 0.8 * grid.shape[1], 1.2 + 0.28 * grid.shape[0]), layout="tight")
    axis = figure.subplots()
    image = axis.imshow(np.log10(grid.clip(lower=1e-8).to_numpy()), aspect="auto", cmap=matplotlib.colormaps["magma_r"])
    axis.set_xticks(range(grid.shape[1]), [f"{r:.3g}" for r in grid.columns])
    axis.set_yticks(range(grid.shape[0]), grid.index, fontsize=7)
    axis.set_xlabel("rank / full rank")
    axis.set_title("Sensitivity: one layer factorised, KL to dense logits")
    figure.colorbar(image, ax=axis, label="log10 KL")
    return figure
