"""The uniform-rank baseline: one rank ratio for every target layer, chosen to fit a MACs budget.

Layer ``l`` gets rank ``floor(ratio * full_rank_l)`` (at least 1); a layer whose rank
is not below break-even stays dense. The candidate ratios are every ``r / full_rank_l``
of every layer, so the chosen ratio is the largest the integer rank grid allows
under the budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .lowrank import factorized_is_cheaper
from .macs import CostModel


def uniform_ranks(costs: CostModel, layers: Sequence[str], ratio: float) -> dict[str, int]:
    """Rank config with ``ratio`` of full rank on each of ``layers``; break-even or larger stays dense."""
    ranks = {}
    for name in layers:
        layer = costs.layers[name]
        rank = max(1, math.floor(ratio * layer.full_rank + 1e-9))
        if rank < layer.full_rank and factorized_is_cheaper(layer.in_features, layer.out_features, rank):
            ranks[name] = rank
    return ranks


def candidate_ratios(costs: CostModel, layers: Sequence[str]) -> list[float]:
    """Every ratio at which some layer's uniform rank changes, ascending."""
    return sorted({r / costs.layers[n].full_rank for n in layers for r in range(1, costs.layers[n].full_rank + 1)})


def fit_uniform_ratio(costs: CostModel, layers: Sequence[str], budget_macs: float) -> tuple[float, dict[str, int]]:
    """The largest candidate ratio whose uniform rank config costs at most ``budget_macs``, and that config.

    Raises ``ValueError`` when even rank 1 everywhere exceeds the budget.
    """
    ratios = candidate_ratios(costs, layers)
    fitting = [ratio for ratio in ratios if costs.macs(uniform_ranks(costs, layers, ratio)) <= budget_macs]
    if not fitting:
        smallest = costs.macs(uniform_ranks(costs, layers, ratios[0]))
        raise ValueError(f"budget of {budget_macs:.0f} MACs is below the uniform model at rank 1 ({smallest} MACs)")
    return fitting[-1], uniform_ranks(costs, layers, fitting[-1])
