"""OFB (Once for Both, Ye et al., CVPR 2024): bi-masks, the adaptive one-hot and MACs losses, progressive
masked image modelling, progressive pruning, and physical slicing of a timm ViT.

Prunable modules: each block's attention (a joint grid of head counts x channels per
head), each block's MLP hidden width, and the embedding width, shared by every block.
A module has one importance score ``S`` per unit and one logit ``α`` per candidate
width (``BiMask``); its mask is

    m = λ·σ(S) + (1 − λ)·V(α),

where ``V`` gives the unit of the r-th largest score the probability, under
``p = softmax(α)`` over the module's live candidates, that the chosen width keeps more
than r units (the softmax-weighted mixture of prefix masks). Attention ranks heads by
their summed σ(S) and channels within each head by S; its mask multiplies q, k and v,
per head and channel. The MLP's mask multiplies the first layer's output (before the
activation). λ falls linearly from 0.99 to 0.1 (``ramp``).

The embedding mask multiplies the whole residual stream (the embedded tokens and every
block's two outputs), and every LayerNorm takes its statistics over the channels
weighted by ``V`` and masks its output by ``V``. (The released code masks the embedding
at the input only, so its blocks write into channels that slicing then removes; here
the searched model is the model that gets sliced.)

Losses: the adaptive one-hot loss per unfinished module (``BiMask.onehot_loss``), entropy of
``p`` plus ``cot(π·ρ)/K`` (ρ: the variance of ``p`` scaled to [0, 1]; clamped to
[1e-6, 1 − 1e-6] only to stay finite, so it has a gradient from the start), with L1
on its σ(S); the MACs loss
``((E[MACs] − target) / dense)²``, where ``E[MACs]`` (``OFBSearch.expected_macs``) is the cost model at the
expected widths (exact: MACs are multilinear in independent modules' widths).

Progressive pruning (``OFBSearch.prune``): a candidate whose probability falls to
``threshold / K`` or below dies; units no live candidate keeps are sliced out
physically, with their AdamW state (``slice_parameter``). A module with one candidate
left has decided: its λ is frozen at that moment (``BiMask.frozen_weight``), so its mask
is a trainable per-unit gain from then on, as in the released code. ``finalise`` takes
each module's only (or most probable) width, slices, folds the mask values and the
original attention temperature into the weights and returns a plain, smaller timm ViT
that computes exactly what the masked model computes. No rule moves a width towards a
MACs target after the search: the MACs loss alone steers the widths, and the model
lands where progressive pruning leaves it.

PMIM: a share of patch tokens (rising from 5% to 25%) is replaced by a learnt mask
token before the position embedding (as SimMIM does); a light decoder (1x1 conv and
PixelShuffle) reconstructs the locally normalised pixels from the final tokens, L1 on
the masked patches (``reconstruction_loss``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import LayerScale, Mlp
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn

from ..core.latency import StructureOptions, StructureTable
from ..core.macs import CostModel
from .structure import PrunedBlock, resize_attention, resize_mlp, restructure_blocks

EMBED = "embed"
ATTENTION, MLP = "attention", "mlp"


def survival(probabilities: torch.Tensor, grids: Sequence[torch.Tensor], units: Sequence[int]) -> torch.Tensor:
    """``V``: for each unit position (rank along every axis), the probability that the width keeps it.

    ``probabilities`` has one entry per grid cell (one axis per grid); ``grids`` the
    candidate widths of each axis; ``units`` the unit count of each axis.
    """
    prefixes = [
        (torch.arange(n, device=g.device)[:, None] < g[None, :]).to(probabilities) for n, g in zip(units, grids)
    ]
    if len(prefixes) == 1:
        return prefixes[0] @ probabilities
    return prefixes[0] @ probabilities @ prefixes[1].T


class BiMask(nn.Module):
    """One prunable module's bi-mask: a score per unit (``scores``, 1 or 2 axes) and a logit per candidate width.

    ``grids`` holds each axis's candidate widths (ascending unit counts); the logits
    have one entry per grid cell, ``alive`` marks the candidates progressive pruning
    has not removed. The units along an axis can be fewer than the original
    (``units``): pruning slices them away once no live candidate keeps them.
    """

    def __init__(self, units: Sequence[int], grids: Sequence[Sequence[int]], generator: torch.Generator) -> None:
        super().__init__()
        if len(units) != len(grids) or not 1 <= len(units) <= 2:
            raise ValueError("a bi-mask has one or two axes, each with its grid of widths")
        for n, grid in zip(units, grids):
            if not grid or list(grid) != sorted(set(grid)) or grid[0] < 1 or grid[-1] > n:
                raise ValueError(f"candidate widths {list(grid)} must be distinct, ascending and within 1..{n}")
        shape = tuple(len(g) for g in grids)
        self.scores = nn.Parameter(torch.randn(*units, generator=generator).mul_(0.2).clamp_(-0.4, 0.4))
        self.logits = nn.Parameter(torch.rand(*shape, generator=generator))
        for axis, grid in enumerate(grids):
            self.register_buffer(f"grid{axis}", torch.tensor(list(grid)), persistent=True)
        self.register_buffer("alive", torch.ones(shape, dtype=torch.bool), persistent=True)
        self.register_buffer("frozen_weight", torch.tensor(float("nan")), persistent=True)

    @property
    def grids(self) -> list[torch.Tensor]:
        return [getattr(self, f"grid{axis}") for axis in range(self.scores.dim())]

    @property
    def live(self) -> int:
        """K: how many candidates are alive."""
        return int(self.alive.sum())

    @property
    def finished(self) -> bool:
        return self.live == 1

    def probabilities(self) -> torch.Tensor:
        """softmax(α) over the live candidates (dead ones 0), in the grid's shape."""
        logits = self.logits.masked_fill(~self.alive, float("-inf"))
        return logits.flatten().softmax(0).view_as(logits)

    def sizes(self) -> torch.Tensor:
        """Units each candidate keeps (the product of its widths over the axes), in the grid's shape."""
        grids = self.grids
        return grids[0].to(torch.float32) if len(grids) == 1 else grids[0][:, None].float() * grids[1][None, :].float()

    def expected_units(self) -> torch.Tensor:
        """E[units kept] under softmax(α): for attention, heads x channels per head."""
        return (self.probabilities() * self.sizes()).sum()

    def ranks(self) -> torch.Tensor:
        """Each unit's rank (0: most important) along its axes, stacked: heads by summed σ(S), channels within a
        head by S."""
        if self.scores.dim() == 1:
            return _rank(self.scores.detach())[None]
        heads = _rank(self.scores.detach().sigmoid().sum(1))
        return torch.stack([heads[:, None].expand_as(self.scores), _rank(self.scores.detach())])

    def prefix_mask(self) -> torch.Tensor:
        """``V(α)`` at every unit: the survival probability of its rank."""
        values = survival(self.probabilities(), self.grids, self.scores.shape)
        ranks = self.ranks()
        return values[ranks[0]] if self.scores.dim() == 1 else values[ranks[0], ranks[1]]

    def forward(self, weight: float) -> torch.Tensor:
        """The bi-mask ``λ·σ(S) + (1 − λ)·V(α)``, one value per unit; λ is ``weight``, or the module's own λ
        frozen when it decided (``decide``)."""
        if not torch.isnan(self.frozen_weight):
            weight = float(self.frozen_weight)
        return weight * self.scores.sigmoid() + (1 - weight) * self.prefix_mask()

    def decide(self, weight: float) -> None:
        """Freeze λ at ``weight``: the module has one candidate left (the released code's per-module ``w_p``)."""
        self.frozen_weight.fill_(weight)

    def onehot_loss(self) -> torch.Tensor:
        """The adaptive one-hot loss: entropy of p plus cot(π·ρ)/K, ρ = variance of p scaled to [0, 1].

        The released code does not clamp ρ; here it is clamped to [1e-6, 1 − 1e-6] only to
        keep the cotangent finite (it has a gradient from the first step on any grid)."""
        live = self.probabilities()[self.alive]
        count = len(live)
        entropy = -(live * live.clamp_min(1e-12).log()).sum()
        spread = ((live - 1 / count) ** 2).sum() / (1 - 1 / count)
        spread = spread.clamp(1e-6, 1 - 1e-6)
        return entropy + torch.tan(math.pi / 2 - math.pi * spread) / count

    def live_limits(self) -> tuple[int, ...]:
        """Per axis, the largest width a live candidate keeps (the units beyond it can go)."""
        if self.alive.dim() == 1:
            return (int(self.grid0[self.alive].max()),)
        return int(self.grid0[self.alive.any(1)].max()), int(self.grid1[self.alive.any(0)].max())

    def most_probable(self) -> tuple[int, ...]:
        """The grid cell of the largest probability."""
        return self._cell_of_max(self.probabilities())

    def _cell_of_max(self, values: torch.Tensor) -> tuple[int, ...]:
        flat = int(values.flatten().argmax())
        return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), self.alive.shape))

    def widths(self, cell: tuple[int, ...]) -> tuple[int, ...]:
        """The widths (units per axis) of one grid cell."""
        return tuple(int(grid[i]) for grid, i in zip(self.grids, cell))


