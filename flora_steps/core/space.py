"""The low-rank search space: per-layer rank grids, per-block rank tuples, and sampling.

A *block* groups the target layers of one transformer block (``blocks.3.attn.qkv``,
``blocks.3.mlp.fc1``, ``blocks.3.mlp.fc2`` form block ``blocks.3``). A block's
*choice* is a tuple of ranks, one per layer in the block's layer order; a layer at
its full rank is dense. A subnet picks one choice per block.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .lowrank import factorised_is_cheaper, full_rank

Choice = tuple[int, ...]


def rank_grid(in_features: int, out_features: int, ratios: Iterable[float]) -> list[int]:
    """Candidate ranks of one layer: ``ratio * min(in, out)`` for each ratio, ascending.

    Ranks whose factorised cost is not below the dense cost are dropped; the full
    rank (the dense layer) is always a candidate.
    """
    limit = full_rank(in_features, out_features)
    ranks = {max(1, round(ratio * limit)) for ratio in ratios if 0 < ratio < 1}
    cheaper = {r for r in ranks if factorised_is_cheaper(in_features, out_features, r)}
    return sorted(cheaper | {limit})


def block_of(layer: str) -> str:
    """The block a layer belongs to: its module path without the last two parts."""
    parts = layer.split(".")
    return ".".join(parts[:-2]) if len(parts) > 2 else parts[0]


@dataclass(frozen=True)
class BlockSpace:
    """The allowed rank tuples of one block."""

    name: str
    layers: tuple[str, ...]
    full_ranks: Choice
    choices: tuple[Choice, ...]

    @property
    def dense(self) -> Choice:
        return self.full_ranks

    def ranks(self, choice: Choice) -> dict[str, int]:
        """Layer -> rank of one of this block's choices (full rank included)."""
        return dict(zip(self.layers, choice, strict=True))

    def role(self, layer: str) -> str:
        """A layer's path inside this block, e.g. ``attn.qkv`` for ``blocks.3.attn.qkv``."""
        return layer[len(self.name) + 1 :]

    def ratios(self, choice: Choice) -> np.ndarray:
        """Each layer's rank as a fraction of its full rank."""
        return np.asarray(choice, dtype=float) / np.asarray(self.full_ranks, dtype=float)


@dataclass(frozen=True)
class SearchSpace:
    """One ``BlockSpace`` per block, in model order."""

    blocks: tuple[BlockSpace, ...]

    def ranks(self, subnet: Sequence[Choice]) -> dict[str, int]:
        """Rank config of a subnet (one choice per block); layers at full rank are left out (dense)."""
        config = {}
        for block, choice in zip(self.blocks, subnet, strict=True):
            for layer, rank, limit in zip(block.layers, choice, block.full_ranks, strict=True):
                if rank < limit:
                    config[layer] = rank
        return config

    def contains(self, subnet: Sequence[Choice]) -> bool:
        return len(subnet) == len(self.blocks) and all(
            tuple(choice) in block.choices for block, choice in zip(self.blocks, subnet, strict=False)
        )

    @property
    def size(self) -> int:
        """Number of distinct subnets."""
        return int(np.prod([len(block.choices) for block in self.blocks], dtype=object))

    def check(self, full_ranks: Mapping[str, int] | None = None) -> None:
        """Raise ``ValueError`` naming the first inconsistency: tuple lengths, ranks outside
        [1, full rank], a block without its dense tuple, or (given the model's layers and
        full ranks) a layer the model does not have or whose full rank differs."""
        for block in self.blocks:
            if len(block.full_ranks) != len(block.layers):
                raise ValueError(
                    f"block {block.name}: {len(block.layers)} layers but {len(block.full_ranks)} full ranks"
                )
            for choice in block.choices:
                if len(choice) != len(block.layers) or not all(
                    isinstance(rank, int) and 1 <= rank <= limit for rank, limit in zip(choice, block.full_ranks)
                ):
                    raise ValueError(
                        f"block {block.name}: rank tuple {list(choice)} does not fit full ranks "
                        f"{list(block.full_ranks)}"
                    )
            if block.dense not in block.choices:
                raise ValueError(f"block {block.name}: the dense tuple {list(block.dense)} is missing")
            for layer, limit in zip(block.layers, block.full_ranks, strict=True):
                if full_ranks is not None and full_ranks.get(layer) != limit:
                    found = "not a low-rank layer of the model" if layer not in full_ranks else f"{full_ranks[layer]}"
                    raise ValueError(f"layer {layer}: full rank {limit} in the space, model: {found}")

    def to_dict(self) -> dict:
        return {
            "blocks": [
                {
                    "name": b.name,
                    "layers": list(b.layers),
                    "full_ranks": list(b.full_ranks),
                    "choices": [list(c) for c in b.choices],
                }
                for b in self.blocks
            ]
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> SearchSpace:
        return cls(
            tuple(
                BlockSpace(
                    name=b["name"],
                    layers=tuple(b["layers"]),
                    full_ranks=tuple(b["full_ranks"]),
                    choices=tuple(tuple(c) for c in b["choices"]),
                )
                for b in data["blocks"]
            )
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"


def full_space(layer_shapes: Mapping[str, tuple[int, int]], ratios: Iterable[float]) -> SearchSpace:
    """Every combination of the layers' rank grids, per block.

    ``layer_shapes`` maps each target layer, in model order, to ``(in, out)``.
    """
    ratios = list(ratios)
    grouped: dict[str, list[str]] = {}
    for layer in layer_shapes:
        grouped.setdefault(block_of(layer), []).append(layer)
    blocks = []
    for name, layers in grouped.items():
        grids = [rank_grid(*layer_shapes[layer], ratios) for layer in layers]
        full = tuple(full_rank(*layer_shapes[layer]) for layer in layers)
        blocks.append(BlockSpace(name, tuple(layers), full, tuple(itertools.product(*grids))))
    return SearchSpace(tuple(blocks))


def sampling_probabilities(block: BlockSpace, rule: str = "lowrank") -> np.ndarray:
    """Probability of each of the block's choices.

    ``lowrank`` (the paper's rule): proportional to ``1 / prod(rank / full_rank)`` over
    the block's layers, so small ranks, which need more training, are drawn more often.
    ``uniform``: all choices equally likely.
    """
    if rule == "uniform":
        weights = np.ones(len(block.choices))
    elif rule == "lowrank":
        weights = np.array([1.0 / block.ratios(choice).prod() for choice in block.choices])
    else:
        raise ValueError(f"unknown sampling rule {rule!r}; expected 'lowrank' or 'uniform'")
    return weights / weights.sum()


class SubnetSampler:
    """Draws one choice per block with ``sampling_probabilities``."""

    def __init__(self, space: SearchSpace, rule: str = "lowrank") -> None:
        self.space = space
        self.probabilities = [sampling_probabilities(block, rule) for block in space.blocks]

    def sample_indices(self, rng: np.random.Generator) -> tuple[int, ...]:
        """The index of the drawn choice of every block."""
        return tuple(int(rng.choice(len(p), p=p)) for p in self.probabilities)

    def sample(self, rng: np.random.Generator) -> list[Choice]:
        return [block.choices[i] for block, i in zip(self.space.blocks, self.sample_indices(rng), strict=True)]
