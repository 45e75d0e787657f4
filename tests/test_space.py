"""Search space: rank grids with the break-even rule, block tuples, low-rank-aware sampling."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from flora_steps.core import DEFAULT_TARGETS, find_linear_layers, trace_costs
from flora_steps.core.space import (
    BlockSpace,
    SearchSpace,
    SubnetSampler,
    block_of,
    full_space,
    rank_grid,
    sampling_probabilities,
)

PAPER_RATIOS = [1 / 8, 2 / 8, 3 / 8, 4 / 8, 5 / 8, 6 / 8, 1.0]


def digits_space() -> SearchSpace:
    with torch.device("meta"):
        model = timm.create_model("vit_digits")
    costs = trace_costs(model, (1, 8, 8))
    layers = find_linear_layers(model, DEFAULT_TARGETS)
    return full_space({n: (costs.layers[n].in_features, costs.layers[n].out_features) for n in layers}, PAPER_RATIOS)


def test_rank_grid_drops_ranks_at_or_above_break_even() -> None:
    assert rank_grid(64, 256, PAPER_RATIOS) == [8, 16, 24, 32, 40, 48, 64]  # break-even 51.2
    assert rank_grid(64, 192, PAPER_RATIOS) == [8, 16, 24, 32, 40, 64]  # 48 * 256 == 64 * 192: not cheaper
    assert rank_grid(768, 2304, PAPER_RATIOS) == [96, 192, 288, 384, 480, 768]  # break-even 576


def test_blocks_group_the_layers_of_one_transformer_block() -> None:
    assert block_of("blocks.3.attn.qkv") == "blocks.3"
    assert block_of("layers.1.blocks.0.mlp.fc2") == "layers.1.blocks.0"
    space = digits_space()
    assert [b.name for b in space.blocks] == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    block = space.blocks[0]
    assert block.layers == ("blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2")
    assert len(block.choices) == 6 * 7 * 7 and block.dense in block.choices
    assert space.size == (6 * 7 * 7) ** 4


def test_ranks_leave_full_rank_layers_dense_and_the_space_round_trips() -> None:
    space = digits_space()
    subnet = [(8, 64, 48)] + [b.dense for b in space.blocks[1:]]
    assert space.ranks(subnet) == {"blocks.0.attn.qkv": 8, "blocks.0.mlp.fc2": 48}
    assert space.contains(subnet) and not space.contains([(7, 64, 48)] + subnet[1:])
    assert SearchSpace.from_dict(space.to_dict()) == space


def test_lowrank_probabilities_follow_the_inverse_ratio_product() -> None:
    block = digits_space().blocks[0]
    p = sampling_probabilities(block)
    index = {c: i for i, c in enumerate(block.choices)}
    # (8, 8, 8) has ratio product (1/8)^3, the dense triple 1: 512 times as likely.
    assert p[index[(8, 8, 8)]] / p[index[(64, 64, 64)]] == pytest.approx(512)
    assert p[index[(16, 32, 64)]] / p[index[(32, 32, 32)]] == pytest.approx((0.5**3) / (0.25 * 0.5 * 1))
    assert np.allclose(sampling_probabilities(block, "uniform"), 1 / len(block.choices))
    with pytest.raises(ValueError, match="unknown sampling rule"):
        sampling_probabilities(block, "greedy")


def test_sampler_frequencies_match_the_rule_and_stay_in_the_space() -> None:
    space = digits_space()
    sampler = SubnetSampler(space)
    rng = np.random.default_rng(0)
    draws = 20_000
    block = space.blocks[1]
    counts = np.zeros(len(block.choices))
    index = {c: i for i, c in enumerate(block.choices)}
    for _ in range(draws):
        subnet = sampler.sample(rng)
        assert space.contains(subnet)
        counts[index[subnet[1]]] += 1
    expected = sampler.probabilities[1] * draws
    # Pearson chi-square over the choices, against the 99.9% quantile for 293 degrees of freedom (~380).
    chi_square = ((counts - expected) ** 2 / expected).sum()
    assert chi_square < 380
    # The rule's main effect, in aggregate: the smallest qkv rank is drawn 8x as often as the full one.
    qkv = np.array([c[0] for c in block.choices])
    assert counts[qkv == 8].sum() / counts[qkv == 64].sum() == pytest.approx(8, rel=0.1)


def test_samples_from_a_filtered_space_stay_inside_it() -> None:
    full = digits_space()
    rng = np.random.default_rng(1)
    filtered = SearchSpace(
        tuple(
            BlockSpace(
                b.name,
                b.layers,
                b.full_ranks,
                tuple(b.choices[i] for i in sorted(rng.choice(len(b.choices), 30, replace=False))) + (b.dense,),
            )
            for b in full.blocks
        )
    )
    sampler = SubnetSampler(filtered)
    for _ in range(2000):
        subnet = sampler.sample(rng)
        assert filtered.contains(subnet)
        assert set(filtered.ranks(subnet).values()) <= {8, 16, 24, 32, 40, 48}
