"""Find target layers of a timm model by name pattern and swap them for low-rank layers."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase

import torch
from torch import nn

from .lowrank import LowRankLinear, factorised_pair

#: The paper's default targets: every block's qkv projection and both MLP layers.
DEFAULT_TARGETS = ("*.attn.qkv", "*.mlp.fc1", "*.mlp.fc2")


def find_linear_layers(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Names of the ``nn.Linear`` / ``LowRankLinear`` modules matching any glob pattern.

    Patterns are matched against the full module path (``fnmatch``; ``*`` also
    matches dots), so ``*.attn.qkv`` finds ``blocks.3.attn.qkv`` in a ViT and
    ``layers.1.blocks.0.attn.qkv`` in a Swin.
    """
    patterns = list(patterns)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, LowRankLinear)) and any(fnmatchcase(name, p) for p in patterns)
    ]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def restructure(
    model: nn.Module, lowrank: Mapping[str, int] | None = None, factorised: Mapping[str, int] | None = None
) -> nn.Module:
    """Give ``model`` the structure of a saved low-rank model, in place, and return it.

    Each ``nn.Linear`` named in ``lowrank`` becomes a ``LowRankLinear`` of that maximum
    rank (a supernet), each one in ``factorised`` a ``factorised_pair`` of that rank (a
    compressed model). The new layers are uninitialised until weights are loaded.
    """
    for name, max_rank in (lowrank or {}).items():
        dense = model.get_submodule(name)
        replace_module(
            model, name, LowRankLinear(dense.in_features, dense.out_features, max_rank, bias=dense.bias is not None)
        )
    for name, rank in (factorised or {}).items():
        dense = model.get_submodule(name)
        replace_module(
            model, name, factorised_pair(dense.in_features, dense.out_features, rank, dense.bias is not None)
        )
    return model


def factorise(
    model: nn.Module,
    layer_names: Iterable[str],
    max_ranks: Mapping[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Replace each named ``nn.Linear`` of ``model`` in place by its SVD ``LowRankLinear``.

    ``max_ranks`` optionally truncates a layer to its leading components (full rank
    otherwise). Returns each layer's full singular-value spectrum.
    """
    max_ranks = max_ranks or {}
    spectra = {}
    for name in layer_names:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, not an nn.Linear")
        spectra[name] = torch.linalg.svdvals(linear.weight.detach().double()).to(linear.weight.dtype)
        replace_module(model, name, LowRankLinear.from_linear(linear, max_ranks.get(name)))
    return spectra


def lowrank_layers(model: nn.Module) -> dict[str, LowRankLinear]:
    """Every ``LowRankLinear`` of ``model`` by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def set_ranks(model: nn.Module, ranks: Mapping[str, int]) -> None:
    """Activate ``ranks`` on the low-rank layers; a layer not listed runs at its maximum rank."""
    layers = lowrank_layers(model)
    unknown = sorted(set(ranks) - set(layers))
    if unknown:
        raise KeyError(f"not low-rank layers of this model: {', '.join(unknown)}")
    for name, layer in layers.items():
        layer.rank = ranks.get(name, layer.max_rank)


def randomise_factors(model: nn.Module, seed: int) -> None:
    """Draw every low-rank layer's factors at random (``LowRankLinear.reset_factors``), from ``seed``: a supernet
    without weight inheritance. Biases and every other weight are left as they are."""
    generator = torch.Generator().manual_seed(seed)
    for layer in lowrank_layers(model).values():
        layer.reset_factors(generator)


def materialise(
    model: nn.Module, ranks: Mapping[str, int] | None = None, widths: Mapping[str, int | None] | None = None
) -> nn.Module:
    """A copy of ``model`` with every ``LowRankLinear`` turned into plain ``nn.Linear`` layers.

    Each layer takes its rank from ``ranks`` (its active rank when not listed); a
    layer at full rank or at/above break-even becomes one dense ``nn.Linear``. A layer
    that ``widths`` lists takes that form instead (``LowRankLinear.materialise_as``:
    dense for ``None``, else a pair of that width, zero past its rank), e.g. the
    fastest form a latency table found (``LatencyTable.fastest_widths``).
    """
    model = copy.deepcopy(model)
    if ranks is not None:
        set_ranks(model, ranks)
    widths = widths or {}
    for name, layer in lowrank_layers(model).items():
        new = layer.materialise_as(layer.rank, widths[name]) if name in widths else layer.materialise()
        replace_module(model, name, new)
    return model