def _rank(values: torch.Tensor) -> torch.Tensor:
    return values.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)


def kept_units(mask: BiMask, widths: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """The units that keep ``widths`` per axis, those of the best ranks, in their original order: one index
    tensor for one axis; (heads, each kept head's channels) for attention."""
    ranks = mask.ranks()
    if len(widths) == 1:
        return (torch.nonzero(ranks[0] < widths[0]).flatten(),)
    heads = torch.nonzero(ranks[0][:, 0] < widths[0]).flatten()
    channels = torch.nonzero(ranks[1][heads] < widths[1])[:, 1].view(len(heads), widths[1])
    return heads, channels


Take = Callable[[torch.Tensor], torch.Tensor]


def slice_parameter(module: nn.Module, name: str, take: Take, optimizer: torch.optim.Optimizer | None) -> None:
    """Replace ``module.<name>`` by ``take`` of it, and give its optimizer state (every tensor of its shape) the
    same ``take``: the next step is the step the unsliced parameter would take on the kept entries."""
    old = getattr(module, name)
    new = nn.Parameter(take(old.detach()).clone(), requires_grad=old.requires_grad)
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        if old in optimizer.state:
            state = optimizer.state.pop(old)
            optimizer.state[new] = {
                key: take(value).clone() if torch.is_tensor(value) and value.shape == old.shape else value
                for key, value in state.items()
            }
    setattr(module, name, new)


def _rows(index: torch.Tensor) -> Take:
    return lambda tensor: tensor.index_select(0, index.to(tensor.device))


def _columns(index: torch.Tensor) -> Take:
    return lambda tensor: tensor.index_select(tensor.dim() - 1, index.to(tensor.device))


def _slice_linear(layer: nn.Linear, optimizer, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None):
    if rows is not None:
        slice_parameter(layer, "weight", _rows(rows), optimizer)
        if layer.bias is not None:
            slice_parameter(layer, "bias", _rows(rows), optimizer)
        layer.out_features = len(rows)
    if columns is not None:
        slice_parameter(layer, "weight", _columns(columns), optimizer)
        layer.in_features = len(columns)


def _slice_norm(norm: nn.LayerNorm, channels: torch.Tensor, optimizer) -> None:
    for name in ("weight", "bias"):
        if getattr(norm, name, None) is not None:
            slice_parameter(norm, name, _rows(channels), optimizer)
    norm.normalized_shape = (len(channels),)


def searchable_blocks(model: nn.Module) -> dict[str, Block]:
    """The blocks OFB prunes, by path: a timm ``VisionTransformer`` of plain ``Block``s whose pooling, norms
    and heads slicing understands. ``ValueError`` naming what does not fit otherwise."""
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"OFB prunes timm VisionTransformer models, not {type(model).__name__}")
    if (
        model.attn_pool is not None
        or not isinstance(model.fc_norm, nn.Identity)
        or model.global_pool not in ("token", "avg")
    ):
        raise ValueError("OFB needs class-token or average pooling without an fc_norm or attention pooling")
    if not isinstance(model.norm_pre, nn.Identity) or not isinstance(model.norm, nn.LayerNorm):
        raise ValueError("OFB needs a final LayerNorm and no pre-norm")
    if not isinstance(getattr(model.patch_embed, "norm", None), (nn.Identity, type(None))):
        raise ValueError("OFB needs a patch embedding without a norm")
    blocks = {}
    for index, block in enumerate(model.blocks):
        fits = (
            type(block) is Block
            and type(block.attn) is Attention
            and isinstance(block.mlp, Mlp)
            and isinstance(block.norm1, nn.LayerNorm)
            and isinstance(block.norm2, nn.LayerNorm)
            and isinstance(block.attn.q_norm, nn.Identity)
            and isinstance(block.attn.norm, nn.Identity)
            and block.attn.gate is None
            and isinstance(block.mlp.norm, nn.Identity)
        )
        if not fits:
            raise ValueError(f"blocks.{index} is not a plain timm Block (Attention, Mlp, LayerNorms)")
        blocks[f"blocks.{index}"] = block
    return blocks


