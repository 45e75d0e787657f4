"""Uncertainty of the report's numbers: a paired bootstrap over fine-tuning seeds and test images.

Every compressed model is fine-tuned once per seed and evaluated on the same test
images, so a model is a 0/1 matrix ``correct[seed, image]`` (the dense base model
has one row). A bootstrap replicate draws seeds and test images with replacement,
once, and weighs every model's matrix with the same draw: differences between
methods are then paired on the same seeds and images, and any number computed
from several models (an interpolated curve, a mean over budgets, an extra MACs
reduction) gets its interval from the same replicates. Intervals are percentile
intervals of the replicates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A number with its interval (``low``/``high`` may be infinite: unbounded on that side)."""

    value: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        """``better`` / ``worse`` when the interval excludes zero, else ``within noise``."""
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "within noise"

    def as_dict(self) -> dict[str, float | str | None]:
        """JSON-ready: infinite ends become ``None`` (unbounded)."""
        return {
            "value": self.value,
            "low": self.low if math.isfinite(self.low) else None,
            "high": self.high if math.isfinite(self.high) else None,
            "verdict": self.verdict,
        }


def interval(samples: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile interval of bootstrap samples; infinite samples (out of range) may make an end infinite."""
    tail = (1 - confidence) / 2
    low, high = np.quantile(samples, [tail, 1 - tail], method="inverted_cdf")
    return float(low), float(high)


def seed_std(values: Sequence[float]) -> float | None:
    """Sample standard deviation over seeds; ``None`` for a single seed."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


class PairedBootstrap:
    """``replicates`` joint draws of seeds and test images with replacement, shared by every model.

    Image draws are kept as counts per image (``uint16``: 50,000 ImageNet images times
    2,000 replicates is 200 MB) and weighed in chunks of replicates.
    """

    CHUNK = 256

    def __init__(self, seeds: int, images: int, replicates: int, rng: np.random.Generator) -> None:
        self.seeds, self.images, self.replicates = seeds, images, replicates
        self.seed_weights = rng.multinomial(seeds, np.full(seeds, 1 / seeds), size=replicates) / seeds
        self.image_counts = rng.multinomial(images, np.full(images, 1 / images), size=replicates).astype(np.uint16)

    def top1(self, correct: np.ndarray) -> np.ndarray:
        """Top-1 of a model in every replicate: ``correct`` is (seeds, images), or (1, images) for one model."""
        if correct.shape[1] != self.images or correct.shape[0] not in (1, self.seeds):
            raise ValueError(f"expected (1 or {self.seeds}, {self.images}) seeds x test images, got {correct.shape}")
        samples = np.empty(self.replicates)
        for start in range(0, self.replicates, self.CHUNK):
            chunk = slice(start, start + self.CHUNK)
            per_image = correct[:1] if correct.shape[0] == 1 else self.seed_weights[chunk] @ correct
            samples[chunk] = (per_image * self.image_counts[chunk]).sum(axis=1) / self.images
        return samples

    def estimate(self, correct: np.ndarray, confidence: float = CONFIDENCE) -> Estimate:
        """Top-1 (mean over seeds and images) with its interval."""
        return Estimate(float(correct.mean()), *interval(self.top1(correct), confidence))


def estimate(value: float, samples: np.ndarray, confidence: float = CONFIDENCE) -> Estimate:
    """``value`` with the percentile interval of its bootstrap ``samples``."""
    return Estimate(value, *interval(samples, confidence))
