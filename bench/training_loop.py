"""Benchmark: the pipeline's one training loop (``training.fit``) called directly, without a stage.

    python bench/training_loop.py [--epochs 3] [--batch 64] [--micro-batch 64 32 16] [--repeats 3]

Trains the embedded ``vit_digits`` (random weights) on the digits training split with
distillation from a second random ``vit_digits``, as the retrain stage does, once per
micro-batch size (gradient accumulation up to the same global batch), and prints the
median training images per second over ``--repeats`` runs, side by side in one run.
No checkpoint is written (``checkpoint=None``), so nothing lands on disk.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import timm
import torch
import yaml
from torch import nn

import flora_steps.runtime.models  # noqa: F401  (registers vit_digits)
from flora_steps.params import DataParams, TrainingParams
from flora_steps.runtime.data import build_splits
from flora_steps.runtime.models import data_config
from flora_steps.runtime.training import distillation, fit

DATA = """
dataset: digits
root: null
val_fraction: 0.1
test_fraction: 0.2
split_seed: 0
eval_batch_size: 512
crop_pct: null
shift: 1
train_transform: {}
skip_unreadable: false
"""


def images_per_second(
    epochs: int, batch: int, micro_batch: int, wrap: Callable[[nn.Module], nn.Module] = lambda teacher: teacher
) -> float:
    """Training images per second of one ``fit`` run; ``wrap`` puts something around the teacher."""
    torch.manual_seed(0)
    student, teacher = timm.create_model("vit_digits"), wrap(timm.create_model("vit_digits").eval())
    splits = build_splits(DataParams(**yaml.safe_load(DATA)), data_config(student), student.num_classes)
    cfg = TrainingParams(
        epochs=epochs,
        batch_size=batch,
        lr=5e-4,
        min_lr=1e-5,
        weight_decay=0.05,
        warmup_epochs=0,
        grad_clip=1.0,
        micro_batch=micro_batch,
    )
    started = time.perf_counter()
    history = fit(
        student,
        splits.train,
        distillation(teacher, temperature=1.0, hard_weight=0.0),
        lambda model: {},
        cfg,
        device=torch.device("cpu"),
        seed=0,
        on_device=splits.on_device,
    )
    return history[-1]["images"] / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, nargs="+", default=[64, 32, 16])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rates = {m: [] for m in args.micro_batch}
    for _ in range(args.repeats):  # interleaved, so that a noisy neighbour hits every setting alike
        for micro in args.micro_batch:
            rates[micro].append(images_per_second(args.epochs, args.batch, micro))
    base = statistics.median(rates[args.micro_batch[0]])
    print(f"{'micro-batch':>11}  {'images/s (median)':>17}  {'spread':>15}  {'vs first':>8}")
    for micro, values in rates.items():
        median = statistics.median(values)
        print(f"{micro:>11}  {median:>17.0f}  {min(values):>6.0f}–{max(values):<6.0f}  {median / base:>8.2f}")


if __name__ == "__main__":
    main()
