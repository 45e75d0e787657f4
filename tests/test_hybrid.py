"""Compact hybrid models through FLORA unchanged: the embedded convolution-stem ViT and timm's TinyViT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import yaml
from conftest import ROOT, SMOKE, set_key, write_params
from rehearsal import write_images

from flora_steps.cli import main
from flora_steps.core import count_macs, factorise, find_linear_layers, trace_costs
from flora_steps.runtime.models import input_shape

#: FLORA's stages on the smoke profile's first search budget
FLORA_COMMANDS = (["pretrain"], ["decompose"], ["filter"], ["supernet"], ["search"], ["retrain", "--method", "flora"])


def run_flora(params: dict, folder: Path, monkeypatch) -> dict:
    """FLORA's stages in this process; the retrained model's metrics."""
    params_file = str(write_params(folder / "params.yaml", params))
    budget = str(params["budgets"]["search"][0])
    monkeypatch.chdir(folder)
    for command in FLORA_COMMANDS:
        options = ["--budget", budget] if command[0] in ("search", "retrain") else []
        assert main([*command, *options, "--params", params_file]) == 0, command
    return json.loads((folder / f"results/retrain/flora/{budget}/metrics.json").read_text())


def test_the_hybrid_digits_model_has_a_convolution_stem_that_the_macs_count() -> None:
    hybrid, plain = timm.create_model("vit_digits_hybrid"), timm.create_model("vit_digits")
    assert input_shape(hybrid) == input_shape(plain) == (1, 8, 8)
    assert hybrid.patch_embed.num_patches == plain.patch_embed.num_patches == 16
    costs, plain_costs = trace_costs(hybrid, (1, 8, 8)), trace_costs(plain, (1, 8, 8))
    assert costs.dense_macs == count_macs(hybrid, (1, 8, 8))
    stem = 8 * 8 * 16 * 1 * 9 + 4 * 4 * 32 * 16 * 9 + 16 * 32 * 64  # two 3x3 convolutions, the 1x1 projection
    assert costs.other_macs - plain_costs.other_macs == stem - 16 * 4 * 64  # instead of the 2x2 patch embedding
    assert set(costs.layers) == set(plain_costs.layers)  # the same transformer layers to factorise
    names = find_linear_layers(hybrid, ["*.attn.qkv", "*.mlp.fc1", "*.mlp.fc2"])
    images = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        before = hybrid.eval()(images)
        factorise(hybrid, names)
        assert torch.allclose(hybrid(images), before, atol=1e-4)


def test_flora_runs_unchanged_on_the_hybrid_digits_model(tmp_path: Path, monkeypatch) -> None:
    params = set_key(yaml.safe_load(SMOKE.read_text()), "model.name", "vit_digits_hybrid")
    metrics = run_flora(params, tmp_path, monkeypatch)
    assert 0.48 <= metrics["macs_fraction"] <= 0.5 and metrics["top1"] is not None
    assert (tmp_path / "results/on_slim").exists() is False  # FLORA's stages alone


def test_the_hybrid_profile_is_the_default_with_the_hybrid_model() -> None:
    default = yaml.safe_load((ROOT / "params.yaml").read_text())
    hybrid = yaml.safe_load((ROOT / "configs/hybrid.yaml").read_text())
    assert hybrid["model"].pop("name") == "vit_digits_hybrid" and default["model"].pop("name") == "vit_digits"
    # OFB's grids reach 0.154 of the hybrid's MACs at the smallest (its stem is not pruned)
    assert min(default["budgets"]["ofb"]) > 0.154
    assert hybrid == default


def test_flops_counts_tiny_vit(capsys) -> None:
    assert main(["flops", "--model", "tiny_vit_5m_224", "--num-classes", "1000", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["input_size"] == [3, 224, 224]
    assert 1.2e9 < result["macs"] < 1.32e9  # timm's model card: 1.3 GMACs (norms, softmax, biases aside)
    assert 5.35e6 < result["params"] < 5.45e6  # timm's model card: 5.4 M


def test_flora_runs_unchanged_on_tiny_vit(tmp_path: Path, monkeypatch, capsys) -> None:
    """TinyViT (convolution stages, windowed attention with a bias, its own MLP) with random weights, at 64 px
    on a small ImageFolder: FLORA's stages as for a ViT, one process on the CPU. ViT-Slim's masks need timm's
    Attention and Mlp, which TinyViT (and Swin) do not have: one clear line."""
    write_images(tmp_path / "rehearsal")
    params = yaml.safe_load((ROOT / "configs/rehearsal.yaml").read_text())
    params["model"] |= {
        "name": "tiny_vit_5m_224",
        "checkpoint": None,
        "kwargs": {"pretrained_cfg_overlay": {"input_size": [3, 64, 64]}},
    }
    params["compute"] |= {"processes": 1, "workers": 0}
    params["decompose"]["targets"] = ["*.attn.qkv", "*.mlp.fc1", "*.mlp.fc2"]
    metrics = run_flora(params, tmp_path, monkeypatch)
    assert 0.7 <= metrics["macs_fraction"] <= 0.8
    layers = (tmp_path / "results/decompose/layers.csv").read_text()
    assert "stages.3.blocks.1.attn.qkv" in layers and "stages.0" not in layers  # stage 0 is convolutions only
    capsys.readouterr()
    assert main(["slim", "--params", "params.yaml"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == [
        "flora slim: error: model.name: ViT-Slim cannot slim tiny_vit_5m_224: "
        "the model has no blocks with timm Attention and Mlp to prune"
    ]


@pytest.mark.parametrize("name", ["tiny_vit_5m_224", "tiny_vit_21m_384"])
def test_tiny_vit_macs_equal_flop_counter(name: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    shape = input_shape(model)
    costs = trace_costs(model, shape)
    assert costs.dense_macs == count_macs(model, shape) and len(costs.layers) > 0


def test_a_saved_structure_of_a_model_without_vit_blocks_builds() -> None:
    """A Swin or TinyViT artifact (no ViT-Slim structure) rebuilds with its low-rank layers."""
    from flora_steps.core import LowRankLinear
    from flora_steps.runtime.models import build_model

    with torch.device("meta"):
        model = build_model("swin_tiny_patch4_window7_224", {}, lowrank={"layers.0.blocks.0.mlp.fc1": 96})
    assert isinstance(model.layers[0].blocks[0].mlp.fc1, LowRankLinear)


def test_the_published_profile_is_the_default_with_five_runs_every_budget_and_every_latency_method() -> None:
    """configs/default_5_runs.yaml differs from params.yaml only where the default saves time (issue 24's 10
    minutes on 2 cores): its runs, the methods the default leaves out under latency budgets, and fewer budgets
    of the same curves."""
    default = yaml.safe_load((ROOT / "params.yaml").read_text())
    published = yaml.safe_load((ROOT / "configs/default_5_runs.yaml").read_text())
    assert (published.pop("runs"), default.pop("runs")) == (5, 1)
    for name in ("uniform_latency", "slim_latency", "ofb_latency", "slim_flora_latency", "ofb_flora_latency"):
        assert default["budgets"].pop(name) == [] and published["budgets"].pop(name)
    for name in ("search", "uniform", "slim", "slim_flora", "ofb", "ofb_flora"):
        fewer, every = default["budgets"].pop(name), published["budgets"].pop(name)
        assert set(fewer) < set(every), name
    assert published == default
