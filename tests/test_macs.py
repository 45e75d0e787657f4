"""MACs and parameter counting: reference values and agreement with torch.utils.flop_counter."""

from __future__ import annotations

import random

import pytest
import timm
import torch

from flora_steps.core import DEFAULT_TARGETS, count_macs, factorise, find_linear_layers, materialise, trace_costs


def meta_costs(name: str):
    with torch.device("meta"):
        model = timm.create_model(name)
    return trace_costs(model, model.pretrained_cfg["input_size"])


@pytest.mark.parametrize(
    ("name", "giga_macs", "tolerance"),
    [
        ("deit_base_patch16_224", 17.57, 0.005),
        ("deit_small_patch16_224", 4.6, 0.01),
        ("swin_tiny_patch4_window7_224", 4.5, 0.01),
    ],
)
def test_dense_macs_match_reference_values(name: str, giga_macs: float, tolerance: float) -> None:
    assert meta_costs(name).dense_macs / 1e9 == pytest.approx(giga_macs, rel=tolerance)


def test_dense_params_match_the_model() -> None:
    model = timm.create_model("vit_digits")
    costs = trace_costs(model, (1, 8, 8))
    assert costs.dense_params == sum(p.numel() for p in model.parameters())
    assert costs.dense_macs == count_macs(model, (1, 8, 8))


def test_counter_equals_flop_counter_on_materialised_deit_small_with_random_ranks() -> None:
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224").eval()
    shape = (3, 224, 224)
    costs = trace_costs(model, shape)
    layers = find_linear_layers(model, [*DEFAULT_TARGETS, "*.attn.proj"])
    rng = random.Random(0)
    ranks = {name: rng.randint(1, costs.layers[name].full_rank) for name in layers}
    ranks[layers[0]] = costs.layers[layers[0]].full_rank  # one dense layer at full rank
    factorise(model, layers)
    compressed = materialise(model, ranks)
    assert costs.macs(ranks) == count_macs(compressed, shape)
    assert costs.params(ranks) == sum(p.numel() for p in compressed.parameters())
    assert costs.macs(ranks) < costs.dense_macs


def test_counter_prices_a_factorised_layer_as_tokens_times_rank_times_in_plus_out() -> None:
    costs = meta_costs("deit_small_patch16_224")
    qkv = costs.layers["blocks.0.attn.qkv"]
    assert (qkv.in_features, qkv.out_features, qkv.tokens) == (384, 1152, 197)
    saved = costs.dense_macs - costs.macs({"blocks.0.attn.qkv": 96})
    assert saved == 197 * (384 * 1152 - 96 * (384 + 1152))
    assert costs.macs({"blocks.0.attn.qkv": 384}) == costs.dense_macs  # full rank is dense


def test_a_supernet_model_is_priced_like_its_dense_original() -> None:
    model = timm.create_model("vit_digits")
    dense = trace_costs(model, (1, 8, 8))
    factorise(model, find_linear_layers(model, DEFAULT_TARGETS))
    assert trace_costs(model, (1, 8, 8)) == dense


def test_bad_ranks_are_named() -> None:
    costs = meta_costs("vit_digits")
    with pytest.raises(ValueError, match="'blocks.9.attn.qkv' is not a linear layer"):
        costs.check_ranks({"blocks.9.attn.qkv": 8})
    with pytest.raises(ValueError, match=r"must lie in \[1, 64\], got 65"):
        costs.check_ranks({"blocks.0.attn.qkv": 65})
