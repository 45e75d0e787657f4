"""What a pruned ViT keeps, shared by ViT-Slim and OFB: per block its heads, channels per head and MLP units.

A ``PrunedStructure`` maps block paths to ``PrunedBlock``; ``restructure_blocks`` gives a
timm ViT those sizes (still plain timm modules, loadable with timm alone), and
``block_macs`` prices one block. ``prunable_blocks`` finds the blocks both methods prune.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from timm.layers import Mlp
from timm.models.vision_transformer import Attention
from torch import nn


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
        attn, mlp = blocks[name].attn, blocks[name].mlp
        attn.num_heads = kept.heads or attn.num_heads
        width = attn.num_heads * kept.head_dim
        attn.qkv = _linear(attn.qkv.in_features, 3 * width, attn.qkv)
        attn.proj = _linear(width, attn.proj.out_features, attn.proj)
        attn.head_dim, attn.attn_dim, attn.scale = kept.head_dim, width, kept.head_dim**-0.5
        mlp.fc1 = _linear(mlp.fc1.in_features, kept.mlp_hidden, mlp.fc1)
        mlp.fc2 = _linear(kept.mlp_hidden, mlp.fc2.out_features, mlp.fc2)
    return model
