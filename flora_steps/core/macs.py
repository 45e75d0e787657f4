"""MACs and parameter counting for dense and rank-configured models.

Convention: multiply-accumulates of every matrix product of one image's
forward pass: linear layers, attention's QKᵀ and AV, the patch-embedding
convolution and the head. Norms, softmax, GELU, bias and residual additions are
not counted. A factorised linear layer costs ``tokens * rank * (in + out)``; a
layer at full rank or at/above break-even costs the dense ``tokens * in * out``.

``trace_costs`` runs one forward pass under ``torch.utils.flop_counter`` (with
timm's fused attention switched off, since the counter does not see inside the
CPU SDPA kernel) and records how many tokens each linear layer sees. After that,
``CostModel.macs`` prices any rank configuration with a little arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .lowrank import LowRankLinear, full_rank, weight_cost


@dataclass(frozen=True)
class LinearCost:
    """Shape of one linear layer and the tokens it processes per image."""

    in_features: int
    out_features: int
    tokens: int

    @property
    def full_rank(self) -> int:
        return full_rank(self.in_features, self.out_features)

    def macs(self, rank: int | None = None) -> int:
        return self.tokens * weight_cost(self.in_features, self.out_features, rank)

    def params(self, rank: int | None = None) -> int:
        return weight_cost(self.in_features, self.out_features, rank)


@dataclass(frozen=True)
class CostModel:
    """Per-image MACs and parameter count of a model as a function of its layer ranks."""

    layers: dict[str, LinearCost]
    other_macs: int
    other_params: int

    def check_ranks(self, ranks: Mapping[str, int]) -> None:
        """Raise ``ValueError`` naming the first unknown layer or out-of-range rank."""
        for name, rank in ranks.items():
            if name not in self.layers:
                raise ValueError(f"'{name}' is not a linear layer of this model")
            limit = self.layers[name].full_rank
            if not 1 <= rank <= limit:
                raise ValueError(f"rank of '{name}' must lie in [1, {limit}], got {rank}")

    def layer_macs(self, name: str, rank: int | None = None) -> int:
        """MACs per image of layer ``name`` at ``rank`` (``None``: dense)."""
        return self.layers[name].macs(rank)

    def macs(self, ranks: Mapping[str, int] | None = None) -> int:
        """MACs per image; layers missing from ``ranks`` are dense."""
        ranks = ranks or {}
        return self.other_macs + sum(layer.macs(ranks.get(name)) for name, layer in self.layers.items())

    def params(self, ranks: Mapping[str, int] | None = None) -> int:
        """Parameter count; layers missing from ``ranks`` are dense."""
        ranks = ranks or {}
        return self.other_params + sum(layer.params(ranks.get(name)) for name, layer in self.layers.items())

    @property
    def dense_macs(self) -> int:
        return self.macs()

    @property
    def dense_params(self) -> int:
        return self.params()


@contextmanager
def unfused_attention(model: nn.Module) -> Iterator[None]:
    """Temporarily switch timm attention modules to their explicit-matmul path."""
    fused = {m: m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")}
    try:
        for module in fused:
            module.fused_attn = False
        yield
    finally:
        for module, value in fused.items():
            module.fused_attn = value


def _probe(model: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    parameter = next(model.parameters())
    return torch.zeros((1, *input_shape), device=parameter.device, dtype=parameter.dtype)


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """MACs of one image through ``model`` as ``torch.utils.flop_counter`` counts them."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with unfused_attention(model), counter:
        model(_probe(model, input_shape))
    model.train(was_training)
    return counter.get_total_flops() // 2


def _multiplies_per_token(module: nn.Module, rank: int | None) -> int:
    """Multiplies per token of a linear-like module whose factors hold ``rank`` components."""
    if isinstance(module, LowRankLinear):
        return rank * (module.in_features + module.out_features)
    return module.in_features * module.out_features


@torch.no_grad()
def trace_costs(model: nn.Module, input_shape: tuple[int, ...]) -> CostModel:
    """Build a ``CostModel`` of ``model`` from one traced forward pass of a single image.

    ``model`` may be dense or contain ``LowRankLinear`` layers (priced by their shape,
    whatever their active rank); it may live on the ``meta`` device, which makes
    tracing a large model instant. ``input_shape`` is one image's shape, e.g.
    ``(3, 224, 224)``.
    """
    linear_like = {
        name: module for name, module in model.named_modules() if isinstance(module, (nn.Linear, LowRankLinear))
    }
    tokens: dict[str, int] = {}

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            tokens[name] = tokens.get(name, 0) + inputs[0].numel() // inputs[0].shape[-1]

        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in linear_like.items()]
    try:
        total_macs = count_macs(model, input_shape)
    finally:
        for handle in handles:
            handle.remove()

    layers, traced_macs, stored_weights = {}, 0, 0
    for name, count in tokens.items():
        module = linear_like[name]
        layers[name] = LinearCost(module.in_features, module.out_features, count)
        traced_macs += count * _multiplies_per_token(module, getattr(module, "rank", None))
        stored_weights += _multiplies_per_token(module, getattr(module, "max_rank", None))
    return CostModel(
        layers=layers,
        other_macs=total_macs - traced_macs,
        other_params=sum(p.numel() for p in model.parameters()) - stored_weights,
    )
