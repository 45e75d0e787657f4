"""The search and retrain stages on the smoke profile, loading a compressed model, ONNX export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import SMOKE, kill_after_first_epoch, write_params

from flora_steps.cli import main
from flora_steps.core import count_macs, trace_costs
from flora_steps.core.macs import CostModel, LinearCost
from flora_steps.core.search import CostTable
from flora_steps.core.uniform import candidate_ratios, fit_uniform_ratio, uniform_ranks
from flora_steps.errors import UserError
from flora_steps.runtime.artifacts import load_model, read_space
from flora_steps.runtime.models import input_shape
from flora_steps.stages.search import check_reachable, choose, val_parts
from flora_steps.tools.export import export_onnx, onnx_max_difference

DENSE_MACS = 3_495_040


@pytest.fixture(scope="module")
def searched(smoke_pipeline: Path) -> Path:
    return smoke_pipeline


def test_search_returns_a_legal_subnet_of_the_filtered_space(searched: Path) -> None:
    out = searched / "results/search/0.5"
    config = json.loads((out / "ranks.json").read_text())
    assert config["model"] == "vit_digits" and config["ranks"]
    space = read_space(searched / "results/filter/space.json")
    subnet = [
        tuple(config["ranks"].get(layer, full) for layer, full in zip(b.layers, b.full_ranks, strict=True))
        for b in space.blocks
    ]
    assert space.contains(subnet)
    metrics = json.loads((out / "metrics.json").read_text())
    assert (0.5 - 0.02) * DENSE_MACS <= metrics["macs"] <= 0.5 * DENSE_MACS
    model, _ = load_model(searched / "results/supernet/model")
    assert trace_costs(model, (1, 8, 8)).macs(config["ranks"]) == metrics["macs"]
    history = pd.read_csv(out / "history.csv")
    assert list(history["generation"]) == [1, 2, 3]
    assert history["best_top1"].is_monotonic_increasing
    assert metrics["evaluations"] == history["evaluations"].iloc[-1] > 10
    # The evolution's best candidates re-ranked on every choosing image; the held-out ones measure the chosen one.
    candidates = pd.read_csv(out / "candidates.csv")
    assert len(candidates) == 4 and candidates["chosen"].sum() == 1  # smoke: search.top_k
    assert list(candidates["search_rank"]) == [1, 2, 3, 4] and candidates["search_top1"].is_monotonic_decreasing
    chosen = candidates[candidates["chosen"]].iloc[0]
    assert chosen["choosing_top1"] == candidates["choosing_top1"].max()
    assert metrics["top1"] == pytest.approx(chosen["held_out_top1"]) and metrics["macs"] == chosen["macs"]
    assert metrics["held_out_images"] == 32 and metrics["choosing_images"] == 144 - 32


class Tallies:
    """A stand-in scorer: a preset tally (right, loss, images) per subnet."""

    def __init__(self, tallies: dict[str, tuple[float, float, int]]) -> None:
        self.tallies = tallies

    def tally(self, ranks: dict[str, int]) -> np.ndarray:
        return np.array(self.tallies[ranks["name"]], dtype=float)


def test_the_choice_rests_on_every_choosing_image_and_never_on_the_held_out_ones() -> None:
    """``b`` wins the evolution's 100 images by one, ``a`` wins the 200 choosing images; ``c`` is best held out."""
    evolution = {
        ("a",): np.array([80.0, 40.0, 100]),
        ("b",): np.array([81.0, 40.0, 100]),
        ("c",): np.array([70, 50, 100]),
    }
    rest = Tallies({"a": (90, 40, 100), "b": (85, 40, 100), "c": (70, 50, 100)})
    held_out = Tallies({"a": (30, 20, 50), "b": (31, 20, 50), "c": (45, 10, 50)})
    table = SimpleNamespace(cost=lambda genome: 10)
    ranks = lambda genome: {"name": genome[0]}
    top = [("b",), ("a",), ("c",)]
    candidates = choose(top, evolution, ranks, rest, held_out, table)
    assert candidates["chosen"].tolist() == [False, True, False]
    assert candidates["choosing_top1"].tolist() == pytest.approx([0.83, 0.85, 0.70])
    assert candidates["held_out_top1"].tolist() == pytest.approx([0.62, 0.60, 0.90])
    alone = choose(top, evolution, ranks, None, held_out, table)  # nothing beyond the evolution's images
    assert alone["chosen"].tolist() == [True, False, False]


