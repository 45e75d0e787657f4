"""Uncertainty of the report's numbers: a paired, hierarchical bootstrap over runs, fine-tuning seeds and test images.

A model of the report is a 0/1 array ``correct[run, seed, image]``: the pipeline runs
everything after the dense model ``runs`` times, each run fine-tunes its compressed
models once per seed, and every model is evaluated on the same test images (the dense
model has one run and one seed; a model evaluated without fine-tuning, one seed per run).
A bootstrap replicate draws, once for every model, a weight per run (or, with one run,
per seed) and a count per test image: differences between methods are then paired on the
same runs, seeds and images, the replicates of a difference are the differences of the
replicates, and any number computed from several models (an interpolated curve, a mean
over budgets, an extra MACs reduction) gets its interval from the same replicates.

- **Test images** are resampled with replacement (counts per image).
- **Runs and seeds** are few (3 to 5), and a percentile bootstrap over 3 values
  under-covers (all three resampled values equal one seed 1/27 of the time). Each model's
  top-1 over runs (seeds) is an average over thousands of images, close to normal, so its
  resampled mean is drawn from the t-interval's own distribution instead: per replicate
  the ``n`` runs (seeds) get weights ``1/n + (z_i - mean(z)) / sqrt(n * chi2)``, with ``z``
  standard normal and ``chi2`` of ``n - 1`` degrees of freedom, all shared by every model.
  The weighted mean then deviates from the mean by exactly ``s / sqrt(n) * t(n - 1)``
  (``s`` the models' own standard deviation over runs), which is the t-interval's
  small-sample correction. With several runs the seeds of a run enter through the run's
  mean (its spread already holds theirs); with one run and one seed neither level adds
  anything, and the report says that its intervals omit that variance.

Intervals are percentile intervals of the replicates. A replicate without a value (a
mean over budgets of an unboundedly low and an unboundedly high one) counts at both
ends, so that enough of them make an interval unbounded both ways. ``simultaneous``
widens a family of intervals so that they hold together (max-statistic over the same
replicates).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A number with its interval (``low``/``high`` may be infinite: unbounded on that side).

    ``identical``: the two sides of a difference are the same model (same predictions).
    """

    value: float
    low: float
    high: float
    identical: bool = False

    @property
    def verdict(self) -> str:
        """``identical model``; ``undetermined`` (unbounded both ways); ``better`` / ``worse`` when the
        interval excludes zero; else ``within noise``."""
        if self.identical:
            return "identical model"
        if self.low == -math.inf and self.high == math.inf:
            return "undetermined"
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "within noise"


