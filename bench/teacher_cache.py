"""Benchmark: distillation training with and without the teacher's logits cache (``compute.teacher_cache``).

    python bench/teacher_cache.py [--epochs 40] [--repeats 2]

Runs ``bench/training_loop.py``'s training (the embedded ``vit_digits`` distilled from a
second one on the digits with their ±1-pixel shifts, through ``training.fit`` as the
retrain stage does) once with the plain teacher and once behind ``CachedTeacher``,
interleaved over ``--repeats`` runs, on one thread as a pipeline job runs, and prints
the median training images per second of each, their spread, the ratio and the share
of the teacher's inputs the cache answered. Nothing lands on disk.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn
from training_loop import images_per_second

from flora_steps.runtime.training import CachedTeacher


class Counted(nn.Module):
    """A teacher that counts the images it is given."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher, self.images = teacher, 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.images += len(images)
        return self.teacher(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--capacity", type=int, default=20000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    asked, computed = [], []  # the images the training asks the teacher for; those the teacher computes

    def cache(teacher: nn.Module) -> nn.Module:
        computed.append(Counted(teacher))
        asked.append(Counted(CachedTeacher(computed[-1], args.capacity)))
        return asked[-1]

    wraps = {"none": lambda teacher: teacher, str(args.capacity): cache}
    rates: dict[str, list[float]] = {name: [] for name in wraps}
    for _ in range(args.repeats):  # interleaved, so that a noisy neighbour hits both alike
        for name, wrap in wraps.items():
            rates[name].append(images_per_second(args.epochs, 64, 64, wrap))
    base = statistics.median(rates["none"])
    print(f"{'teacher cache':>13}  {'images/s (median)':>17}  {'spread':>13}  {'vs none':>7}")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name:>13}  {median:>17.0f}  {min(values):>5.0f}–{max(values):<6.0f}  {median / base:>7.2f}")
    hits = 1 - computed[-1].images / asked[-1].images
    print(f"over {args.epochs} epochs the cache answered {hits:.1%} of the teacher's {asked[-1].images} inputs")


if __name__ == "__main__":
    main()
