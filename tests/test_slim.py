"""ViT-Slim's library: masks, the sparsity term, thresholds for a MACs budget, and physical slicing."""

from __future__ import annotations

import pytest
import timm
import torch
import yaml
from conftest import SMOKE, write_params

import flora_steps.runtime.models  # noqa: F401  (registers vit_digits)
from flora_steps.core import count_macs, trace_costs
from flora_steps.core.latency import WidthTable
from flora_steps.pruning.slim import (
    ATTENTION,
    MLP,
    SlimCosts,
    attach_masks,
    detach_masks,
    slice_model,
    slice_to_budget,
    sparsity_loss,
    structure_for_budget,
    structure_for_keep,
    zero_pruned,
)
from flora_steps.pruning.structure import (
    PrunedBlock,
    part_widths,
    prunable_blocks,
    restructure_blocks,
    timed_models,
    timed_parts,
)


def model_and_input(name: str = "vit_digits") -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    shape = model.pretrained_cfg["input_size"] if name != "vit_digits" else (1, 8, 8)
    return model, torch.randn(4, *shape)


def heads_of(model: torch.nn.Module) -> dict[str, int]:
    return {name: block.attn.num_heads for name, block in prunable_blocks(model).items()}


@torch.no_grad()
def masked_output(model: torch.nn.Module, masks: dict, values: dict, images: torch.Tensor) -> torch.Tensor:
    for key, mask in masks.items():
        mask.copy_(values[key])
    return model(images)