@dataclass(frozen=True)
class OFBGrids:
    """Candidate widths as ratios of each module's full size (rounded to whole units, at least 1)."""

    heads: Sequence[float]
    head_dim: Sequence[float]
    mlp: Sequence[float]
    embed: Sequence[float]

    @staticmethod
    def widths(ratios: Iterable[float], units: int) -> list[int]:
        return sorted({max(1, round(r * units)) for r in ratios})


@dataclass(frozen=True)
class OFBCosts:
    """MACs of a ViT at any OFB structure (embedding width, and per block heads, channels per head, MLP units).

    Linear in the embedding width outside the blocks (the patch projection and the
    head), and per block ``4·T·C·h·d + 2·T²·h·d + 2·T·C·M``: multilinear in the
    modules' widths, so the expected MACs of independent width distributions are these
    MACs at the expected widths.
    """

    tokens: dict[str, int]  # block -> tokens per image
    embed_dim: int
    per_channel: float  # MACs outside the blocks per embedding channel
    other_macs: int  # MACs that no width changes (e.g. a hybrid's convolution stem)

    @classmethod
    def of(cls, model: VisionTransformer, costs: CostModel) -> OFBCosts:
        blocks = searchable_blocks(model)
        tokens = {name: costs.layers[f"{name}.attn.qkv"].tokens for name in blocks}
        embed_dim = model.embed_dim
        proj = model.patch_embed.proj
        patch = model.patch_embed.num_patches * proj.in_channels * math.prod(proj.kernel_size) // proj.groups
        head = sum(
            layer.tokens * layer.out_features
            for name, layer in costs.layers.items()
            if not name.startswith("blocks.") and layer.in_features == embed_dim
        )
        inside = sum(
            _block_macs(tokens[n], embed_dim, b.attn.num_heads * b.attn.head_dim, b.mlp.fc1.out_features)
            for n, b in blocks.items()
        )
        other = costs.dense_macs - inside - (patch + head) * embed_dim
        return cls(tokens, embed_dim, float(patch + head), other)

    def macs(self, embed_dim: float, blocks: Mapping[str, tuple[float, float]]) -> float:
        """MACs at an embedding width and, per block, (heads x channels per head, MLP units); widths may be
        expectations (then this is the expected MACs)."""
        inside = sum(_block_macs(self.tokens[n], embed_dim, attention, mlp) for n, (attention, mlp) in blocks.items())
        return self.other_macs + self.per_channel * embed_dim + inside

    def structure_macs(self, embed_dim: int, structure: Mapping[str, PrunedBlock]) -> int:
        """MACs of a sliced structure (``PrunedBlock`` with heads)."""
        blocks = {name: (kept.heads * kept.head_dim, kept.mlp_hidden) for name, kept in structure.items()}
        return round(self.macs(embed_dim, blocks))

    unit = "MACs"

    def expected(self, search: OFBSearch) -> torch.Tensor:
        """E[MACs] under every module's softmax(α) (differentiable): the MACs at the expected widths."""
        return self.macs(*search.expected_widths())

    def price(self, embed_dim: int, structure: Mapping[str, PrunedBlock]) -> float:
        return self.structure_macs(embed_dim, structure)


