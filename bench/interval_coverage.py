"""Benchmark: how often the report's 95% intervals cover the true top-1, with few seeds or runs.

    python bench/interval_coverage.py [--trials 400] [--images 2000] [--replicates 1000]

Simulates models of known expected top-1 (80%): every image has a difficulty shared by all
runs and seeds, 10% of the images are a coin toss per fine-tuning, and each run (or seed)
shifts the accuracy by a normal amount (``shift sd``, in points). For each design it draws
``--trials`` models, builds the report's interval (``flora_steps.report.stats.PairedBootstrap``:
t-weights over runs or seeds, counts over images) and a plain percentile bootstrap that
resamples seeds (runs) with replacement instead, and prints the share of intervals that
contain 80%, with its binomial standard error. When seeds dominate (as on ImageNet's
50,000 test images), the plain bootstrap over 3 seeds falls well below 95%.
"""

from __future__ import annotations

import argparse

import numpy as np

from flora_steps.report.stats import PairedBootstrap, interval

DESIGNS = [  # (runs, seeds, shift sd in points)
    (1, 3, 0.0),
    (1, 3, 3.0),
    (1, 5, 3.0),
    (3, 2, 3.0),
    (5, 2, 3.0),
]


def population(rng: np.random.Generator, runs: int, seeds: int, images: int, shift_sd: float) -> np.ndarray:
    """``correct[run, seed, image]`` of a model of expected top-1 0.8 (see the module's docstring)."""
    difficulty = rng.random(images)
    level = runs if runs > 1 else seeds
    shift = rng.normal(0, shift_sd / 100, level)
    shift = shift[:, None, None] if runs > 1 else shift[None, :, None]
    toss = rng.random((runs, seeds, images)) < 0.1
    return (np.where(toss, rng.random((runs, seeds, images)), difficulty) < 0.8 + shift).astype(float)


def covered(bootstrap: PairedBootstrap, model: np.ndarray) -> bool:
    low, high = interval(bootstrap.top1(model))
    return low <= 0.8 <= high


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=400)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--replicates", type=int, default=1000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'runs':>4} {'seeds':>5} {'shift sd':>8}   {'t-weights (report)':>20}   {'plain percentile':>18}")
    for runs, seeds, shift_sd in DESIGNS:
        hits = {"t": 0, "plain": 0}
        for trial in range(args.trials):
            model = population(rng, runs, seeds, args.images, shift_sd)
            report = PairedBootstrap(seeds, args.images, args.replicates, np.random.default_rng(trial), runs=runs)
            plain = PairedBootstrap(seeds, args.images, args.replicates, np.random.default_rng(trial), runs=runs)
            level = runs if runs > 1 else seeds
            draws = np.random.default_rng(trial).multinomial(level, np.full(level, 1 / level), size=args.replicates)
            plain.weights = draws / level
            hits["t"] += covered(report, model)
            hits["plain"] += covered(plain, model)
        shares = {name: count / args.trials for name, count in hits.items()}
        errors = {name: np.sqrt(share * (1 - share) / args.trials) for name, share in shares.items()}
        print(
            f"{runs:>4} {seeds:>5} {shift_sd:>8.1f}   {shares['t']:>12.3f} ± {errors['t']:.3f}"
            f"   {shares['plain']:>10.3f} ± {errors['plain']:.3f}"
        )


if __name__ == "__main__":
    main()