def test_sliced_model_equals_the_masked_model_with_hard_masks() -> None:
    model, images = model_and_input()
    masks = attach_masks(model)
    structure = {name: PrunedBlock(head_dim=5 + i, mlp_hidden=40 + 30 * i) for i, name in enumerate(heads_of(model))}
    generator = torch.Generator().manual_seed(1)
    hard = {}
    for (name, kind), mask in masks.items():
        if kind == ATTENTION:
            heads = model.get_submodule(name).attn.num_heads
            ones = torch.rand(heads, mask.numel() // heads, generator=generator).argsort(1)[
                :, : structure[name].head_dim
            ]
            hard[name, kind] = torch.zeros(heads, mask.numel() // heads).scatter_(1, ones, 1.0).flatten()
        else:
            ones = torch.randperm(mask.numel(), generator=generator)[: structure[name].mlp_hidden]
            hard[name, kind] = torch.zeros(mask.numel()).index_fill_(0, ones, 1.0)
    expected = masked_output(model, masks, hard, images)
    detach_masks(model)
    sliced = slice_model(model, hard, structure)
    with torch.no_grad():
        assert torch.allclose(sliced(images), expected, atol=1e-5)
    assert sliced.blocks[1].attn.qkv.out_features == 3 * 2 * 6 and sliced.blocks[1].mlp.fc1.out_features == 70


def test_sliced_model_folds_soft_mask_values_and_the_attention_temperature() -> None:
    model, images = model_and_input()
    masks = attach_masks(model)
    with torch.no_grad():
        for mask in masks.values():
            mask.uniform_(0.05, 1.0)
    values = {key: mask.detach().clone() for key, mask in masks.items()}
    structure = structure_for_keep(values, heads_of(model), 0.4)
    expected = masked_output(model, masks, zero_pruned(values, structure, heads_of(model)), images)
    assert detach_masks(model).keys() == values.keys()
    sliced = slice_model(model, values, structure)
    with torch.no_grad():
        assert torch.allclose(sliced(images), expected, atol=1e-5)


@pytest.mark.parametrize("name", ["vit_digits", "deit_tiny_patch16_224"])
def test_slim_costs_equal_flop_counter_on_the_sliced_model(name: str) -> None:
    model, _ = model_and_input(name)
    shape = (1, 8, 8) if name == "vit_digits" else (3, 224, 224)
    costs = SlimCosts.of(model, trace_costs(model, shape))
    assert costs.macs(costs.dense) == count_macs(model, shape)
    masks = {key: torch.rand(mask.numel()) for key, mask in attach_masks(model).items()}
    detach_masks(model)
    structure = structure_for_keep(masks, heads_of(model), 0.3)
    assert count_macs(slice_model(model, masks, structure), shape) == costs.macs(structure)


def test_thresholds_meet_the_macs_budget() -> None:
    model, _ = model_and_input()
    costs = SlimCosts.of(model, trace_costs(model, (1, 8, 8)))
    masks = {key: torch.rand(mask.numel()) for key, mask in attach_masks(model).items()}
    dense = costs.macs(costs.dense)
    for budget in (0.4, 0.6, 0.8):
        keep, structure = structure_for_budget(masks, costs.heads, costs.macs, budget * dense)
        assert budget - 0.03 <= costs.macs(structure) / dense <= budget, budget
        assert costs.macs(structure_for_keep(masks, heads_of(model), keep + 0.01)) > budget * dense
    with pytest.raises(ValueError, match="even the smallest slim model"):
        structure_for_budget(masks, costs.heads, costs.macs, 0.01 * dense)


def test_the_latency_tables_uniformly_pruned_models_have_their_parts_at_timed_widths() -> None:
    """One model per ratio below 1, every block cut alike, each part at a width the table times alone."""
    model, images = model_and_input()
    ratios = [0.25, 0.5, 1.0]
    parts = timed_parts(model, trace_costs(model, (1, 8, 8)), ratios)
    models = timed_models(model, ratios)
    assert [widths["blocks.0.mlp"] for _, widths in models] == [64, 128]  # vit_digits: 256 units
    for pruned, widths in models:
        assert set(widths) == set(parts) and all(width in parts[name].modules for name, width in widths.items())
        assert pruned(images).shape == model(images).shape
    assert model.blocks[0].mlp.fc1.out_features == 256  # the dense model untouched
    assert timed_models(torch.nn.Sequential(torch.nn.Linear(2, 2)), ratios) == []


def test_a_latency_budget_slices_by_the_tables_prediction() -> None:
    """A table where only MLP units cost time: the latency budget keeps the largest share whose predicted time fits,
    and its structure's MACs follow from that, not from a MACs limit."""
    model, _ = model_and_input()
    costs = SlimCosts.of(model, trace_costs(model, (1, 8, 8)))
    masks = {key: torch.rand(mask.numel()) for key, mask in attach_masks(model).items()}
    detach_masks(model)
    blocks = list(costs.blocks)
    hidden = costs.dense[blocks[0]].mlp_hidden
    options = {f"{b}.mlp": {1: 0.0, hidden: 1.0} for b in blocks} | {f"{b}.attn": {1: 0.5, 64: 0.5} for b in blocks}
    table = WidthTable(fixed={1.0: 1.0}, options=options)  # dense: 1 + 4 x 0.5 + 4 x 1.0 = 7 ms
    dense = trace_costs(model, (1, 8, 8))
    with pytest.raises(ValueError, match="ms predicted"):  # attention alone takes 3 ms
        slice_to_budget(model, masks, dense, 2.0, latency=table)
    limit = 1.0 + 2.0 + 0.4 * 4  # MLPs at 0.4 of their (linearly priced) units
    _, structure, _, macs = slice_to_budget(model, masks, dense, limit, latency=table)
    predicted = table.predict_ms(part_widths(structure, costs.heads))
    assert limit - 0.05 <= predicted <= limit
    assert macs == costs.macs(structure)


def test_a_sliced_model_loads_into_a_restructured_plain_timm_model() -> None:
    model, images = model_and_input()
    masks = {key: torch.rand(mask.numel()) for key, mask in attach_masks(model).items()}
    detach_masks(model)
    structure = structure_for_keep(masks, heads_of(model), 0.5)
    sliced = slice_model(model, masks, structure)
    fresh = restructure_blocks(timm.create_model("vit_digits", num_classes=10).eval(), structure)
    fresh.load_state_dict(sliced.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(images), sliced(images))


def test_sparsity_loss_weighs_each_dimension_type() -> None:
    model, _ = model_and_input()
    masks = attach_masks(model)
    attention = sum(m.numel() for (_, kind), m in masks.items() if kind == ATTENTION)
    hidden = sum(m.numel() for (_, kind), m in masks.items() if kind == MLP)
    loss = sparsity_loss(masks, {ATTENTION: 2e-4, MLP: 5e-5})
    assert loss.item() == pytest.approx(2e-4 * attention + 5e-5 * hidden)
    loss.backward()
    assert all(mask.grad is not None for mask in masks.values())


def test_a_slim_model_and_flora_on_it_are_artifacts_torch_timm_and_safetensors_load(tmp_path) -> None:
    """The sliced model saves and loads by its spec; factorising it (FLORA on a slim base) keeps the slim sizes."""
    from flora_steps.core import factorise, find_linear_layers, lowrank_layers
    from flora_steps.runtime.artifacts import ModelSpec, load_model, save_model

    model, images = model_and_input()
    masks = {key: torch.rand(mask.numel()) for key, mask in attach_masks(model).items()}
    detach_masks(model)
    structure = structure_for_keep(masks, heads_of(model), 0.5)
    sliced = slice_model(model, masks, structure)
    spec = ModelSpec(model="vit_digits", model_kwargs={"num_classes": 10}, pruned=structure)
    save_model(tmp_path / "slim", sliced, spec)
    loaded, loaded_spec = load_model(tmp_path / "slim")
    assert loaded_spec.pruned == structure
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images), sliced(images))
    factorise(sliced, find_linear_layers(sliced, ["*.mlp.fc1"]))
    lowrank = {name: layer.max_rank for name, layer in lowrank_layers(sliced).items()}
    save_model(tmp_path / "slim_lowrank", sliced, spec.model_copy(update={"lowrank": lowrank}))
    again, _ = load_model(tmp_path / "slim_lowrank")
    assert again.blocks[0].mlp.fc1.out_features == structure["blocks.0"].mlp_hidden
    with torch.no_grad():
        assert torch.allclose(again.eval()(images), sliced(images), atol=1e-5)


