"""ViT-Slim (Chavan et al., CVPR 2022): learnt soft masks, a MACs or latency budget, and physical slicing.

Search: every transformer block gets learnable masks initialised to 1 — one per
head channel of attention, shared by q, k and v (the released code's
1×1×heads×1×head_dim ``zeta`` after the qkv projection), and one per MLP hidden unit
after the activation (both ``OutputMask``). They train with the task loss
plus an L1 term per dimension type (``sparsity_loss``).

Budget: one global threshold per dimension type, both set by one keep share (the
``keep`` largest share of each type's masks survives), the largest keep whose sliced
model meets the MACs budget (``structure_for_budget``), as for every other method; or,
under a latency budget, the largest whose latency a latency table predicts
(``core.latency.WidthTable``) meets it.

Slicing (``slice_model``) gives a smaller *dense* timm model that runs as fast as
its MACs say, unlike the released code's masks. Each head keeps its own channels, but
every head of a block keeps the same number (``PrunedBlock.head_dim``): timm's
``Attention`` needs one head size per block, so this is the nearest executable
structure to ViT-Slim's per-channel freedom (a block's count is its surviving
channels divided by its heads, rounded). The soft mask values of kept channels are
folded into the weights (q, k and v rows; the MLP's second layer's columns), and so
is the attention temperature of the original head size, so the sliced model computes
exactly what the masked model computes with its pruned entries set to zero. Token
masks are not implemented.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from timm.models.vision_transformer import Attention
from torch import nn

from ..core.factorise import replace_module
from ..core.latency import WidthTable
from ..core.macs import CostModel
from .structure import PrunedBlock, PrunedStructure, block_macs, part_widths, prunable_blocks, restructure_blocks

ATTENTION, MLP = "attention", "mlp"


class OutputMask(nn.Module):
    """``inner`` followed by one learnable mask value per output unit (the values repeated ``repeat`` times:
    3 for a qkv projection, whose q, k and v share one mask per head channel)."""

    def __init__(self, inner: nn.Module, units: int, repeat: int = 1) -> None:
        super().__init__()
        self.inner, self.repeat = inner, repeat
        self.mask = nn.Parameter(torch.ones(units))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.mask.repeat(self.repeat)


def attach_masks(model: nn.Module) -> dict[tuple[str, str], nn.Parameter]:
    """Insert masks (all 1) into every slimmable block, in place; returns them by (block, type)."""
    masks = {}
    for name, block in prunable_blocks(model).items():
        attention = OutputMask(block.attn.qkv, block.attn.attn_dim, repeat=3)
        hidden = OutputMask(block.mlp.act, block.mlp.fc1.out_features)
        block.attn.qkv, block.mlp.act = attention, hidden
        masks[name, ATTENTION], masks[name, MLP] = attention.mask, hidden.mask
    return masks


def detach_masks(model: nn.Module) -> dict[tuple[str, str], torch.Tensor]:
    """Take the masks out again, in place (the model is plain timm again); returns their values."""
    values = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, OutputMask):
            kind = ATTENTION if name.endswith(".attn.qkv") else MLP
            values[name.removesuffix(".attn.qkv").removesuffix(".mlp.act"), kind] = module.mask.detach().clone()
            replace_module(model, name, module.inner)
    return values


def sparsity_loss(masks: Mapping[tuple[str, str], torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """ViT-Slim's sparsity term: per dimension type, its weight times the L1 norm of all its masks."""
    return sum(weights[kind] * mask.abs().sum() for (_, kind), mask in masks.items())


