"""The uniform-rank baseline: one rank ratio for every target layer, chosen to fit a budget of MACs or latency.

Layer ``l`` gets rank ``floor(ratio * full_rank_l)``, rounded down to a multiple of
``multiple`` (at least ``multiple``); a layer whose rank is not below break-even
stays dense. The candidate ratios are every ``r / full_rank_l`` of every layer with
``r`` a multiple of ``multiple``, so the chosen ratio is the largest that rank grid
allows under the budget. ``multiple = 8`` keeps matmul dimensions aligned, which
CPU and GPU kernels run markedly faster (see ``bench/inference_latency.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from .lowrank import factorised_is_cheaper
from .macs import CostModel


def uniform_ranks(costs: CostModel, layers: Sequence[str], ratio: float, multiple: int = 1) -> dict[str, int]:
    """Rank config with ``ratio`` of full rank on each of ``layers``; break-even or larger stays dense."""
    ranks = {}
    for name in layers:
        layer = costs.layers[name]
        rank = max(multiple, math.floor(ratio * layer.full_rank / multiple + 1e-9) * multiple)
        if rank < layer.full_rank and factorised_is_cheaper(layer.in_features, layer.out_features, rank):
            ranks[name] = rank
    return ranks


def candidate_ratios(costs: CostModel, layers: Sequence[str], multiple: int = 1) -> list[float]:
    """Every ratio at which some layer's uniform rank changes, ascending."""
    return sorted(
        {
            r / costs.layers[n].full_rank
            for n in layers
            for r in range(multiple, costs.layers[n].full_rank + 1, multiple)
        }
    )


def fit_uniform_ratio(
    costs: CostModel,
    layers: Sequence[str],
    budget: float,
    multiple: int = 1,
    cost: Callable[[Mapping[str, int]], float] | None = None,
    allowed: Callable[[Mapping[str, int]], bool] | None = None,
) -> tuple[float, dict[str, int]]:
    """The largest candidate ratio whose uniform rank config costs at most ``budget``, and that config.

    The cost is the config's MACs (``costs.macs``) unless ``cost`` prices it otherwise (a latency table's
    ``predict_ms``); ``allowed`` keeps only the candidates whose config it accepts (a latency table's ``timed``).
    Raises ``ValueError`` when even the smallest candidate exceeds the budget, or none is allowed.
    """
    cost = cost or costs.macs
    configs = {
        ratio: uniform_ranks(costs, layers, ratio, multiple) for ratio in candidate_ratios(costs, layers, multiple)
    }
    configs = {ratio: ranks for ratio, ranks in configs.items() if allowed is None or allowed(ranks)}
    if not configs:
        raise ValueError("no uniform rank ratio is allowed")
    fitting = [ratio for ratio, ranks in configs.items() if cost(ranks) <= budget]
    if not fitting:
        lowest = min(configs)
        raise ValueError(
            f"budget of {budget:.6g} is below the uniform model at rank ratio {lowest:.4g} ({cost(configs[lowest]):.6g})"
        )
    return fitting[-1], configs[fitting[-1]]
