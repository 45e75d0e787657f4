"""Low-rank-aware candidate filtering: which rank tuples of a block are worth keeping.

The paper's filtering code was never released; this is our documented design
(SPEC §2.2). Each of a block's choices is scored, with every other block dense, by
the damage it does (KL divergence of its logits from the dense model's) per MAC it
saves. The best ``keep_ratio`` of the choices survive, plus the best choice of every
MACs bin the block's choices fall into, plus both ends of the block's MACs range:
the dense choice and the cheapest choice. So the search space still spans every
model size, down to the smallest subnet the rank grid allows, and the low-rank
sampling rule trains that smallest end most.
"""

from __future__ import annotations

import math

import numpy as np


def efficiency(damage: np.ndarray, saved_macs: np.ndarray) -> np.ndarray:
    """Damage per MAC saved (lower is better); choices that save nothing score infinity."""
    damage = np.maximum(np.asarray(damage, dtype=float), 0.0)
    saved = np.asarray(saved_macs, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(saved > 0, damage / np.where(saved > 0, saved, 1.0), np.inf)


def macs_bins(macs: np.ndarray, bins: int) -> np.ndarray:
    """Index of the equal-width MACs bin (0 .. bins-1) each choice falls into."""
    macs = np.asarray(macs, dtype=float)
    low, high = macs.min(), macs.max()
    if high == low:
        return np.zeros(len(macs), dtype=int)
    return np.minimum(((macs - low) / (high - low) * bins).astype(int), bins - 1)


def keep_efficient(
    macs: np.ndarray, saved_macs: np.ndarray, damage: np.ndarray, keep_ratio: float, bins: int, dense_index: int
) -> np.ndarray:
    """Boolean mask of the kept choices of one block.

    Keeps the ``ceil(keep_ratio * n)`` most efficient choices, the dense choice, the
    cheapest choice (ties: the most efficient), then the most efficient choice of
    every MACs bin that has none kept yet.
    """
    score = efficiency(damage, saved_macs)
    order = np.lexsort((np.asarray(macs), score))  # by score, ties towards fewer MACs
    kept = np.zeros(len(score), dtype=bool)
    kept[order[: math.ceil(keep_ratio * len(score))]] = True
    kept[dense_index] = True
    kept[np.lexsort((score, np.asarray(macs)))[0]] = True
    bin_of = macs_bins(macs, bins)
    for b in np.unique(bin_of):
        if not kept[bin_of == b].any():
            kept[next(i for i in order if bin_of[i] == b)] = True
    return kept
