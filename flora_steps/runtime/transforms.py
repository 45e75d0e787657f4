"""Training transforms: timm's, with its posterize operation made safe for the pinned Pillow.

timm's RandAugment "increasing" posterize keeps ``4 - int(magnitude / 10 * 4)`` bits,
so a magnitude drawn at its maximum (``m9-mstd0.5`` reaches 10 now and then) asks
for 0 bits. Pillow before 13 turned such an image black; Pillow 13 raises
``ValueError`` instead, which stops training a few times per thousand images. The
guard puts the old behaviour back on the transform it is given (no global change to
timm): 0 bits is a black image, 1 to 7 bits are Pillow's posterize.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from PIL import Image, ImageOps
from timm.data import auto_augment, create_transform


def posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """Keep the top ``bits_to_keep`` bits of every channel; 0 bits gives a black image, 8 or more the image."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def augment_ops(transform: Any) -> Iterator[auto_augment.AugmentOp]:
    """Every timm augmentation op inside a (composed) transform: RandAugment, AugMix and AutoAugment policies."""
    for step in getattr(transform, "transforms", [transform]):
        yield from getattr(step, "ops", [])
        for sub_policy in getattr(step, "policy", []):
            yield from sub_policy


def guard_posterize(transform: Any) -> Any:
    """``transform`` with each of its posterize ops replaced by ``posterize`` above; returns it."""
    for op in augment_ops(transform):
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = posterize
    return transform


def training_transform(data_config: dict[str, Any], options: dict[str, Any]) -> Any:
    """timm's training transform for ``data_config`` with extra ``create_transform`` options (which win over
    the config's values, e.g. ``interpolation``), posterize guarded."""
    return guard_posterize(create_transform(**(data_config | options), is_training=True))