# ---------------------------------------------------------------- the stages on the smoke profile
def test_slim_stage_and_its_retrain_meet_the_budget_with_the_searched_training(smoke_pipeline) -> None:
    import json

    from flora_steps.runtime.artifacts import load_model, read_masks

    results = smoke_pipeline / "results"
    masks = read_masks(results / "slim/masks.safetensors")
    assert set(masks) == {(f"blocks.{i}", kind) for i in range(4) for kind in (ATTENTION, MLP)}
    slim = json.loads((results / "slim/metrics.json").read_text())
    metrics = json.loads((results / "retrain/slim/0.35/metrics.json").read_text())
    assert 0.3 <= metrics["macs_fraction"] <= 0.35 and metrics["source"].startswith("ViT-Slim")
    assert metrics["training"]["inherited_steps"] == slim["train_steps"] > 0
    model, spec = load_model(results / "retrain/slim/0.35/model")
    assert spec.pruned and count_macs(model, (1, 8, 8)) == metrics["macs"]


def test_a_slim_budget_below_the_smallest_slice_is_one_line(smoke_pipeline, tmp_path, monkeypatch, capsys) -> None:
    from flora_steps.cli import main

    params = yaml.safe_load(SMOKE.read_text())
    params["budgets"]["slim"] = [0.01]
    write_params(tmp_path / "params.yaml", params)
    (tmp_path / "results").mkdir()
    for stage in ("pretrain", "slim"):
        (tmp_path / "results" / stage).symlink_to(smoke_pipeline / "results" / stage)
    monkeypatch.chdir(tmp_path)
    assert main(["retrain", "--method", "slim", "--budget", "0.01", "--params", "params.yaml"]) == 2
    assert "error: budgets.slim: 0.01: even the smallest slim model" in capsys.readouterr().err
    assert not (tmp_path / "results/retrain").exists()


def test_flora_on_the_slim_model_runs_on_its_sliced_shapes_with_equal_training(smoke_pipeline) -> None:
    """``base --base slim`` slices the searched model at budgets.slim_base and fine-tunes it; FLORA's stages run on
    it unchanged (``--base slim``); its models end with as much training as ViT-Slim's own
    (``retrain.slim_epochs: null``)."""
    import json

    from flora_steps.runtime.artifacts import load_model

    results = smoke_pipeline / "results"
    read = lambda path: json.loads((results / path).read_text())
    base = read("on_slim/base/metrics.json")
    smoke = yaml.safe_load(SMOKE.read_text())
    assert base["macs_fraction"] <= 0.5 and base["finetune_epochs"] == smoke["retrain"]["base_epochs"]
    assert base["train_steps"] == read("slim/metrics.json")["train_steps"] + base["finetune_steps"] > 0
    history = (results / "on_slim/base/history.csv").read_text().splitlines()
    assert len(history) == 1 + smoke["retrain"]["base_epochs"]  # a header and one row per epoch
    _, base_spec = load_model(results / "on_slim/base/model")
    decomposed, spec = load_model(results / "on_slim/decompose/model")
    assert spec.pruned == base_spec.pruned and spec.lowrank  # the sliced shapes, factorised
    assert decomposed.blocks[0].mlp.fc1.out_features == base_spec.pruned["blocks.0"].mlp_hidden
    combined = read("on_slim/retrain/flora/0.4/metrics.json")
    assert 0.38 <= combined["macs_fraction"] <= 0.4  # a fraction of the dense model's MACs, within the band
    model, _ = load_model(results / "on_slim/retrain/flora/0.4/model")
    assert count_macs(model, (1, 8, 8)) == combined["macs"]
    inherited = read("on_slim/supernet/metrics.json")["train_steps"] + base["train_steps"]
    assert combined["training"]["inherited_steps"] == inherited
    slim = read("retrain/slim/0.35/metrics.json")["training"]
    assert combined["training"]["total_steps"] == slim["total_steps"]
    assert slim["epochs"] == smoke["retrain"]["base_epochs"] + smoke["supernet"]["epochs"] + smoke["retrain"]["epochs"]