def test_the_val_split_falls_into_three_disjoint_parts() -> None:
    val = torch.utils.data.TensorDataset(torch.arange(100))
    settings = SimpleNamespace(val_images=50, held_out=30)
    evolution, rest, held_out = val_parts(val, settings, seed=0)
    assert (len(evolution), len(rest), len(held_out)) == (50, 20, 30)
    seen = [int(part[i][0]) for part in (evolution, rest, held_out) for i in range(len(part))]
    assert sorted(seen) == list(range(100))
    again = val_parts(val, settings, seed=0)
    assert [int(again[2][i][0]) for i in range(30)] == [int(held_out[i][0]) for i in range(30)]
    assert [len(part) for part in val_parts(val, SimpleNamespace(val_images=None, held_out=30), 0)] == [70, 0, 30]
    with pytest.raises(UserError, match="search.held_out: 100 leaves no val image to search on"):
        val_parts(val, SimpleNamespace(val_images=None, held_out=100), 0)


def test_search_gives_the_same_result_for_the_same_seed(searched: Path, tmp_path: Path, monkeypatch) -> None:
    """Searched again beside the shared run, which other workers may be reading: never in it."""
    (tmp_path / "results").mkdir()
    for stage in ("pretrain", "decompose", "filter", "supernet"):
        (tmp_path / "results" / stage).symlink_to(searched / "results" / stage)
    shutil.copy(searched / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    assert main(["search", "--budget", "0.5", "--params", "params.yaml"]) == 0
    first = (searched / "results/search/0.5/ranks.json").read_text()
    assert (tmp_path / "results/search/0.5/ranks.json").read_text() == first


def test_search_with_a_budget_not_in_params_is_one_clear_line(searched: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(searched)
    assert main(["search", "--budget", "0.42", "--params", "params.yaml"]) == 2
    assert "--budget 0.42: not one of budgets.search [0.5]" in capsys.readouterr().err


def test_search_below_the_smallest_subnet_is_one_clear_line(searched: Path, tmp_path: Path, monkeypatch, capsys):
    params = yaml.safe_load((searched / "params.yaml").read_text())
    params["budgets"] = {"search": [0.1], "uniform": [0.05, 0.1], "slim": [0.05], "slim_base": 0.3, "slim_flora": [0.1]}
    params["budgets"] |= {"ofb": [0.05, 0.3], "ofb_base": 0.3, "ofb_flora": [0.1], "latency": [0.98]}
    params["budgets"] |= {"slim_flora_latency": [0.9], "ofb_flora_latency": [0.9]}
    params["budgets"] |= {"uniform_latency": [], "slim_latency": [], "ofb_latency": []}
    params["budgets"]["latency_unit"] = "fraction"
    (tmp_path / "results").mkdir()
    for stage in ("pretrain", "filter", "supernet"):
        (tmp_path / "results" / stage).symlink_to(searched / "results" / stage)
    monkeypatch.chdir(tmp_path)
    assert main(["search", "--budget", "0.1", "--params", str(write_params(tmp_path / "params.yaml", params))]) == 2
    assert "budgets.search: 0.1 is below the cheapest subnet of the filtered space (0." in capsys.readouterr().err


def test_a_flora_budget_above_its_pruned_base_model_is_one_clear_line() -> None:
    table = CostTable(10, (np.array([5, 10, 20]), np.array([5, 10, 20])))  # a pruned base: at most 50 of 100 MACs
    describe = "{:.0f} MACs".format
    with pytest.raises(UserError, match=r"budgets.ofb_flora: 0.6 is not below the model FLORA compresses \(50 MACs"):
        check_reachable(table, 58, 60, "budgets.ofb_flora", 0.6, describe)
    check_reachable(table, 48, 50, "budgets.ofb_flora", 0.5, describe)  # reachable: no error


@pytest.mark.parametrize("method", ["flora", "control", "uniform"])
def test_retrain_writes_a_plain_model_whose_macs_flop_counter_confirms(searched: Path, method: str) -> None:
    out = searched / "results/retrain" / method / "0.5"
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"top1", "top5", "val_top1", "macs", "params"} <= set(metrics)
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 1
    assert metrics["macs"] <= 0.5 * DENSE_MACS
    model, spec = load_model(out / "model")
    assert spec.factorised and not spec.lowrank
    assert not any(type(m).__name__ == "LowRankLinear" for m in model.modules())
    assert count_macs(model, (1, 8, 8)) == metrics["macs"]
    assert sum(p.numel() for p in model.parameters()) == metrics["params"]
    ranks = json.loads((out / "ranks.json").read_text())["ranks"]
    assert {name: rank for name, rank in ranks.items()} == spec.factorised
    smoke = yaml.safe_load(SMOKE.read_text())
    trained = smoke["retrain"]["epochs"] + (smoke["supernet"]["epochs"] if method == "uniform" else 0)
    epochs = list(range(1, trained + 1))  # uniform: supernet.epochs + retrain.epochs, from the SVD factors
    history = pd.read_csv(out / "history.csv")
    assert list(history["seed"]) == [0] * len(epochs) + [1] * len(epochs) and list(history["epoch"]) == epochs * 2
    supernet = json.loads((searched / "results/supernet/metrics.json").read_text())
    training = metrics["training"]
    assert (training["steps"], training["images"]) == (history["steps"].iloc[-1], history["images"].iloc[-1])
    assert training["total_images"] == training["images"] + training["inherited_images"]
    assert training["inherited_steps"] == (0 if method == "uniform" else supernet["train_steps"])


def test_latency_stage_times_every_model_beside_the_dense_one(searched: Path) -> None:
    table = pd.read_csv(searched / "results/latency/latency.csv")
    assert list(zip(table["method"], table["budget"], strict=True)) == [
        ("dense", 1.0),
        ("uniform", 0.4),
        ("uniform", 0.5),
        ("control", 0.4),
        ("control", 0.5),
        ("flora", 0.5),
        ("control_latency", 0.98),
        ("uniform_latency", 0.98),
        ("flora_latency", 0.98),
        ("slim", 0.35),
        ("slim_latency", 0.98),
        ("slim_flora", 0.4),
        ("slim_flora_latency", 0.98),
        ("ofb", 0.35),
        ("ofb", 0.5),
        ("ofb_latency", 0.98),
        ("ofb_flora", 0.4),
        ("ofb_flora_latency", 0.98),
    ]
    assert (table["latency_ms"] > 0).all() and (table["device"] == "cpu").all()
    assert table.set_index("method").loc["dense", "speedup"] == 1
    metrics = json.loads((searched / "results/latency/metrics.json").read_text())
    assert (
        metrics["cpu"]["models_ms"]["flora 0.5"]
        == table.set_index(["method", "budget"]).loc[("flora", 0.5), "latency_ms"]
    )


def test_flora_retrain_starts_from_the_searched_supernet_subnet(searched: Path) -> None:
    flora = json.loads((searched / "results/retrain/flora/0.5/ranks.json").read_text())
    searched_ranks = json.loads((searched / "results/search/0.5/ranks.json").read_text())
    assert flora == searched_ranks
    uniform = json.loads((searched / "results/retrain/uniform/0.5/metrics.json").read_text())
    assert 0 < uniform["rank_ratio"] < 1
    control = searched / "results/retrain/control/0.5"
    assert json.loads((control / "ranks.json").read_text()) == json.loads(
        (searched / "results/retrain/uniform/0.5/ranks.json").read_text()
    )  # the control has the uniform baseline's ranks, and the supernet's weights
    assert json.loads((control / "metrics.json").read_text())["source"] == "supernet weights, uniform rank ratio"


def test_compressed_model_loads_with_torch_timm_and_the_core_library(searched: Path) -> None:
    """The few lines docs/using-a-model.md shows for loading a compressed model in one's own code."""
    import timm
    from safetensors.torch import load_file

    from flora_steps.core import factorised_pair

    stem = searched / "results/retrain/flora/0.5/model"
    spec = json.loads(stem.with_suffix(".json").read_text())
    model = timm.create_model(spec["model"], **spec["model_kwargs"])
    for name, rank in spec["factorised"].items():
        dense = model.get_submodule(name)
        model.set_submodule(name, factorised_pair(dense.in_features, dense.out_features, rank, dense.bias is not None))
    model.load_state_dict(load_file(stem.with_suffix(".safetensors")))

    reference, _ = load_model(stem)
    images = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.eval()(images), reference.eval()(images))


