"""Models by name: every timm model plus the embedded ``vit_digits`` and ``vit_digits_hybrid``, and base-weight
loading.

Importing this module registers both with timm, so ``timm.create_model("vit_digits")``
works like for any other timm model.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import ConvNormAct, HybridEmbed
from timm.models import build_model_with_cfg, register_model
from timm.models._registry import generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..core import restructure
from ..errors import UserError
from ..pruning.ofb import restructure_embedding
from ..pruning.structure import PrunedBlock, restructure_blocks

__all__ = [
    "build_model",
    "check_model",
    "create_base_model",
    "data_config",
    "input_shape",
    "is_known_model",
    "vit_digits",
    "vit_digits_hybrid",
]

#: Pixel statistics of scikit-learn's digits after scaling to [0, 1].
DIGITS_MEAN = (0.3051,)
DIGITS_STD = (0.3750,)

_DIGITS_CFG = {
    "num_classes": 10,
    "input_size": (1, 8, 8),
    "mean": DIGITS_MEAN,
    "std": DIGITS_STD,
    "crop_pct": 1.0,
    "interpolation": "nearest",
    "classifier": "head",
    "license": "apache-2.0",
}
default_cfgs = generate_default_cfgs(
    {
        "vit_digits": {**_DIGITS_CFG, "first_conv": "patch_embed.proj"},
        "vit_digits_hybrid": {**_DIGITS_CFG, "first_conv": "patch_embed.backbone.0.conv"},
    }
)
_VIT_DIGITS = dict(in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=2, mlp_ratio=4.0)


@register_model
def vit_digits(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Small ViT for 8x8 single-channel digits: patch 2, width 64, depth 4, 2 heads (~0.2 M params)."""
    model_args = dict(_VIT_DIGITS, img_size=8, patch_size=2)
    return build_model_with_cfg(VisionTransformer, "vit_digits", pretrained, **dict(model_args, **kwargs))


@register_model
def vit_digits_hybrid(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """``vit_digits`` with a convolution stem (a compact hybrid): two 3x3 conv-BN-ReLU layers (1 -> 16 -> 32
    channels, the second with stride 2) make a 4x4 feature map, timm's ``HybridEmbed`` projects each of its 16
    positions to a token (patch 1), then the same transformer (width 64, depth 4, 2 heads)."""
    stem = nn.Sequential(ConvNormAct(1, 16, 3), ConvNormAct(16, 32, 3, stride=2))
    model_args = dict(_VIT_DIGITS, img_size=8, patch_size=1, embed_layer=partial(HybridEmbed, backbone=stem))
    return build_model_with_cfg(VisionTransformer, "vit_digits_hybrid", pretrained, **dict(model_args, **kwargs))


def is_known_model(name: str) -> bool:
    """True for any model name ``timm.create_model`` accepts (including ``vit_digits``)."""
    return timm.is_model(name)


def data_config(model: nn.Module) -> dict[str, Any]:
    """timm's resolved input config of ``model``: input_size, mean, std, interpolation, crop_pct."""
    return timm.data.resolve_data_config({}, model=model)


def input_shape(model: nn.Module) -> tuple[int, ...]:
    """One image's (C, H, W) as the model's timm config gives it."""
    return tuple(data_config(model)["input_size"])


def build_model(
    name: str,
    kwargs: dict[str, Any],
    lowrank: dict[str, int] | None = None,
    factorised: dict[str, int] | None = None,
    pruned: Mapping[str, PrunedBlock] | None = None,
    embed_dim: int | None = None,
) -> nn.Module:
    """An uninitialised timm model ``name`` with the structure of a saved artifact: its embedding width
    ``embed_dim`` (OFB, ``pruning.ofb.restructure_embedding``), its blocks pruned to ``pruned``
    (``pruning.structure.restructure_blocks``), then its low-rank layers (``core.restructure``)."""
    model = restructure_embedding(timm.create_model(name, pretrained=False, **kwargs), embed_dim)
    return restructure(restructure_blocks(model, pruned or {}), lowrank, factorised)


def create_base_model(
    name: str,
    num_classes: int,
    checkpoint: Path | None = None,
    hub: bool = False,
    kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Create a timm model, with weights from a local ``checkpoint``, from timm's hub, or random.

    A checkpoint goes through timm's own pretrained-weight loading (the model's
    checkpoint filter, EMA/``state_dict``/``model`` keys, safetensors or
    ``torch.load(weights_only=True)``), and must fit the model exactly.
    """
    if not is_known_model(name):
        raise UserError(f"model.name: unknown timm model '{name}'")
    kwargs = kwargs or {}
    if checkpoint is None:
        return _create(name, hub, kwargs, num_classes)
    if not checkpoint.is_file():
        raise UserError(f"model.checkpoint: file not found: {checkpoint}")
    model = _create(name, False, kwargs, num_classes)
    cfg = dict(model.pretrained_cfg, file=str(checkpoint), num_classes=num_classes)
    try:
        timm.models.load_pretrained(model, cfg, num_classes=num_classes, in_chans=input_shape(model)[0], strict=True)
    except Exception as error:  # noqa: BLE001 - torch, pickle, zip and safetensors all raise their own types
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        if lines[0].startswith("Error(s) in loading state_dict"):
            raise UserError(f"model.checkpoint: {checkpoint} does not fit model {name}: {_shorten(lines[1])}") from None
        raise UserError(
            f"model.checkpoint: {checkpoint} is not a readable weights file: {_shorten(lines[0])}"
        ) from None
    return model


def _create(name: str, pretrained: bool, kwargs: dict[str, Any], num_classes: int) -> nn.Module:
    """``timm.create_model``; keyword arguments the model rejects are one ``UserError`` naming ``model.kwargs``."""
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs, num_classes=num_classes)
    except (TypeError, ValueError, AssertionError, RuntimeError, OSError, pickle.UnpicklingError) as error:
        # what model constructors raise for bad arguments (and timm's checkpoint_path loading for a bad file)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"model.kwargs: {kwargs} not accepted by {name} ({_shorten(reason)})") from None


def check_model(name: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    """The model built on PyTorch's meta device (no memory, no weights); a bad name or kwargs is a ``UserError``."""
    if not is_known_model(name):
        raise UserError(f"model.name: unknown timm model '{name}'")
    with torch.device("meta"):
        return _create(name, False, kwargs, num_classes)


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
