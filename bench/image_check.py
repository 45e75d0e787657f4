"""Benchmark: cost of the image check (`flora_steps.runtime.image_check`) on a generated ImageFolder tree.

    python bench/image_check.py [--images 10000] [--repeats 3] [--folder /tmp/flora-image-check]

Writes `--images` JPEGs (224x224, ImageNet-like sizes of 20-40 kB) into 100 class
folders once, then times, as medians of `--repeats`: the full check (thread pool,
no cache), the cached call (listing key only: one stat per file), and prints both
extrapolated to ImageNet-1k's 1.28 M training images. The files stay in the page
cache after they are written, so this is the warm-cache cost; a cold network file
system adds its latency per file (the thread pool overlaps it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from flora_steps.runtime.image_check import cache_folder, unreadable_images

IMAGENET_TRAIN = 1_281_167


def make_tree(folder: Path, images: int) -> list[str]:
    paths = sorted(str(p) for p in folder.rglob("*.JPEG"))
    if len(paths) == images:
        return paths
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)
    for index in range(images):
        target = folder / f"n{index % 100:08d}" / f"{index}.JPEG"
        target.parent.mkdir(parents=True, exist_ok=True)
        noisy = np.clip(base.astype(int) + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).resize((224, 224)).save(target, quality=90)
    return sorted(str(p) for p in folder.rglob("*.JPEG"))


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "flora-image-check")
    args = parser.parse_args()
    paths = make_tree(args.folder, args.images)
    size = statistics.mean(os.path.getsize(p) for p in paths[:200]) / 1000
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp()
    full, cached = [], []
    for _ in range(args.repeats):
        for file in cache_folder().glob("*.json"):
            file.unlink()
        full.append(timed(lambda: unreadable_images(paths)))
        cached.append(timed(lambda: unreadable_images(paths)))
    print(f"{len(paths)} JPEGs of {size:.0f} kB on average, {os.cpu_count()} CPUs, median of {args.repeats}")
    for name, seconds in (("full check", full), ("cached (listing only)", cached)):
        median = statistics.median(seconds)
        per_million = median / len(paths) * 1e6
        print(
            f"{name:22s} {median:7.2f} s  = {1e6 * median / len(paths):6.1f} us/file"
            f"  -> {per_million / 60:5.1f} min per million files,"
            f" {per_million * IMAGENET_TRAIN / 1e6 / 60:5.1f} min for ImageNet-1k train"
        )


if __name__ == "__main__":
    main()