def test_onnx_export_matches_pytorch(searched: Path, tmp_path: Path) -> None:
    model, _ = load_model(searched / "results/retrain/flora/0.5/model")
    export_onnx(model, input_shape(model), tmp_path / "model.onnx")
    assert onnx_max_difference(model, input_shape(model), tmp_path / "model.onnx", batch=7) < 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary files left behind


def test_flora_export_command(searched: Path, tmp_path: Path, capsys) -> None:
    assert main(["export", str(searched / "results/retrain/uniform/0.5/model"), str(tmp_path / "u.onnx")]) == 0
    assert "ONNX Runtime matches PyTorch" in capsys.readouterr().out
    assert main(["export", str(searched / "results/retrain/uniform/0.5/model"), str(tmp_path / "u.txt")]) == 2


def test_uniform_chooser_hits_the_budget_from_below_as_closely_as_the_grid_allows() -> None:
    layers = {
        f"blocks.{b}.{n}": LinearCost(i, o, 197)
        for b in range(3)
        for n, (i, o) in {"attn.qkv": (96, 288), "mlp.fc1": (96, 384), "mlp.fc2": (384, 96)}.items()
    }
    costs = CostModel(layers, other_macs=5_000_000, other_params=0)
    names = list(layers)
    ratios = candidate_ratios(costs, names)
    for budget in np.linspace(0.3, 0.95, 14):
        ratio, ranks = fit_uniform_ratio(costs, names, budget * costs.dense_macs)
        assert costs.macs(ranks) <= budget * costs.dense_macs
        larger = [r for r in ratios if r > ratio]
        if larger:  # the next ratio of the grid would overshoot the budget
            assert costs.macs(uniform_ranks(costs, names, larger[0])) > budget * costs.dense_macs
        assert len(set(ranks.values())) <= 1  # one rank for all (equal full ranks here)
    with pytest.raises(ValueError, match=r"below the uniform model at rank ratio 0.01042 \("):
        fit_uniform_ratio(costs, names, 0.05 * costs.dense_macs)
    aligned = candidate_ratios(costs, names, multiple=8)
    for budget in np.linspace(0.3, 0.95, 14):
        ratio, ranks = fit_uniform_ratio(costs, names, budget * costs.dense_macs, multiple=8)
        assert all(rank % 8 == 0 for rank in ranks.values())
        assert costs.macs(ranks) <= budget * costs.dense_macs
        larger = [r for r in aligned if r > ratio]
        if larger:
            assert costs.macs(uniform_ranks(costs, names, larger[0], multiple=8)) > budget * costs.dense_macs