class OFBPrice(Protocol):
    """What OFB's budget limits: MACs (``OFBCosts``) or the latency table's prediction (``OFBLatency``)."""

    unit: str

    def expected(self, search: OFBSearch) -> torch.Tensor:
        """The expected cost under every module's softmax(α), differentiable: the search's cost loss."""
        ...

    def price(self, embed_dim: int, structure: Mapping[str, PrunedBlock]) -> float:
        """The cost of a sliced structure (``PrunedBlock`` with heads)."""
        ...


class OFBLatency:
    """OFB's cost in milliseconds per batch as the latency table predicts it (``StructureTable``): the fixed part
    at the embedding width plus each block's attention and MLP at theirs.

    Latency is not multilinear in the widths, so the expected latency is the full sum
    over the candidates, ``Σ_e p(e) · (fixed(e) + Σ_blocks Σ_c p(c) · part(e, c))``
    (independent modules): exact for the table's values. Built from the search before
    progressive pruning, whose grids only ever lose their widest candidates."""

    unit = "ms"

    def __init__(self, table: StructureTable, search: OFBSearch) -> None:
        self.table = table
        embeds = search.masks[EMBED].grids[0].tolist()
        self._values: dict[str, torch.Tensor] = {EMBED: torch.tensor([table.fixed_ms(e) for e in embeds])}
        for name in search.blocks:
            heads, head_dims = (grid.tolist() for grid in search.masks[_key(name, ATTENTION)].grids)
            self._values[_key(name, ATTENTION)] = torch.tensor(
                [[[table.attention_ms(name, e, h, d) for d in head_dims] for h in heads] for e in embeds]
            )
            units = search.masks[_key(name, MLP)].grids[0].tolist()
            self._values[_key(name, MLP)] = torch.tensor([[table.mlp_ms(name, e, u) for u in units] for e in embeds])

    def expected(self, search: OFBSearch) -> torch.Tensor:
        embed = search.masks[EMBED].probabilities()
        count = len(embed)
        values = {key: value.to(embed.device) for key, value in self._values.items()}
        total = values[EMBED][:count]
        for name in search.blocks:
            attention = search.masks[_key(name, ATTENTION)].probabilities()
            mlp = search.masks[_key(name, MLP)].probabilities()
            heads, head_dims = attention.shape
            total = total + torch.einsum(
                "ehd,hd->e", values[_key(name, ATTENTION)][:count, :heads, :head_dims], attention
            )
            total = total + values[_key(name, MLP)][:count, : len(mlp)] @ mlp
        return (embed * total).sum()

    def price(self, embed_dim: int, structure: Mapping[str, PrunedBlock]) -> float:
        blocks = {name: (kept.heads, kept.head_dim, kept.mlp_hidden) for name, kept in structure.items()}
        return self.table.predict_ms(embed_dim, blocks)


def _grid_with_full(ratios: Iterable[float], units: int) -> list[int]:
    return sorted({*OFBGrids.widths(ratios, units), units})


#: A model to time whole at one embedding width, with each block's (heads, channels per head, MLP units).
TimedModel = tuple[nn.Module, dict[str, tuple[int, int, int]]]


def timed_structures(
    vit: VisionTransformer, grids: OFBGrids, costs: CostModel, embed_points: int
) -> tuple[dict[str, StructureOptions], dict[int, nn.Module], dict[int, TimedModel]]:
    """What the latency table times for OFB: every block's attention at each (embedding width, heads, channels per
    head) and MLP at each (embedding width, units) of the candidate grids (the full widths included), the model
    less its attentions and MLPs (its *skeleton*) at each embedding width, and the whole model narrowed at each
    embedding width but the full one (each block keeps every head, and the channels per head and units at the same
    place of their grids as the embedding width in its grid), for the residual. Embedding widths: ``embed_points``
    of the grid's, evenly spaced, the narrowest and the full one included (the table is linear between them).
    Blocks of one shape share their options; ``ValueError`` for a model OFB cannot prune."""
    blocks = searchable_blocks(vit)
    embeds = _grid_with_full(grids.embed, vit.embed_dim)
    picked = np.unique(np.linspace(0, len(embeds) - 1, max(2, min(embed_points, len(embeds)))).round().astype(int))
    timed = [embeds[i] for i in picked]
    shared: dict[tuple[int, ...], StructureOptions] = {}
    options, narrowed = {}, {embed: {} for embed in timed[:-1]}
    for name, block in blocks.items():
        attn, mlp = block.attn, block.mlp
        tokens = costs.layers[f"{name}.attn.qkv"].tokens
        key = (tokens, attn.num_heads, attn.head_dim, mlp.fc1.out_features)
        heads, head_dims = _grid_with_full(grids.heads, attn.num_heads), _grid_with_full(grids.head_dim, attn.head_dim)
        units = _grid_with_full(grids.mlp, mlp.fc1.out_features)
        if key not in shared:
            shared[key] = StructureOptions(
                tokens,
                {
                    (e, h, d): resize_attention(copy.deepcopy(attn), d, h, e)
                    for e in timed
                    for h in heads
                    for d in head_dims
                },
                {(e, u): resize_mlp(copy.deepcopy(mlp), u, e) for e in timed for u in units},
            )
        options[name] = shared[key]
        for index, embed in zip(picked, timed[:-1], strict=False):
            place = index / (len(embeds) - 1)
            narrowed[embed][name] = (heads[-1], _at(head_dims, place), _at(units, place))
    models = {embed: (narrowed_model(vit, embed, widths), widths) for embed, widths in narrowed.items()}
    return options, {embed: skeleton(vit, embed) for embed in timed}, models


