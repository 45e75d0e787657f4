"""Inputs of the CPU rehearsal (``configs/rehearsal.yaml``): random weights and images, nothing downloaded.

    python tests/rehearsal.py rehearsal

writes ``rehearsal/deit_tiny.safetensors`` (a randomly initialised timm
``deit_tiny_patch16_224`` with 4 classes and 2 blocks) and ``rehearsal/imagenet/{train,val}/<class>/``
(JPEG noise of varied sizes around 256 px: 8 training and 2 test images per class).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 8, 2
DEPTH = 2  # configs/rehearsal.yaml's model.kwargs


def write_rehearsal_inputs(folder: Path) -> None:
    """The checkpoint and the ImageFolder tree ``configs/rehearsal.yaml`` names, under ``folder``."""
    write_images(folder)
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", num_classes=CLASSES, depth=DEPTH)
    save_file(model.state_dict(), folder / "deit_tiny.safetensors")


def write_images(folder: Path) -> None:
    """``folder/imagenet/{train,val}/<class>/``: JPEG noise of varied sizes around 256 px."""
    rng = np.random.default_rng(0)
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for label in range(CLASSES):
            images = folder / "imagenet" / split / f"n{label:08d}"
            images.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                height, width = rng.integers(230, 300, size=2)
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(images / f"{index}.JPEG", quality=90)


if __name__ == "__main__":
    write_rehearsal_inputs(Path(sys.argv[1] if len(sys.argv) > 1 else "rehearsal"))