def test_a_killed_retrain_resumes_seed_by_seed_and_matches_an_uninterrupted_run(
    searched: Path, tmp_path: Path, monkeypatch
):
    params = yaml.safe_load((searched / "params.yaml").read_text())
    params["retrain"] |= {"epochs": 2, "uniform_epochs": 2, "seeds": [0, 1]}
    (tmp_path / "results").mkdir()
    for stage in ("pretrain", "decompose"):
        (tmp_path / "results" / stage).symlink_to(searched / "results" / stage)
    params_file = str(write_params(tmp_path / "params.yaml", params))
    monkeypatch.chdir(tmp_path)
    command = ["retrain", "--method", "uniform", "--budget", "0.4", "--params", params_file]
    assert main(command) == 0
    out = tmp_path / "results/retrain/uniform/0.4"
    uninterrupted = {name: (out / name).read_bytes() for name in ("model.safetensors", "predictions.csv")}
    metrics = json.loads((out / "metrics.json").read_text())
    shutil.rmtree(out)

    saves = kill_after_first_epoch(monkeypatch, at=3)  # seed 0 done, killed after seed 1's first epoch
    assert main(command) == 130
    assert not (out / "metrics.json").exists()
    assert (out / "checkpoint-seed0.pt").is_file() and (out / "checkpoint-seed1.pt").is_file()
    assert main(command) == 0
    assert saves == [1, 2, 1, 2]  # the rerun trained only seed 1's second epoch
    log = (out / "log.txt").read_text()
    assert "checkpoint-seed0.pt after epoch 2" in log and "checkpoint-seed1.pt after epoch 1" in log
    assert {name: (out / name).read_bytes() for name in uninterrupted} == uninterrupted
    rerun = json.loads((out / "metrics.json").read_text())
    assert rerun["seeds"] == metrics["seeds"] and rerun["top1"] == metrics["top1"]
    assert not list(out.glob("checkpoint*"))


def test_each_seed_is_its_own_fine_tuning_from_the_same_start(searched: Path) -> None:
    out = searched / "results/retrain/uniform/0.4"
    history = pd.read_csv(out / "history.csv")
    predictions = pd.read_csv(out / "predictions.csv")
    first, second = (history[history["seed"] == seed] for seed in (0, 1))
    assert list(first["epoch"]) == list(second["epoch"])
    assert not np.allclose(first["train_loss"], second["train_loss"])  # other shuffling and augmentation
    metrics = json.loads((out / "metrics.json").read_text())
    correct = predictions.assign(right=predictions["label"] == predictions["prediction"]).groupby("seed")["right"]
    assert [s["top1"] for s in metrics["seeds"]] == pytest.approx(list(correct.mean()))
    assert metrics["top1"] == pytest.approx(np.mean([s["top1"] for s in metrics["seeds"]]))