def _at(grid: Sequence[int], place: float) -> int:
    """The value at ``place`` (0 to 1) along ``grid``."""
    return grid[round(place * (len(grid) - 1))]


def narrowed_model(vit: VisionTransformer, embed_dim: int, widths: Mapping[str, tuple[int, int, int]]) -> nn.Module:
    """A copy of ``vit`` at embedding width ``embed_dim`` with each block's (heads, channels per head, MLP units)
    of ``widths`` (placeholder weights: a model to time)."""
    structure = {name: PrunedBlock(head_dim, units, heads) for name, (heads, head_dim, units) in widths.items()}
    return restructure_blocks(restructure_embedding(copy.deepcopy(vit), embed_dim), structure)


class _Passthrough(nn.Module):
    """An attention or MLP that does nothing: its input, whatever the block passes with it."""

    def forward(self, x: torch.Tensor, **_: object) -> torch.Tensor:
        return x


def skeleton(vit: VisionTransformer, embed_dim: int) -> VisionTransformer:
    """A copy of ``vit`` at embedding width ``embed_dim`` with every block's attention and MLP removed (passed
    through): the norms, sums, patch embedding and head that no attention or MLP width changes."""
    model = restructure_embedding(copy.deepcopy(vit), embed_dim)
    for block in model.blocks:
        block.attn, block.mlp = _Passthrough(), _Passthrough()
    return model


def _block_macs(tokens: int, embed_dim, attention, mlp):
    return 4 * tokens * embed_dim * attention + 2 * tokens * tokens * attention + 2 * tokens * embed_dim * mlp


