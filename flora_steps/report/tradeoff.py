"""Accuracy-vs-MACs curves: a baseline's top-1 at given MACs, the MACs it needs for a given top-1.

A baseline (the uniform-rank control, the SVD uniform model) is a set of (MACs,
top-1) points, closed at the top by the dense model. Two comparisons with a FLORA
point, both by linear interpolation between a curve's own points, never beyond them:

- *equal MACs*: the baseline's top-1 at FLORA's MACs (``interpolation_weights``
  mixes the two neighbouring points, so per-image results mix the same way);
- *equal top-1*: FLORA's extra MACs reduction ``1 - flora_macs / baseline_macs``,
  where ``baseline_macs`` is the least MACs at which the curve's *envelope* (the best
  top-1 reachable with at most given MACs, a running maximum) reaches FLORA's top-1.

A FLORA point outside a curve's range gets no number (``None``). An interpolation
across a segment wider than ``WIDE_SEGMENT`` in MACs (its upper end over its lower)
rests on a straight line over a long stretch; ``segment_span`` measures it so that
tables and figures can say so.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: A segment whose upper MACs exceed its lower by more than this factor is flagged where it is used.
WIDE_SEGMENT = 1.5


def segment_span(macs: Sequence[float], at: float) -> float | None:
    """Upper over lower MACs of the curve segment an interpolation at ``at`` MACs uses (1 at a point of the
    curve); ``None`` out of range."""
    weights = interpolation_weights(macs, at)
    if weights is None:
        return None
    ends = [float(macs[i]) for i in weights]
    return max(ends) / min(ends)


def interpolation_weights(macs: Sequence[float], at: float) -> dict[int, float] | None:
    """Weights of the curve points (by index) whose mix is the curve at ``at`` MACs; ``None`` out of range."""
    xs = np.asarray(macs, dtype=float)
    if len(xs) == 0 or at < xs.min() or at > xs.max():
        return None
    order = np.argsort(xs, kind="stable")
    upper = int(np.searchsorted(xs[order], at, side="left"))
    if xs[order[upper]] == at:
        return {int(order[upper]): 1.0}
    below, above = int(order[upper - 1]), int(order[upper])
    fraction = (at - xs[below]) / (xs[above] - xs[below])
    return {below: float(1.0 - fraction), above: float(fraction)}


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
    """``1 - flora_macs / baseline_macs`` at FLORA's top-1 (negative when the baseline is cheaper); ``None`` out of range."""
    baseline_macs = macs_for_accuracy(macs, top1, flora_top1)
    return None if baseline_macs is None else 1.0 - flora_macs / baseline_macs


def extra_reduction_or_bound(
    flora_macs: float, flora_top1: float, macs: Sequence[float], top1: Sequence[float]
) -> float:
    """``extra_reduction``, with out of range as ``-inf`` (FLORA below the cheapest point) or ``+inf`` (above all).

    For bootstrap replicates, whose percentiles then say when an interval is unbounded.
    """
    value = extra_reduction(flora_macs, flora_top1, macs, top1)
    if value is not None:
        return value
    return -np.inf if flora_top1 < float(np.max(top1)) else np.inf