def interval(samples: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile interval of bootstrap samples. Infinite samples (out of range on that side) may make an end
    infinite; a sample without a value (NaN) counts as ``-inf`` for the lower end and ``+inf`` for the upper."""
    tail = (1 - confidence) / 2
    return _ends(np.asarray(samples, dtype=float)[None], tail)[0]


def simultaneous(samples: np.ndarray, confidence: float = CONFIDENCE) -> list[tuple[float, float]]:
    """Percentile intervals of a family of numbers, ``samples`` (numbers, replicates), that hold together.

    The tail level is lowered from ``(1 - confidence) / 2`` until ``confidence`` of the
    replicates lie inside every number's interval at once: the max-statistic on each
    number's own replicate ranks (two-sided), so that asymmetric and unbounded intervals
    keep their shape. For one number it is ``interval``.
    """
    samples = np.asarray(samples, dtype=float)
    if len(samples) == 0:
        return []
    lower, upper = _censored(samples)
    replicates = samples.shape[1]
    below = rankdata(lower, axis=1, method="max") / replicates  # share of replicates at or below this one
    above = (replicates + 1 - rankdata(upper, axis=1, method="min")) / replicates  # at or above
    outermost = np.minimum(below, above).min(axis=0)  # each replicate's most extreme number, as a tail share
    tail = float(np.quantile(outermost, 1 - confidence, method="inverted_cdf"))
    return _ends(samples, min(tail, (1 - confidence) / 2))


def _censored(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The samples for the lower and the upper end: a NaN (no value) is ``-inf`` for one, ``+inf`` for the other."""
    missing = np.isnan(samples)
    return np.where(missing, -np.inf, samples), np.where(missing, np.inf, samples)


def _ends(samples: np.ndarray, tail: float) -> list[tuple[float, float]]:
    lower, upper = _censored(samples)
    lows = np.quantile(lower, tail, axis=1, method="inverted_cdf")
    highs = np.quantile(upper, 1 - tail, axis=1, method="inverted_cdf")
    return [(float(low), float(high)) for low, high in zip(lows, highs, strict=True)]


def seed_std(values: Sequence[float]) -> float | None:
    """Sample standard deviation over seeds; ``None`` for a single seed."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def student_weights(n: int, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """(replicates, n) weights summing to 1 whose weighted mean of ``n`` values deviates from their mean by
    ``s / sqrt(n) * t(n - 1)``; all ``1 / n`` for ``n = 1``."""
    if n == 1:
        return np.ones((replicates, 1))
    normal = rng.standard_normal((replicates, n))
    normal -= normal.mean(axis=1, keepdims=True)
    return 1 / n + normal / np.sqrt(n * rng.chisquare(n - 1, size=(replicates, 1)))


class PairedBootstrap:
    """``replicates`` joint draws of run (or seed) weights and test-image counts, shared by every model.

    Image draws are kept as counts per image (``uint16``: 50,000 ImageNet images times
    2,000 replicates is 200 MB) and weighed in chunks of replicates.
    """

    CHUNK = 256

    def __init__(self, seeds: int, images: int, replicates: int, rng: np.random.Generator, runs: int = 1) -> None:
        self.runs, self.seeds, self.images, self.replicates = runs, seeds, images, replicates
        self.weights = student_weights(runs if runs > 1 else seeds, replicates, rng)
        self.image_counts = rng.multinomial(images, np.full(images, 1 / images), size=replicates).astype(np.uint16)

    @property
    def omits_runs(self) -> bool:
        """Whether run-to-run variance is missing from the intervals (one run)."""
        return self.runs == 1

    def in_run(self, correct: np.ndarray) -> np.ndarray:
        """One run's top-1 of a model in every replicate, from its ``correct`` (seeds, images): test images by the
        replicate's counts; seeds by its t-weights when there is one run, else by their mean (with several runs
        the seeds enter through the runs)."""
        if correct.ndim != 2 or correct.shape[1] != self.images or correct.shape[0] not in (1, self.seeds):
            raise ValueError(f"expected (1 or {self.seeds} seeds, {self.images} test images), got {correct.shape}")
        units = correct if self.runs == 1 and len(correct) > 1 else correct.mean(axis=0, keepdims=True)
        samples = np.empty(self.replicates)
        for start in range(0, self.replicates, self.CHUNK):
            chunk = slice(start, start + self.CHUNK)
            per_image = units if len(units) == 1 else self.weights[chunk] @ units
            samples[chunk] = (per_image * self.image_counts[chunk]).sum(axis=1) / self.images
        return samples

    def combine(self, per_run: np.ndarray) -> np.ndarray:
        """The mean over runs of a number in every replicate, from its replicates in each run (runs, replicates):
        weighed by the replicate's run t-weights (one run: as it is). Linear, so that the replicates of a mean of
        differences are the mean of the differences' replicates; an infinite value stays infinite."""
        if len(per_run) == 1:
            return np.asarray(per_run[0], dtype=float)
        if len(per_run) != self.runs:
            raise ValueError(f"expected 1 or {self.runs} runs, got {len(per_run)}")
        with np.errstate(invalid="ignore"):  # +inf and -inf in one replicate: no value (NaN)
            return np.sum(self.weights.T * np.asarray(per_run, dtype=float), axis=0)

    def top1(self, correct: np.ndarray) -> np.ndarray:
        """Top-1 of a model in every replicate: ``correct`` is (runs, seeds, images), or (seeds, images) for one run."""
        runs = correct[None] if correct.ndim == 2 else correct
        if runs.ndim != 3:
            raise ValueError(f"expected (runs, seeds, {self.images} test images), got {correct.shape}")
        return self.combine(np.array([self.in_run(run) for run in runs]))

    def estimate(self, correct: np.ndarray, confidence: float = CONFIDENCE) -> Estimate:
        """Top-1 (mean over runs, seeds and images) with its interval, within [0, 1]."""
        low, high = interval(self.top1(correct), confidence)
        return Estimate(float(correct.mean()), max(low, 0.0), min(high, 1.0))