def masked_layer_norm(norm: nn.LayerNorm, x: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """LayerNorm with statistics over the channels weighted by ``support`` (V of the embedding), output masked
    by it: with a 0/1 support exactly the LayerNorm of the kept channels, zero elsewhere."""
    weights = support / support.sum()
    mean = (x * weights).sum(-1, keepdim=True)
    variance = (((x - mean) ** 2) * weights).sum(-1, keepdim=True)
    normed = (x - mean) * torch.rsqrt(variance + norm.eps)
    if norm.weight is not None:
        normed = normed * norm.weight + norm.bias
    return normed * support


def _box_mean(images: torch.Tensor, window: int) -> torch.Tensor:
    """The mean of each pixel's ``window`` x ``window`` neighbourhood inside the image, per channel: one pass along
    each axis (the box is a rectangle, so its mean is the mean along rows of the means along columns)."""
    pad = window // 2
    rows = F.avg_pool2d(images, (window, 1), 1, (pad, 0), count_include_pad=False)
    return F.avg_pool2d(rows, (1, window), 1, (0, pad), count_include_pad=False)


def local_normalise(images: torch.Tensor, window: int) -> torch.Tensor:
    """Each pixel normalised by the mean and (unbiased) variance of its ``window`` x ``window`` neighbourhood,
    per channel: PMIM's reconstruction target."""
    mean, square = _box_mean(images, window), _box_mean(images**2, window)
    ones = images.new_ones(1, 1, *images.shape[-2:])
    count = F.avg_pool2d(ones, window, 1, window // 2, count_include_pad=True) * window**2  # pixels inside
    variance = ((square - mean**2) * count / (count - 1).clamp_min(1)).clamp_min(0)
    return (images - mean) / (variance + 1e-6).sqrt()


def mim_decoder(embed_dim: int, in_chans: int, scale: int) -> nn.Sequential:
    """PMIM's light decoder: a 1x1 convolution to ``scale² · in_chans`` channels and a PixelShuffle by ``scale``."""
    return nn.Sequential(nn.Conv2d(embed_dim, scale * scale * in_chans, kernel_size=1), nn.PixelShuffle(scale))


def ramp(progress: float, span: float, start: float, end: float) -> float:
    """Linear from ``start`` to ``end`` over ``span`` epochs of ``progress`` (fractional epochs), then ``end``."""
    return end if span <= 0 or progress >= span else start + (end - start) * progress / span


class OFBSearch(nn.Module):
    """A timm ViT with OFB's bi-masks, a mask token and the PMIM decoder: what the ``ofb`` stage trains.

    ``forward(images)`` gives the logits of the masked model; ``forward(images,
    token_mask)`` also replaces the masked patch tokens by the mask token and returns
    (logits, reconstruction loss). ``weight`` (λ) is set by the search schedule.
    """

    def __init__(self, vit: VisionTransformer, grids: OFBGrids, in_chans: int, target_window: int, seed: int) -> None:
        super().__init__()
        blocks = searchable_blocks(vit)
        generator = torch.Generator().manual_seed(seed)
        self.vit, self.target_window, self.weight = vit, target_window, 0.99
        self.masks = nn.ModuleDict()
        self.masks[EMBED] = BiMask([vit.embed_dim], [OFBGrids.widths(grids.embed, vit.embed_dim)], generator)
        self.scales = {}
        for name, block in blocks.items():
            attn, hidden = block.attn, block.mlp.fc1.out_features
            self.masks[_key(name, ATTENTION)] = BiMask(
                [attn.num_heads, attn.head_dim],
                [OFBGrids.widths(grids.heads, attn.num_heads), OFBGrids.widths(grids.head_dim, attn.head_dim)],
                generator,
            )
            self.masks[_key(name, MLP)] = BiMask([hidden], [OFBGrids.widths(grids.mlp, hidden)], generator)
            self.scales[name] = attn.scale  # the original temperature, kept through pruning
        self.blocks = blocks
        self.mask_token = nn.Parameter(torch.zeros(1, 1, vit.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.scale = vit.patch_embed.img_size[0] // vit.patch_embed.grid_size[0]  # pixels per token, each way
        self.decoder = mim_decoder(vit.embed_dim, in_chans, self.scale)

    def mask(self, name: str, kind: str) -> torch.Tensor:
        return self.masks[_key(name, kind)](self.weight)

    def forward(self, images: torch.Tensor, token_mask: torch.Tensor | None = None):
        vit = self.vit
        embed_mask = self.masks[EMBED]
        stream, support = embed_mask(self.weight), embed_mask.prefix_mask()
        x = vit.patch_embed(images)
        if token_mask is not None:
            x = torch.where(token_mask[..., None], self.mask_token.to(x.dtype), x)
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x))) * stream
        for name, block in self.blocks.items():
            x = self._block(name, block, x, stream, support)
        x = masked_layer_norm(vit.norm, x, support)
        logits = vit.forward_head(x)
        if token_mask is None:
            return logits
        return logits, self.reconstruction_loss(images, x[:, vit.num_prefix_tokens :], token_mask)

    def _block(self, name: str, block: Block, x: torch.Tensor, stream: torch.Tensor, support: torch.Tensor):
        attn = block.attn
        batch, tokens, _ = x.shape
        qkv = attn.qkv(masked_layer_norm(block.norm1, x, support))
        qkv = qkv.reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        qkv = qkv * self.mask(name, ATTENTION)[None, None, :, None, :]
        q, k, v = qkv.unbind(0)
        dropout = attn.attn_drop.p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.scales[name])
        y = attn.proj_drop(attn.proj(y.transpose(1, 2).reshape(batch, tokens, -1))) * stream
        x = x + block.drop_path1(block.ls1(y))
        mlp = block.mlp
        hidden = mlp.fc1(masked_layer_norm(block.norm2, x, support)) * self.mask(name, MLP)
        y = mlp.drop2(mlp.fc2(mlp.norm(mlp.drop1(mlp.act(hidden))))) * stream
        return x + block.drop_path2(block.ls2(y))

    def reconstruction_loss(
        self, images: torch.Tensor, patches: torch.Tensor, token_mask: torch.Tensor
    ) -> torch.Tensor:
        """L1 between the decoder's image and the locally normalised input, over the masked patches only."""
        grid = self.vit.patch_embed.grid_size
        features = patches.transpose(1, 2).reshape(len(patches), -1, *grid)
        reconstruction = self.decoder(features)
        target = local_normalise(images.float(), self.target_window)
        pixels = token_mask.view(-1, 1, *grid).repeat_interleave(self.scale, 2).repeat_interleave(self.scale, 3)
        error = (reconstruction.float() - target).abs() * pixels
        return error.sum() / (pixels.sum() * images.shape[1] + 1e-5)

    # --- the search's quantities -------------------------------------------------------------

    def expected_widths(self) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """E[units kept] under every module's softmax(α) (differentiable): the embedding's, and per block the
        attention's (heads x channels per head) and the MLP's."""
        embed = self.masks[EMBED].expected_units()
        blocks = {
            name: (self.masks[_key(name, ATTENTION)].expected_units(), self.masks[_key(name, MLP)].expected_units())
            for name in self.blocks
        }
        return embed, blocks

    def live_candidates(self) -> int:
        return sum(mask.live for mask in self.masks.values())

    # --- progressive pruning and the final model ------------------------------------------------

    @torch.no_grad()
    def prune(self, threshold: float, optimizer: torch.optim.Optimizer | None) -> bool:
        """Kill every live candidate whose probability is at most ``threshold / K`` (never the most probable),
        slice out the units no live candidate keeps, and freeze λ of each module that has just decided.
        Returns whether any parameter was replaced."""
        replaced = False
        for key, mask in self.masks.items():
            if mask.finished:
                continue
            probabilities = mask.probabilities()
            dead = mask.alive & (probabilities <= threshold / mask.live)
            dead[mask.most_probable()] = False
            mask.alive &= ~dead
            if mask.finished:
                mask.decide(self.weight)
            limits = mask.live_limits()
            if limits != tuple(mask.scores.shape):
                self._slice(key, limits, optimizer)
                replaced = True
        return replaced

    @property
    def decided(self) -> bool:
        """Whether every module has one candidate left (the released code's ``finish_search``)."""
        return all(mask.finished for mask in self.masks.values())

    def undecided(self) -> int:
        """How many modules still have more than one candidate."""
        return sum(not mask.finished for mask in self.masks.values())

    def smallest_cost(self, price: OFBPrice) -> float:
        """Cost of the smallest structure the candidate grids allow (live or not: pruning keeps the narrow end)."""
        return price.price(*self.structure({key: (0,) * len(mask.grids) for key, mask in self.masks.items()}))

    def _slice(self, key: str, widths: tuple[int, ...], optimizer) -> None:
        """Keep the top ``widths`` units of one module (weights, scores, grid and optimizer state)."""
        mask = self.masks[key]
        kept = kept_units(mask, widths)
        if key == EMBED:
            self._slice_embedding(kept[0], optimizer)
        else:
            name, kind = _parse(key)
            block = self.blocks[name]
            if kind == MLP:
                _slice_linear(block.mlp.fc1, optimizer, rows=kept[0])
                _slice_linear(block.mlp.fc2, optimizer, columns=kept[0])
            else:
                heads, channels = kept
                attn = block.attn
                rows = (channels + attn.head_dim * heads[:, None]).flatten()
                width = attn.num_heads * attn.head_dim
                _slice_linear(attn.qkv, optimizer, rows=torch.cat([rows + part * width for part in range(3)]))
                _slice_linear(attn.proj, optimizer, columns=rows)
                attn.num_heads, attn.head_dim = widths
                attn.attn_dim = widths[0] * widths[1]
        if len(kept) == 1:
            slice_parameter(mask, "scores", _rows(kept[0]), optimizer)
        else:
            heads, channels = kept
            slice_parameter(mask, "scores", lambda s: s[heads.to(s.device)].gather(1, channels.to(s.device)), optimizer)
        fits = [grid <= width for grid, width in zip(mask.grids, widths)]
        cells = fits[0] if len(fits) == 1 else fits[0][:, None] & fits[1][None, :]
        index = [torch.nonzero(f).flatten() for f in fits]
        take: Take = (lambda t: t[index[0]]) if len(index) == 1 else (lambda t: t[index[0]][:, index[1]])
        slice_parameter(mask, "logits", take, optimizer)
        mask.alive = take(mask.alive & cells)
        for axis, grid in enumerate(mask.grids):
            setattr(mask, f"grid{axis}", grid[index[axis]])

    def _slice_embedding(self, channels: torch.Tensor, optimizer) -> None:
        slice_embedding(self.vit, channels, optimizer)
        slice_parameter(self, "mask_token", _columns(channels), optimizer)
        conv = self.decoder[0]
        slice_parameter(conv, "weight", lambda w: w.index_select(1, channels.to(w.device)), optimizer)
        conv.in_channels = len(channels)

    def shapes(self) -> dict[str, dict[str, list]]:
        """Every module's units per axis, candidate grids and live candidates: what ``restore_shapes`` rebuilds."""
        return {
            key: {
                "units": list(mask.scores.shape),
                "grids": [grid.tolist() for grid in mask.grids],
                "alive": mask.alive.tolist(),
            }
            for key, mask in self.masks.items()
        }

    @torch.no_grad()
    def restore_shapes(self, shapes: Mapping[str, Mapping[str, list]]) -> None:
        """Slice every module to the shapes ``shapes()`` gave (which units stay does not matter: a checkpoint's
        weights load over them next)."""
        for key, shape in shapes.items():
            mask = self.masks[key]
            if tuple(shape["units"]) != tuple(mask.scores.shape):
                self._slice(key, tuple(shape["units"]), None)
            if [grid.tolist() for grid in mask.grids] != shape["grids"]:
                raise ValueError(f"{key}: candidate widths {shape['grids']} are not this model's")
            mask.alive.copy_(torch.tensor(shape["alive"]))

    def choice(self) -> dict[str, tuple[int, ...]]:
        """Every module's grid cell: its only live one, or the most probable."""
        return {key: mask.most_probable() for key, mask in self.masks.items()}

    def structure(self, cells: Mapping[str, tuple[int, ...]]) -> tuple[int, dict[str, PrunedBlock]]:
        """(embedding width, per-block sizes) of a choice of grid cells."""
        (embed,) = self.masks[EMBED].widths(cells[EMBED])
        blocks = {}
        for name in self.blocks:
            heads, head_dim = self.masks[_key(name, ATTENTION)].widths(cells[_key(name, ATTENTION)])
            (hidden,) = self.masks[_key(name, MLP)].widths(cells[_key(name, MLP)])
            blocks[name] = PrunedBlock(head_dim=head_dim, mlp_hidden=hidden, heads=heads)
        return embed, blocks

    @torch.no_grad()
    def cut_to_budget(self, price: OFBPrice, low: float, high: float) -> dict[str, tuple[int, ...]]:
        """The chosen cells (``choice``), narrowed by importance until their cost (``price``) is at most ``high``.

        Not part of OFB: for a search that lands above its budget. Each move narrows one
        module to a smaller cell of its grid and removes the units of the lowest ranks;
        its cost is the summed mask value (λ·σ(S) + (1 − λ)·V) of those units. A move
        that lands in [``low``, ``high``] wins, the cheapest first; otherwise the move with
        the least mask value per unit of cost saved that stays at or above ``low``. ``ValueError``
        when no move gets there.
        """
        cells = self.choice()
        values = {key: mask(self.weight) for key, mask in self.masks.items()}

        def cost(choice: Mapping[str, tuple[int, ...]]) -> float:
            return price.price(*self.structure(choice))

        def kept(key: str, cell: tuple[int, ...]) -> torch.Tensor:
            ranks, widths = self.masks[key].ranks(), self.masks[key].widths(cell)
            inside = ranks[0] < widths[0]
            return inside if len(widths) == 1 else inside & (ranks[1] < widths[1])

        current = cost(cells)
        while current > high:
            landing, towards = [], []
            for key, mask in self.masks.items():
                for cell in map(tuple, torch.nonzero(torch.ones_like(mask.alive)).tolist()):
                    if cell == cells[key] or any(c > now for c, now in zip(cell, cells[key])):
                        continue
                    trial = {**cells, key: cell}
                    after = cost(trial)
                    if after < low:
                        continue
                    lost = float(values[key][kept(key, cells[key]) & ~kept(key, cell)].sum())
                    if after <= high:
                        landing.append((lost, -after, trial))
                    else:
                        towards.append((lost / (current - after), -after, trial))
            if not landing and not towards:
                raise ValueError(
                    f"no narrowing of the searched widths ({current:.6g} {price.unit}) lands in "
                    f"[{low:.6g}, {high:.6g}] {price.unit}"
                )
            _, after, cells = min(landing or towards, key=lambda option: option[:2])
            current = -after
        return cells

    @torch.no_grad()
    def narrow(self, cells: Mapping[str, tuple[int, ...]], optimizer: torch.optim.Optimizer | None) -> None:
        """Make each module's cell in ``cells`` its only live candidate and slice the module to it (its AdamW
        state with it)."""
        for key, cell in cells.items():
            mask = self.masks[key]
            mask.alive.zero_()
            mask.alive[cell] = True
            widths = mask.widths(cell)
            if widths != tuple(mask.scores.shape):
                self._slice(key, widths, optimizer)

    @torch.no_grad()
    def finalise(self, cells: Mapping[str, tuple[int, ...]]) -> tuple[VisionTransformer, int, dict[str, PrunedBlock]]:
        """Slice every module to its cell, fold the masks and the original attention temperature into the
        weights, and return the plain timm ViT with its (embedding width, per-block sizes)."""
        self.narrow(cells, None)
        vit, stream = self.vit, self.masks[EMBED](self.weight)
        proj = vit.patch_embed.proj
        proj.weight.mul_(stream[:, None, None, None])
        if proj.bias is not None:
            proj.bias.mul_(stream)
        for name in ("cls_token", "reg_token", "pos_embed"):
            if getattr(vit, name, None) is not None:
                getattr(vit, name).mul_(stream)
        for name, block in self.blocks.items():
            attn, mlp = block.attn, block.mlp
            gain = self.mask(name, ATTENTION).flatten()
            temperature = self.scales[name] / attn.head_dim**-0.5
            width = attn.attn_dim
            for part, factor in enumerate((gain * temperature, gain, gain)):
                attn.qkv.weight[part * width : (part + 1) * width] *= factor[:, None]
                if attn.qkv.bias is not None:
                    attn.qkv.bias[part * width : (part + 1) * width] *= factor
            attn.scale = attn.head_dim**-0.5
            hidden = self.mask(name, MLP)
            mlp.fc1.weight.mul_(hidden[:, None])
            if mlp.fc1.bias is not None:
                mlp.fc1.bias.mul_(hidden)
            for layer in (attn.proj, mlp.fc2):
                layer.weight.mul_(stream[:, None])
                if layer.bias is not None:
                    layer.bias.mul_(stream)
        embed, structure = self.structure(cells)
        return vit, embed, structure


