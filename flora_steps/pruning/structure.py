"""What a pruned ViT keeps, shared by ViT-Slim and OFB: per block its heads, channels per head and MLP units.

A ``PrunedStructure`` maps block paths to ``PrunedBlock``; ``restructure_blocks`` gives a
timm ViT those sizes (still plain timm modules, loadable with timm alone), and
``block_macs`` prices one block. ``prunable_blocks`` finds the blocks both methods prune.
``timed_parts`` gives the latency table each block's attention and MLP at a grid of
widths, ``timed_models`` the whole model pruned uniformly at each ratio of that grid,
and ``part_widths`` a structure's widths in the table's terms.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from timm.layers import Mlp
from timm.models.vision_transformer import Attention
from torch import nn

from ..core.latency import ATTENTION, MLP, PartOptions
from ..core.macs import CostModel


@dataclass(frozen=True)
class PrunedBlock:
    """What a pruned transformer block keeps: channels per attention head, MLP hidden units and (OFB) heads.

    ``heads`` is ``None`` when the block keeps every head (ViT-Slim).
    """

    head_dim: int
    mlp_hidden: int
    heads: int | None = None


#: Block path (e.g. ``blocks.3``) -> what it keeps.
PrunedStructure = dict[str, PrunedBlock]


def prunable_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Every block with timm's ``Attention`` (no q/k norm) and ``Mlp``, by path: what ViT-Slim and OFB prune."""
    blocks = {}
    for name, module in model.named_modules():
        attn, mlp = getattr(module, "attn", None), getattr(module, "mlp", None)
        if isinstance(attn, Attention) and isinstance(mlp, Mlp):
            if not isinstance(attn.q_norm, nn.Identity):
                raise ValueError(f"{name}.attn normalises q and k per head: its channels cannot be sliced")
            blocks[name] = module
    if not blocks:
        raise ValueError("the model has no blocks with timm Attention and Mlp to prune")
    return blocks


def block_macs(tokens: int, dim: int, heads: int, head_dim: int, mlp_hidden: int) -> int:
    """MACs of one image through a ViT block: qkv, QKᵀ and AV, proj, and the two MLP layers."""
    attention = tokens * dim * 3 * heads * head_dim + 2 * heads * tokens * tokens * head_dim
    return attention + tokens * heads * head_dim * dim + 2 * tokens * dim * mlp_hidden


def _linear(in_features: int, out_features: int, like: nn.Linear) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=like.bias is not None, device=like.weight.device)


def resize_attention(attn: Attention, head_dim: int, heads: int | None = None, dim: int | None = None) -> Attention:
    """``attn`` with ``heads`` heads (``None``: as many as it has) of ``head_dim`` channels on ``dim`` embedding
    channels (``None``: as many as it has), in place (new layers uninitialised); returns it."""
    attn.num_heads = heads or attn.num_heads
    width, dim = attn.num_heads * head_dim, dim or attn.qkv.in_features
    attn.qkv = _linear(dim, 3 * width, attn.qkv)
    attn.proj = _linear(width, dim, attn.proj)
    attn.head_dim, attn.attn_dim, attn.scale = head_dim, width, head_dim**-0.5
    return attn


def resize_mlp(mlp: Mlp, hidden: int, dim: int | None = None) -> Mlp:
    """``mlp`` with ``hidden`` hidden units on ``dim`` embedding channels (``None``: as many as it has), in place
    (new layers uninitialised); returns it."""
    dim = dim or mlp.fc1.in_features
    mlp.fc1 = _linear(dim, hidden, mlp.fc1)
    mlp.fc2 = _linear(hidden, dim, mlp.fc2)
    return mlp


def restructure_blocks(model: nn.Module, structure: Mapping[str, PrunedBlock]) -> nn.Module:
    """Give ``model``'s blocks the sizes of ``structure``, in place (new layers uninitialised); returns it.

    Attention keeps ``heads`` heads (all when ``None``) with ``head_dim`` channels each
    (timm's ``attn_head_dim``), the MLP ``mlp_hidden`` units: still plain timm modules,
    loadable with timm alone.
    An empty ``structure`` leaves any model (Swin, TinyViT, ...) as it is.
    """
    if not structure:
        return model
    blocks = prunable_blocks(model)
    for name, kept in structure.items():
        resize_attention(blocks[name].attn, kept.head_dim, kept.heads)
        resize_mlp(blocks[name].mlp, kept.mlp_hidden)
    return model


