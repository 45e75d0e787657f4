"""The ofb stage on the smoke profile: progressive pruning mid-run, the decided model, the cut, resume after a kill."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import kill_after_first_epoch, write_params

from flora_steps.cli import main
from flora_steps.core import count_macs
from flora_steps.core.latency import StructureTable
from flora_steps.pruning.ofb import OFBGrids, OFBLatency, OFBSearch
from flora_steps.runtime.artifacts import load_model


@pytest.fixture
def prepared(workdir: Path, smoke_results: Path, smoke_params: dict) -> Path:
    (workdir / "results").mkdir()
    (workdir / "results/pretrain").symlink_to(smoke_results / "pretrain")
    smoke_params["ofb"] |= {"epochs": 3, "arch_lr": 0.3, "prune_threshold": 0.5}  # prunes early
    return write_params(workdir / "params.yaml", smoke_params)


def test_the_ofb_search_prunes_as_it_goes_and_keeps_its_best_decided_epoch(workdir: Path, prepared: Path) -> None:
    assert main(["ofb", "--params", str(prepared), "--budget", "0.35"]) == 0
    out = workdir / "results/ofb/0.35"
    history = pd.read_csv(out / "history.csv")
    assert history["live_candidates"].iloc[-1] < 73  # of the 73 candidate widths, some died during the search
    metrics = json.loads((out / "metrics.json").read_text())
    decided = metrics["decided_epoch"]
    assert decided is not None and metrics["undecided_modules"] == 0
    assert history["undecided"].iloc[decided - 1] == 0 and (history["mask_ratio"].iloc[decided - 1 :] == 0).all()
    after = history.iloc[decided - 1 :]
    best = after["val_top1"].max()
    assert metrics["val_top1_masked"] == pytest.approx(best, abs=1e-5)
    assert metrics["kept_epoch"] == int(after.loc[(after["val_top1"] - best).abs() < 1e-5, "epoch"].iloc[-1])
    if metrics["cut"]:  # decided above the budget: narrowed into [0.33, 0.35] then, and trained on
        assert metrics["searched_macs_fraction"] > 0.35 and 0.33 <= metrics["macs_fraction"] <= 0.35
    else:
        assert metrics["searched_macs_fraction"] == metrics["macs_fraction"] <= 0.35
    # the kept epoch's model, sliced, computes what it computed masked (cut or not)
    assert abs(metrics["val_top1_sliced"] - metrics["val_top1_masked"]) < 0.01
    model, spec = load_model(out / "model")
    assert count_macs(model, (1, 8, 8)) == metrics["macs"] == json.loads((out / "structure.json").read_text())["macs"]
    assert spec.embed_dim == model.embed_dim and set(spec.pruned) == {f"blocks.{i}" for i in range(4)}
    assert type(model).__name__ == "VisionTransformer" and not (out / "checkpoint.pt").exists()


def test_a_killed_ofb_search_resumes_with_its_pruned_shapes(workdir: Path, prepared: Path, monkeypatch) -> None:
    command = ["ofb", "--params", str(prepared), "--budget", "0.35"]
    assert main(command) == 0
    uninterrupted = (workdir / "results/ofb/0.35/model.safetensors").read_bytes()
    (workdir / "results/ofb").rename(workdir / "first")
    kill_after_first_epoch(monkeypatch)
    assert main(command) == 130
    checkpoint = torch.load(workdir / "results/ofb/0.35/checkpoint.pt", weights_only=True)
    live = sum(sum(map(int, torch.tensor(s["alive"]).flatten())) for s in checkpoint["hook"]["shapes"].values())
    assert live < 89  # the checkpoint holds a pruned model
    assert main(command) == 0
    assert "resuming from" in (workdir / "results/ofb/0.35/log.txt").read_text()
    assert (workdir / "results/ofb/0.35/model.safetensors").read_bytes() == uninterrupted


def test_a_checkpoint_whose_weights_do_not_fit_its_pruned_shapes_stops_with_one_line(
    workdir: Path, prepared: Path, monkeypatch, capsys
) -> None:
    command = ["ofb", "--params", str(prepared), "--budget", "0.35"]
    kill_after_first_epoch(monkeypatch)
    assert main(command) == 130
    path = workdir / "results/ofb/0.35/checkpoint.pt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model"].pop("vit.head.weight")  # the run's own identity, but weights that cannot load
    torch.save(checkpoint, path)
    assert main(command) == 2
    assert "results/ofb/0.35/checkpoint.pt: does not load (its weights do not fit the model)" in capsys.readouterr().err
    assert path.exists() and not (workdir / "results/ofb/0.35/model.safetensors").exists()


def test_ofb_refuses_a_budget_that_is_not_one_of_its_own(workdir: Path, prepared: Path, capsys) -> None:
    assert main(["ofb", "--params", str(prepared), "--budget", "0.9"]) == 2
    assert "--budget 0.9: not one of budgets.ofb" in capsys.readouterr().err


def test_a_budget_below_the_smallest_candidate_structure_stops_before_training(
    workdir: Path, smoke_results: Path, smoke_params: dict, capsys
) -> None:
    (workdir / "results").mkdir()
    (workdir / "results/pretrain").symlink_to(smoke_results / "pretrain")
    smoke_params["budgets"] |= {"ofb": [0.05, 0.5], "ofb_base": 0.5, "ofb_flora": [0.1]}
    params = write_params(workdir / "params.yaml", smoke_params)
    assert main(["ofb", "--params", str(params), "--budget", "0.05"]) == 2
    assert (
        "budgets.ofb: 0.05 is below the smallest structure the candidate widths allow (0.1" in capsys.readouterr().err
    )
    assert not (workdir / "results/ofb/0.05/checkpoint.pt").exists()


def smallest_predicted_fraction(workdir: Path, params: dict) -> float:
    """The smallest share of the dense model's latency OFB's grids allow, by the latency table (timings vary by
    machine: the tests choose their budgets from it)."""
    table = StructureTable.from_frame(pd.read_csv(workdir / "results/latency_table_ofb/table.csv"))
    vit, _ = load_model(workdir / "results/pretrain/model")
    cfg = params["ofb"]
    grids = OFBGrids(cfg["head_ratios"], cfg["head_dim_ratios"], cfg["mlp_ratios"], cfg["embed_ratios"])
    search = OFBSearch(vit, grids, in_chans=1, target_window=3, seed=0)
    return search.smallest_cost(OFBLatency(table, search)) / table.dense_ms


def test_ofb_under_a_latency_budget_is_priced_by_its_latency_table(
    workdir: Path, prepared: Path, smoke_params: dict
) -> None:
    assert main(["latency_table_ofb", "--params", str(prepared)]) == 0
    table = pd.read_csv(workdir / "results/latency_table_ofb/table.csv")
    assert (
        set(table["part"]) == {"attention", "mlp", "skeleton", "residual", "model"} and (table["device"] == "cpu").all()
    )
    budget = round((smallest_predicted_fraction(workdir, smoke_params) + 1) / 2, 3)  # halfway to dense
    smoke_params["budgets"]["ofb_latency"] = [budget]
    write_params(prepared, smoke_params)
    assert main(["ofb", "--params", str(prepared), "--method", "latency", "--budget", str(budget)]) == 0
    out = workdir / f"results/ofb_latency/{budget}"
    metrics = json.loads((out / "metrics.json").read_text())
    if metrics["cut"]:  # decided above the budget: narrowed into [budget - 0.02, budget] of the dense model's ms
        assert metrics["searched_predicted_fraction"] > budget
        assert budget - 0.02 <= metrics["predicted_fraction"] <= budget
    else:
        assert metrics["searched_predicted_fraction"] == metrics["predicted_fraction"] <= budget
    model, spec = load_model(out / "model")
    assert count_macs(model, (1, 8, 8)) == metrics["macs"] and spec.embed_dim == model.embed_dim
    history = pd.read_csv(out / "history.csv")
    assert history["expected_fraction"].between(0, 1.01).all()


def test_a_latency_budget_below_ofbs_smallest_structure_stops_with_one_line(
    workdir: Path, prepared: Path, smoke_params: dict, capsys
) -> None:
    smoke_params["budgets"]["ofb_latency"] = [0.01]
    write_params(prepared, smoke_params)
    assert main(["latency_table_ofb", "--params", str(prepared)]) == 0
    assert main(["ofb", "--params", str(prepared), "--method", "latency", "--budget", "0.01"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "budgets.ofb_latency: 0.01 is below the smallest structure the candidate widths allow" in error
    assert "of the dense model's ms" in error
    assert not (workdir / "results/ofb_latency/0.01").exists()
