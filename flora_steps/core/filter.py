"""Low-rank-aware candidate filtering: which rank tuples of a block are worth keeping.

The paper's filtering code was never released; this is our documented design
(docs/methods.md, "filter"). Each of a block's choices is scored, with every other block dense, by
the damage it does (KL divergence of its logits from the dense model's) per MAC it
saves. The block's choices are split into equal-width MACs bins, and in every bin
the best ``keep_ratio`` of its choices survive: damage per MAC saved grows steeply
as ranks shrink, so one ranking over all sizes would keep almost only light
compressions and leave the search nothing to choose from at small budgets. Both
ends of the block's MACs range are always kept: the dense choice and the cheapest
choice, so the space spans every model size the rank grid allows. The functions take
any additive cost in place of MACs: FLORA under latency budgets passes the latency a
machine's table predicts (``stages/filter_latency.py``).
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

    In each of ``bins`` equal-width MACs bins, keeps the ``ceil(keep_ratio * n)`` most
    efficient of its ``n`` choices (ties towards fewer MACs); also keeps the dense
    choice and the cheapest choice (ties: the most efficient).
    """
    macs = np.asarray(macs)
    score = efficiency(damage, saved_macs)
    bin_of = macs_bins(macs, bins)
    kept = np.zeros(len(score), dtype=bool)
    for b in np.unique(bin_of):
        members = np.flatnonzero(bin_of == b)
        ranked = members[np.lexsort((macs[members], score[members]))]
        kept[ranked[: math.ceil(keep_ratio * len(members))]] = True
    kept[dense_index] = True
    kept[np.lexsort((score, macs))[0]] = True
    return kept
