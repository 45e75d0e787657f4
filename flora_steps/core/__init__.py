"""The method's maths: low-rank layers, SVD factorisation, rank configs and MACs counting.

Pure functions and modules with no file I/O, usable from Python on any timm model.
"""

from .factorise import (
    DEFAULT_TARGETS,
    factorise,
    find_linear_layers,
    lowrank_layers,
    materialise,
    randomise_factors,
    replace_module,
    restructure,
    set_ranks,
)
from .lowrank import LowRankLinear, factorised_is_cheaper, factorised_pair, full_rank, svd_factors, weight_cost
from .macs import CostModel, LinearCost, count_macs, trace_costs, unfused_attention
from .rank_config import RankConfig

__all__ = [
    "DEFAULT_TARGETS",
    "CostModel",
    "LinearCost",
    "LowRankLinear",
    "RankConfig",
    "count_macs",
    "factorise",
    "factorised_is_cheaper",
    "factorised_pair",
    "find_linear_layers",
    "full_rank",
    "lowrank_layers",
    "materialise",
    "randomise_factors",
    "replace_module",
    "restructure",
    "set_ranks",
    "svd_factors",
    "trace_costs",
    "unfused_attention",
    "weight_cost",
]
