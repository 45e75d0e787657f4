"""Low-rank layer and SVD factorisation: exactness, optimal truncation, nested slicing."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from flora_steps.core import (
    DEFAULT_TARGETS,
    LowRankLinear,
    factorise,
    factorised_is_cheaper,
    find_linear_layers,
    materialise,
    set_ranks,
    svd_factors,
)


@pytest.mark.parametrize("name", ["vit_digits", "deit_tiny_patch16_224"])
def test_full_rank_factorisation_reproduces_dense_logits(name: str) -> None:
    torch.manual_seed(0)
    dense = timm.create_model(name).eval()
    factorised = timm.create_model(name).eval()
    factorised.load_state_dict(dense.state_dict())
    layers = find_linear_layers(factorised, DEFAULT_TARGETS)
    assert len(layers) == 3 * len(dense.blocks)
    factorise(factorised, layers)
    x = torch.randn(2, *dense.pretrained_cfg["input_size"])
    with torch.no_grad():
        error = (dense(x) - factorised(x)).abs().max().item()
    assert error < 1e-4


def test_targets_are_found_by_pattern_in_swin() -> None:
    with torch.device("meta"):
        model = timm.create_model("swin_tiny_patch4_window7_224")
    layers = find_linear_layers(model, DEFAULT_TARGETS)
    assert len(layers) == 3 * 12  # Swin-T has 2 + 2 + 6 + 2 blocks
    assert "layers.2.blocks.5.mlp.fc2" in layers
    assert find_linear_layers(model, ["*.attn.proj"])[0] == "layers.0.blocks.0.attn.proj"


@pytest.mark.parametrize("rank", [1, 5, 17, 31])
def test_truncation_error_equals_discarded_singular_values(rank: int) -> None:
    torch.manual_seed(1)
    weight = torch.randn(48, 32, dtype=torch.float64)
    first, second, singular_values = svd_factors(weight, rank)
    residual = weight - second @ first
    discarded = singular_values[rank:]
    assert torch.linalg.matrix_norm(residual) == pytest.approx(discarded.norm().item(), rel=1e-9)
    assert torch.linalg.matrix_norm(residual, ord=2) == pytest.approx(discarded[0].item(), rel=1e-9)
    # Eckart-Young: no other rank-r matrix does better, e.g. a random rank-r one fitted by least squares.
    basis = torch.linalg.qr(torch.randn(48, rank, dtype=torch.float64)).Q
    other = basis @ (basis.T @ weight)
    assert torch.linalg.matrix_norm(weight - other) >= torch.linalg.matrix_norm(residual)


def test_balanced_split_gives_factors_of_equal_scale() -> None:
    weight = torch.randn(40, 24)
    first, second, singular_values = svd_factors(weight)
    assert torch.allclose(first.norm(dim=1), second.norm(dim=0), rtol=1e-4)
    assert torch.allclose(first.norm(dim=1) ** 2, singular_values, rtol=1e-4)


def test_nested_slicing_uses_leading_components() -> None:
    torch.manual_seed(2)
    linear = nn.Linear(32, 24)
    layer = LowRankLinear.from_linear(linear)
    x = torch.randn(5, 32)
    for rank in (1, 4, 9, 24):
        layer.rank = rank
        first, second, _ = svd_factors(linear.weight, rank)
        expected = x @ (second @ first).T + linear.bias
        assert torch.allclose(layer(x), expected, atol=1e-5)
    assert layer.first.shape == (24, 32) and layer.second.shape == (24, 24)


def test_rank_outside_range_is_rejected() -> None:
    layer = LowRankLinear(8, 6, max_rank=4)
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        layer.rank = 5
    with pytest.raises(ValueError):
        LowRankLinear(8, 6, max_rank=7)


def test_materialise_matches_supernet_output_and_uses_break_even() -> None:
    torch.manual_seed(3)
    linear = nn.Linear(64, 256)
    layer = LowRankLinear.from_linear(linear)
    x = torch.randn(3, 10, 64)
    for rank in (8, 51, 52, 64):  # break-even of 64 x 256 is 51.2: ranks >= 52 are dense
        layer.rank = rank
        plain = layer.materialise()
        assert torch.allclose(plain(x), layer(x), atol=1e-5)
        if factorised_is_cheaper(64, 256, rank):
            assert isinstance(plain, nn.Sequential) and plain[0].out_features == rank
        else:
            assert isinstance(plain, nn.Linear)
    assert not factorised_is_cheaper(64, 256, 52) and factorised_is_cheaper(64, 256, 51)


def test_model_level_ranks_and_materialisation_agree() -> None:
    torch.manual_seed(4)
    model = timm.create_model("vit_digits").eval()
    layers = find_linear_layers(model, DEFAULT_TARGETS)
    factorise(model, layers)
    ranks = {name: 8 + 4 * i for i, name in enumerate(layers)}
    set_ranks(model, ranks)
    plain = materialise(model)
    assert not any(isinstance(m, LowRankLinear) for m in plain.modules())
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model(x), plain(x), atol=1e-5)
    with pytest.raises(KeyError, match="head"):
        set_ranks(model, {"head": 4})


def test_any_materialised_form_computes_the_same_function() -> None:
    """Dense, a pair at the rank, and a pair padded with zero components to a wider rank (a form a latency table
    may find faster) agree with the low-rank layer; a model takes each layer's form from ``widths``."""
    torch.manual_seed(5)
    layer = LowRankLinear.from_linear(nn.Linear(64, 256))
    layer.rank = 12
    x = torch.randn(3, 10, 64)
    with torch.no_grad():
        for width in (12, 16, 48, None):
            plain = layer.materialise_as(12, width)
            assert torch.allclose(plain(x), layer(x), atol=1e-5), width
            assert isinstance(plain, nn.Linear) if width is None else plain[0].out_features == width
    with pytest.raises(ValueError, match="at least the rank 12"):
        layer.materialise_as(12, 8)
    with pytest.raises(ValueError, match=r"rank must lie in \[1, 64\], got 65"):
        layer.materialise_as(65, 80)
    model = timm.create_model("vit_digits").eval()
    layers = find_linear_layers(model, DEFAULT_TARGETS)
    factorise(model, layers)
    ranks = dict.fromkeys(layers, 8)
    widths = {layers[0]: None, layers[1]: 16}
    plain = materialise(model, ranks, widths)
    modules = dict(plain.named_modules())
    assert isinstance(modules[layers[0]], nn.Linear) and modules[layers[1]][0].out_features == 16
    assert modules[layers[2]][0].out_features == 8  # not in widths: its form by MACs
    images = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(plain(images), materialise(model, ranks)(images), atol=1e-5)
