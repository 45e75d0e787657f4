"""Accuracy-vs-MACs curves: the MACs a method needs for a given accuracy, and FLORA's extra reduction.

The uniform-rank baseline is a set of (MACs, top-1) points, closed at the top by
the dense model. Its *envelope* is the best top-1 reachable with at most a given
MACs (a running maximum), linearly interpolated between points. FLORA's extra MACs
reduction at one of its points is ``1 - flora_macs / uniform_macs``, where
``uniform_macs`` is the least MACs at which the envelope reaches FLORA's top-1.
Interpolation never extrapolates: a top-1 below the cheapest uniform point or above
the best one is out of the curve's range and gets no number.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def macs_for_accuracy(macs: Sequence[float], top1: Sequence[float], target: float) -> float | None:
    """Least MACs at which the interpolated envelope of the points reaches ``target`` top-1.

    ``None`` when ``target`` lies outside the envelope's range: above every point, or
    below the cheapest one (whose MACs would only be an upper bound).
    """
    order = np.argsort(macs, kind="stable")
    xs = np.asarray(macs, dtype=float)[order]
    ys = np.maximum.accumulate(np.asarray(top1, dtype=float)[order])
    if len(xs) == 0 or ys[-1] < target or ys[0] > target:
        return None
    first = int(np.argmax(ys >= target))
    if first == 0 or ys[first] == ys[first - 1]:
        return float(xs[first])
    fraction = (target - ys[first - 1]) / (ys[first] - ys[first - 1])
    return float(xs[first - 1] + fraction * (xs[first] - xs[first - 1]))


def extra_reduction(flora_macs: float, flora_top1: float, macs: Sequence[float], top1: Sequence[float]) -> float | None:
    """``1 - flora_macs / uniform_macs`` at FLORA's top-1 (negative when uniform is cheaper); ``None`` out of range."""
    uniform_macs = macs_for_accuracy(macs, top1, flora_top1)
    return None if uniform_macs is None else 1.0 - flora_macs / uniform_macs