@dataclass(frozen=True)
class SlimCosts:
    """MACs of any slim structure of one model, from its dense cost model (``trace_costs``)."""

    blocks: dict[str, tuple[int, int, int]]  # block -> (tokens, dim, heads)
    dense: PrunedStructure
    other_macs: int

    @classmethod
    def of(cls, model: nn.Module, costs: CostModel) -> SlimCosts:
        blocks, dense = {}, {}
        for name, block in prunable_blocks(model).items():
            tokens = costs.layers[f"{name}.attn.qkv"].tokens
            blocks[name] = (tokens, block.attn.qkv.in_features, block.attn.num_heads)
            dense[name] = PrunedBlock(block.attn.head_dim, block.mlp.fc1.out_features)
        slimmed = sum(block_macs(*blocks[n], dense[n].head_dim, dense[n].mlp_hidden) for n in blocks)
        return cls(blocks, dense, costs.dense_macs - slimmed)

    @property
    def heads(self) -> dict[str, int]:
        """Attention heads of each block."""
        return {name: heads for name, (_, _, heads) in self.blocks.items()}

    def macs(self, structure: PrunedStructure) -> int:
        """MACs of one image through the model sliced to ``structure``."""
        return self.other_macs + sum(
            block_macs(*self.blocks[name], kept.head_dim, kept.mlp_hidden) for name, kept in structure.items()
        )


def structure_for_keep(
    masks: Mapping[tuple[str, str], torch.Tensor], heads: Mapping[str, int], keep: float
) -> PrunedStructure:
    """The structure that keeps the ``keep`` largest share of each type's mask values (by magnitude).

    One global threshold per type; a block keeps its surviving hidden units and, per
    head, its surviving attention channels divided by its heads (rounded); at least one of each.
    """
    thresholds = {}
    for kind in (ATTENTION, MLP):
        values = torch.cat([mask.abs().flatten() for (_, k), mask in masks.items() if k == kind])
        kept = max(1, round(keep * len(values)))
        thresholds[kind] = values.sort(descending=True).values[kept - 1]
    structure = {}
    for name in dict.fromkeys(block for block, _ in masks):
        attention = int((masks[name, ATTENTION].abs() >= thresholds[ATTENTION]).sum())
        hidden = int((masks[name, MLP].abs() >= thresholds[MLP]).sum())
        structure[name] = PrunedBlock(max(1, round(attention / heads[name])), max(1, hidden))
    return structure


def structure_for_budget(
    masks: Mapping[tuple[str, str], torch.Tensor],
    heads: Mapping[str, int],
    price: Callable[[PrunedStructure], float],
    limit: float,
    unit: str = "MACs",
) -> tuple[float, PrunedStructure]:
    """The largest keep share (to 1e-4) whose structure's cost (``price``: its MACs, or its predicted latency) is
    within ``limit``, and that structure. ``heads``: each block's attention heads.

    Raises ``ValueError`` when even the smallest structure (one channel per head, one
    hidden unit per block) exceeds the budget.
    """
    low, high = 0.0, 1.0
    best = structure_for_keep(masks, heads, low)
    if price(best) > limit:
        raise ValueError(f"even the smallest slim model ({price(best):.6g} {unit}) exceeds the budget ({limit:.6g})")
    everything = structure_for_keep(masks, heads, high)
    if price(everything) <= limit:
        return high, everything
    while high - low > 1e-4:
        middle = (low + high) / 2
        structure = structure_for_keep(masks, heads, middle)
        if price(structure) <= limit:
            low, best = middle, structure
        else:
            high = middle
    return low, best