def _widths(full: int, ratios: Iterable[float]) -> list[int]:
    """``ratios`` of ``full`` units, the narrowest slice (one unit) and ``full``."""
    return sorted({max(1, round(ratio * full)) for ratio in ratios if 0 < ratio < 1} | {1, full})


def timed_parts(model: nn.Module, costs: CostModel, ratios: Iterable[float]) -> dict[str, PartOptions]:
    """Each prunable block's attention (``<block>.attn``: every head kept, ``ratio`` of its channels per head, as
    ViT-Slim prunes) and MLP (``<block>.mlp``: ``ratio`` of its hidden units) at each ratio, at one channel per head
    or one unit (ViT-Slim's narrowest slice) and in full, for the
    latency table (``costs``: the model's, for the tokens); blocks of the same shape share their modules. Empty for
    a model without prunable blocks."""
    try:
        blocks = prunable_blocks(model)
    except ValueError:
        return {}
    ratios, shared, parts = list(ratios), {}, {}
    for name, block in blocks.items():
        attn, mlp = block.attn, block.mlp
        dim, heads, hidden = attn.qkv.in_features, attn.num_heads, mlp.fc1.out_features
        key = (dim, heads, attn.head_dim, hidden)
        if key not in shared:
            shared[key] = (
                {heads * d: resize_attention(copy.deepcopy(attn), d) for d in _widths(attn.head_dim, ratios)},
                {h: resize_mlp(copy.deepcopy(mlp), h) for h in _widths(hidden, ratios)},
            )
        attentions, mlps = shared[key]
        tokens = costs.layers[f"{name}.attn.qkv"].tokens
        parts[f"{name}.attn"] = PartOptions(ATTENTION, dim, tokens, attentions)
        parts[f"{name}.mlp"] = PartOptions(MLP, dim, tokens, mlps)
    return parts


def timed_models(model: nn.Module, ratios: Iterable[float]) -> list[tuple[nn.Module, dict[str, int]]]:
    """``model`` with every prunable block cut to each of ``ratios`` (0 < ratio < 1; its channels per head and MLP
    units, rounded as ``timed_parts`` rounds them), each with its parts' widths (``part_widths``), for the latency
    table's pruned fixed part; empty for a model without prunable blocks."""
    try:
        blocks = prunable_blocks(model)
    except ValueError:
        return []
    heads = {name: block.attn.num_heads for name, block in blocks.items()}
    models = []
    for ratio in sorted({ratio for ratio in ratios if 0 < ratio < 1}):
        structure = {
            name: PrunedBlock(
                head_dim=max(1, round(ratio * block.attn.head_dim)),
                mlp_hidden=max(1, round(ratio * block.mlp.fc1.out_features)),
            )
            for name, block in blocks.items()
        }
        models.append((restructure_blocks(copy.deepcopy(model), structure), part_widths(structure, heads)))
    return models


def block_heads(model: nn.Module) -> dict[str, int]:
    """Each prunable block's attention heads; empty for a model without prunable blocks."""
    try:
        return {name: block.attn.num_heads for name, block in prunable_blocks(model).items()}
    except ValueError:
        return {}


def part_widths(structure: Mapping[str, PrunedBlock], heads: Mapping[str, int]) -> dict[str, int]:
    """A structure's widths as the latency table's parts have them: ``<block>.attn`` its channels (heads times
    channels per head; ``heads`` each block's, where the structure keeps every head), ``<block>.mlp`` its units."""
    widths = {}
    for name, kept in structure.items():
        widths[f"{name}.attn"] = (kept.heads or heads[name]) * kept.head_dim
        widths[f"{name}.mlp"] = kept.mlp_hidden
    return widths