def _key(block: str, kind: str) -> str:
    return f"{block.replace('.', '_')}__{kind}"


def _parse(key: str) -> tuple[str, str]:
    block, kind = key.split("__")
    return block.replace("_", "."), kind


def module_kind(key: str) -> str:
    """What a key of ``OFBSearch.masks`` prunes: ``EMBED``, ``ATTENTION`` or ``MLP``."""
    return key if key == EMBED else _parse(key)[1]


def slice_embedding(vit: VisionTransformer, channels: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> None:
    """Keep the embedding ``channels`` of a ViT everywhere they occur (patch projection, tokens, position
    embedding, every norm, the blocks' inputs and outputs, layer scales, the heads), with their optimizer state."""
    proj = vit.patch_embed.proj
    slice_parameter(proj, "weight", _rows(channels), optimizer)
    if proj.bias is not None:
        slice_parameter(proj, "bias", _rows(channels), optimizer)
    proj.out_channels = len(channels)
    for name in ("cls_token", "reg_token", "pos_embed"):
        if getattr(vit, name, None) is not None:
            slice_parameter(vit, name, _columns(channels), optimizer)
    for block in searchable_blocks(vit).values():
        _slice_norm(block.norm1, channels, optimizer)
        _slice_norm(block.norm2, channels, optimizer)
        _slice_linear(block.attn.qkv, optimizer, columns=channels)
        _slice_linear(block.attn.proj, optimizer, rows=channels)
        _slice_linear(block.mlp.fc1, optimizer, columns=channels)
        _slice_linear(block.mlp.fc2, optimizer, rows=channels)
        for scale in (block.ls1, block.ls2):
            if isinstance(scale, LayerScale):
                slice_parameter(scale, "gamma", _rows(channels), optimizer)
    _slice_norm(vit.norm, channels, optimizer)
    for head in (vit.head, getattr(vit, "head_dist", None)):
        if isinstance(head, nn.Linear):
            _slice_linear(head, optimizer, columns=channels)
    vit.embed_dim = vit.num_features = vit.head_hidden_size = len(channels)


def restructure_embedding(model: nn.Module, embed_dim: int | None) -> nn.Module:
    """Give a timm ViT the embedding width ``embed_dim``, in place (the weights are placeholders to load into);
    returns it. ``None`` leaves any model as it is."""
    if embed_dim is not None:
        slice_embedding(model, torch.arange(embed_dim), None)
    return model