def kept_channels(mask: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """(heads, head_dim) indices: each head's ``head_dim`` channels of largest mask magnitude, in order."""
    return mask.view(heads, -1).abs().topk(head_dim, dim=1).indices.sort(dim=1).values


def kept_units(mask: torch.Tensor, units: int) -> torch.Tensor:
    """The ``units`` hidden units of largest mask magnitude, in order."""
    return mask.abs().topk(units).indices.sort().values


def slice_to_budget(
    model: nn.Module,
    masks: Mapping[tuple[str, str], torch.Tensor],
    costs: CostModel,
    limit: float,
    latency: WidthTable | None = None,
) -> tuple[nn.Module, PrunedStructure, float, int]:
    """ViT-Slim's model for a budget: ``model`` (``costs`` is its cost model) sliced at the largest keep share whose
    MACs fit ``limit`` or, given ``latency``, whose predicted milliseconds do; with its structure, that keep share
    and its MACs. ``ValueError`` when nothing fits."""
    slim_costs = SlimCosts.of(model, costs)
    heads = slim_costs.heads
    if latency is None:
        keep, structure = structure_for_budget(masks, heads, slim_costs.macs, limit)
    else:

        def predicted_ms(structure: PrunedStructure) -> float:
            return latency.predict_ms(part_widths(structure, heads))

        keep, structure = structure_for_budget(masks, heads, predicted_ms, limit, unit="ms predicted")
    return slice_model(model, masks, structure), structure, keep, slim_costs.macs(structure)


@torch.no_grad()
def slice_model(
    model: nn.Module, masks: Mapping[tuple[str, str], torch.Tensor], structure: Mapping[str, PrunedBlock]
) -> nn.Module:
    """``model`` (plain, masks detached) sliced to ``structure``, with the mask values folded in; in place.

    Each head keeps its ``head_dim`` channels of largest mask magnitude, each MLP its
    ``mlp_hidden`` units of largest magnitude. The result computes what the masked model
    computes with every other mask entry at zero.
    """
    blocks = prunable_blocks(model)
    dense = {name: (copy_layers(blocks[name].attn), copy_layers(blocks[name].mlp)) for name in structure}
    restructure_blocks(model, structure)
    for name, kept in structure.items():
        (qkv, proj), (fc1, fc2) = dense[name]
        attn, mlp = blocks[name].attn, blocks[name].mlp
        heads = attn.num_heads
        head_dim = qkv.out_features // (3 * heads)
        mask = masks[name, ATTENTION].view(heads, head_dim)
        channels = kept_channels(mask, heads, kept.head_dim)  # each head its own
        rows = (channels + head_dim * torch.arange(heads)[:, None]).flatten()  # positions within q (k, v alike)
        gain = mask.gather(1, channels).flatten()
        temperature = math.sqrt(kept.head_dim / head_dim)  # keeps the original 1/sqrt(head_dim) scaling
        for part, scale in enumerate((gain * temperature, gain, gain)):  # q, k, v
            source, target = rows + part * heads * head_dim, slice(part * len(rows), (part + 1) * len(rows))
            attn.qkv.weight[target] = qkv.weight[source] * scale[:, None]
            if qkv.bias is not None:
                attn.qkv.bias[target] = qkv.bias[source] * scale
        attn.proj.weight.copy_(proj.weight[:, rows])
        if proj.bias is not None:
            attn.proj.bias.copy_(proj.bias)
        units = kept_units(masks[name, MLP], kept.mlp_hidden)
        mlp.fc1.weight.copy_(fc1.weight[units])
        if fc1.bias is not None:
            mlp.fc1.bias.copy_(fc1.bias[units])
        mlp.fc2.weight.copy_(fc2.weight[:, units] * masks[name, MLP][units])
        if fc2.bias is not None:
            mlp.fc2.bias.copy_(fc2.bias)
    return model


def copy_layers(module: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """Copies of an attention's (qkv, proj) or an MLP's (fc1, fc2), taken before slicing replaces them."""
    first, second = (module.qkv, module.proj) if isinstance(module, Attention) else (module.fc1, module.fc2)
    return copy.deepcopy(first), copy.deepcopy(second)


def zero_pruned(
    masks: Mapping[tuple[str, str], torch.Tensor], structure: Mapping[str, PrunedBlock], heads: Mapping[str, int]
) -> dict[tuple[str, str], torch.Tensor]:
    """The masks with every entry ``structure`` prunes set to zero (what the sliced model computes)."""
    result = {}
    for (name, kind), mask in masks.items():
        kept = torch.zeros_like(mask)
        if kind == ATTENTION:
            per_head = mask.view(heads[name], -1)
            channels = kept_channels(mask, heads[name], structure[name].head_dim)
            kept.view(heads[name], -1).scatter_(1, channels, per_head.gather(1, channels))
        else:
            units = kept_units(mask, structure[name].mlp_hidden)
            kept[units] = mask[units]
        result[name, kind] = kept
    return result
