"""Benchmark: training data-loader throughput (images/s) with the paper's transforms, per worker count.

    python bench/data_loader.py [--root /datasets/imagenet] [--workers 0 2 4 8] [--batches 20] [--batch 64]

Runs the training loader the pipeline uses (``flora_steps.runtime.data.train_loader``: per-image
augmentation seeds, RandAugment ``rand-m9-mstd0.5-inc1``, random erasing 0.25 on the
device, uint8 batches normalised on the device, persistent workers, pinned memory on
CUDA) over ``--batches`` batches, after one warm-up batch, for each worker count, and
prints images per second: median of ``--repeats`` passes, and the spread. Without
``--root`` it writes an ImageFolder of random JPEGs (500x375, ImageNet's typical size)
into a temporary folder. A supernet at N images/s per GPU needs about N x GPUs / this
rate workers; ``compute.workers: null`` uses every CPU a job is given.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flora_steps.params import DataParams
from flora_steps.runtime.data import build_splits, train_loader

PAPER_AUGMENTATION = {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "interpolation": "bicubic"}
DEIT_INPUT = {
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.875,
}


def random_image_folder(root: Path, classes: int = 4, per_class: int = 100) -> None:
    """An ImageFolder tree of random 500x375 JPEGs (``train/`` and a small ``val/``)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 2)):
        for label in range(classes):
            folder = root / split / f"n{label:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.JPEG", quality=90)


def images_per_second(loader, batches: int) -> float:
    """Images per second of ``batches`` batches of ``loader`` (one epoch's iterator), after one warm-up batch."""
    loader.sampler.set_epoch(0)
    iterator = iter(loader)
    next(iterator)
    started, count = time.perf_counter(), 0
    for _ in range(batches):
        images, _ = next(iterator)
        count += len(images)
    if images.is_cuda:
        torch.cuda.synchronize()
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="ImageFolder tree with train/ and val/ (default: random JPEGs)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as scratch:
        root = args.root
        if root is None:
            root = Path(scratch)
            random_image_folder(root, per_class=(args.batches + 2) * args.batch // 4 + 1)
        params = DataParams(
            dataset="imagenet",
            root=root,
            val_fraction=0.01,
            test_fraction=0.2,
            split_seed=0,
            eval_batch_size=args.batch,
            crop_pct=None,
            shift=0,
            train_transform=PAPER_AUGMENTATION,
            skip_unreadable=False,
        )
        splits = build_splits(params, DEIT_INPUT, len(list((root / "train").iterdir())))
        print(f"device {device}, batch {args.batch}, {args.batches} batches, {args.repeats} repeats")
        print("workers  images/s (median)  spread (min-max)")
        for workers in args.workers:
            rates = []
            for _ in range(args.repeats):
                loader = train_loader(splits.train, args.batch, 0, device, workers, splits.on_device)
                rates.append(images_per_second(loader, args.batches))
                del loader
            print(f"{workers:7d}  {statistics.median(rates):17.1f}  {min(rates):.1f}-{max(rates):.1f}")


if __name__ == "__main__":
    main()
