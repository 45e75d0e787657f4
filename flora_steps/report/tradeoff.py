"""Accuracy-vs-MACs curves: a baseline's top-1 at given MACs, the MACs it needs for a given top-1.

A baseline (the uniform-rank control, the SVD uniform model, a pruning method) is a
set of (MACs, top-1) points, closed at the top by the dense model. Both comparisons
with a compressed model read the curve on its *Pareto front*: the points that no
cheaper (or equally cheap) point matches in top-1. A dominated point (more MACs, less
top-1 than some point of the curve) is dropped, so adding a worse baseline model never
makes the baseline look worse. Between front points the curve is a straight line;
beyond the front's last point, up to the curve's largest MACs, it stays flat (a
cheaper model already reaches that top-1). Nothing is extrapolated:

- *equal MACs* (``top1_at_macs``): the front's top-1 at the model's MACs;
- *equal top-1* (``extra_reduction``): ``1 - model_macs / baseline_macs``, where
  ``baseline_macs`` is where the front reaches the model's top-1.

A point outside a curve's range gets no number (``None``). An interpolation across a
segment wider than ``WIDE_SEGMENT`` in MACs (its upper end over its lower) rests on a
straight line over a long stretch; ``segment_span`` measures it so that tables and
figures can say so.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: A segment whose upper MACs exceed its lower by more than this factor is flagged where it is used.
WIDE_SEGMENT = 1.5


def pareto_front(macs: Sequence[float], top1: Sequence[float]) -> list[int]:
    """Indices of the curve's non-dominated points in MACs order: each more accurate than every cheaper one
    (at equal MACs the most accurate stands for them)."""
    order = sorted(range(len(macs)), key=lambda i: (float(macs[i]), -float(top1[i])))
    front: list[int] = []
    for index in order:
        if not front or top1[index] > top1[front[-1]]:
            front.append(index)
    return front


def envelope(macs: Sequence[float], top1: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(MACs, top-1) of the curve as read: its Pareto front, held flat up to its largest MACs."""
    front = pareto_front(macs, top1)
    xs = [float(macs[i]) for i in front]
    ys = [float(top1[i]) for i in front]
    if front and max(map(float, macs)) > xs[-1]:
        xs.append(max(map(float, macs)))
        ys.append(ys[-1])
    return np.asarray(xs), np.asarray(ys)


def top1_at_macs(macs: Sequence[float], top1: Sequence[float], at: float) -> float | None:
    """The curve's top-1 at ``at`` MACs (read on ``envelope``); ``None`` out of its MACs range."""
    xs, ys = envelope(macs, top1)
    if len(xs) == 0 or at < xs[0] or at > xs[-1]:
        return None
    return float(np.interp(at, xs, ys))


def segment_span(xs: np.ndarray, at: float) -> float | None:
    """Upper over lower MACs of the segment of ``xs`` (an envelope's MACs, ascending) that holds ``at``
    (1 at one of its points); ``None`` out of range."""
    if len(xs) == 0 or at < xs[0] or at > xs[-1]:
        return None
    if np.isclose(xs, at, rtol=1e-12, atol=0).any():
        return 1.0
    upper = int(np.searchsorted(xs, at))
    return float(xs[upper] / xs[upper - 1])


def macs_for_accuracy(macs: Sequence[float], top1: Sequence[float], target: float) -> float | None:
    """Least MACs at which the curve's Pareto front reaches ``target`` top-1.

    ``None`` when ``target`` lies outside the front's range: above every point, or
    below the cheapest one (whose MACs would only be an upper bound).
    """
    front = pareto_front(macs, top1)
    xs = np.asarray([float(macs[i]) for i in front])
    ys = np.asarray([float(top1[i]) for i in front])
    if len(xs) == 0 or target > ys[-1] or target < ys[0]:
        return None
    return float(np.interp(target, ys, xs))  # the front's top-1 rises strictly: one MACs per top-1


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
