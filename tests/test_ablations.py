"""The paper's ablations: their stages and wiring, their maths, and the ablations stage on the smoke run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import SMOKE
from torch import nn

from flora_steps.cli import main
from flora_steps.core import factorise, randomise_factors
from flora_steps.core.filter import keep_efficient
from flora_steps.errors import ParamsError
from flora_steps.params import load_params, with_values
from flora_steps.pipeline.catalogue import ABLATION_STAGES, STAGES
from flora_steps.pipeline.methods import ABLATIONS
from flora_steps.report.ablations import ablation_table
from flora_steps.report.stats import PairedBootstrap, interval
from flora_steps.report.tables import Evaluated


def test_each_ablation_reruns_flora_from_the_first_stage_it_changes() -> None:
    # without filtering: its own filter keeps every tuple, its supernet and search read that space
    assert STAGES["filter_whole_space"].overrides == {"filter.keep_ratio": 1.0, "filter.local.epochs": 0}
    assert STAGES["supernet_whole_space"].inputs["space"].stage == "filter_whole_space"
    assert STAGES["search_whole_space"].inputs["space"].stage == "filter_whole_space"
    # uniform sampling and random factors: FLORA's filter, their own supernet, search and fine-tuning
    for name in ("uniform_sampling", "random_init"):
        assert STAGES[f"supernet_{name}"].inputs["space"].stage == "filter"
        assert STAGES[f"search_{name}"].inputs["model"].stage == f"supernet_{name}"
        retrain = STAGES[f"retrain_flora_{name}"]
        assert (retrain.inputs["model"].stage, retrain.inputs["ranks"].stage) == (f"supernet_{name}", f"search_{name}")
        assert retrain.inputs["inherited"].stage == f"supernet_{name}"
    assert STAGES["supernet_random_init"].overrides == {"supernet.init": "random"}
    # no supernet: the search and the fine-tuning start from the SVD, fine-tuned as long as supernet + retrain
    assert "supernet_svd_weights" not in STAGES
    assert STAGES["search_svd_weights"].inputs["model"].stage == "decompose"
    retrain = STAGES["retrain_flora_svd_weights"]
    assert retrain.inputs["model"].stage == "decompose" and "inherited" not in retrain.inputs
    assert {"retrain.uniform_epochs", "supernet.epochs"} <= set(retrain.params)
    # an override is not tracked (it is the same whatever the params say), nor what it makes moot
    assert "supernet.sampling" in STAGES["supernet"].params
    assert "supernet.sampling" not in STAGES["supernet_uniform_sampling"].params
    assert not [key for key in STAGES["filter_whole_space"].params if key.startswith("filter.local.")]
    # its own folders and commands; nothing of FLORA's is renamed
    search = STAGES["search_random_init"]
    assert search.folder == "ablations/random_init/search/{budget}" and search.foreach == "search"
    assert search.arguments("0.5") == ["--ablation", "random_init", "--budget", "0.5"]
    assert {stage.ablation for stage in ABLATION_STAGES} == {*ABLATIONS, None}  # None: the ablations table
    assert all(stage.ablation is None for stage in STAGES.values() if stage not in ABLATION_STAGES)


def test_an_ablation_on_another_base_is_one_clear_line(capsys) -> None:
    assert main(["supernet", "--base", "slim", "--ablation", "uniform_sampling", "--params", str(SMOKE)]) == 2
    assert "the ablations run on the dense model only, not with --base slim" in capsys.readouterr().err


def test_overrides_replace_params_values_and_are_validated() -> None:
    params = load_params(SMOKE)
    changed = with_values(params, {"supernet.sampling": "uniform", "filter.local.epochs": 0})
    assert (changed.supernet.sampling, changed.filter.local.epochs) == ("uniform", 0)
    assert params.supernet.sampling == "lowrank"  # the original is left alone
    assert with_values(params, {}) is params
    with pytest.raises(ParamsError, match="supernet.sampling"):
        with_values(params, {"supernet.sampling": "sideways"})
    with pytest.raises(KeyError, match="supernet.nope"):
        with_values(params, {"supernet.nope": 1})


def test_random_factors_replace_the_svd_and_keep_the_bias_and_the_scale() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48))
    factorise(model, ["0"])
    layer = model[0]
    bias, svd = layer.bias.detach().clone(), layer.dense_weight().detach().clone()
    randomise_factors(model, seed=3)
    weight = layer.dense_weight().detach()
    assert torch.equal(layer.bias, bias) and not torch.allclose(weight, svd, atol=1e-2)
    again = nn.Sequential(nn.Linear(64, 48))
    factorise(again, ["0"])
    randomise_factors(again, seed=3)
    assert torch.equal(again[0].dense_weight(), layer.dense_weight())  # the same seed draws the same factors
    inputs = torch.randn(4096, 64)
    assert 0.8 < (F.linear(inputs, weight).std() / inputs.std()).item() < 1.25  # a fresh layer's scale


def test_keeping_every_share_of_every_bin_is_the_whole_space() -> None:
    rng = np.random.default_rng(0)
    macs = rng.integers(10, 100, 40)
    assert keep_efficient(macs, 100 - macs, rng.random(40), 1.0, 5, dense_index=0).all()


def _models(method: str, budgets, correct_by_budget, runs: int) -> list[Evaluated]:
    return [
        Evaluated(method, budget, {"macs": 1000 * budget}, correct_by_budget[run, index], run)
        for run in range(runs)
        for index, budget in enumerate(budgets)
    ]


@pytest.mark.parametrize("runs", [1, 2])
def test_ablation_differences_are_paired_and_their_mean_is_over_budgets(runs: int) -> None:
    rng = np.random.default_rng(0)
    budgets, seeds, images = [0.3, 0.5], 3, 400
    flora = (rng.random((runs, len(budgets), seeds, images)) < 0.8).astype(float)
    worse = flora * (rng.random(flora.shape) > 0.2)  # loses a fifth of FLORA's right answers
    models = [
        *_models("flora", budgets, flora, runs),
        *_models("whole_space", budgets, flora.copy(), runs),  # the same predictions as FLORA
        *_models("uniform_sampling", budgets, worse, runs),
    ]
    bootstrap = PairedBootstrap(seeds, images, 500, np.random.default_rng(1), runs=runs)
    table = ablation_table(models, bootstrap, {"flora": 12.5})
    assert list(table["method"]) == ["flora"] * 3 + ["whole_space"] * 3 + ["uniform_sampling"] * 3
    assert table["budget"].isna().tolist() == [True, False, False] * 3  # the mean over budgets first
    assert table.loc[0, "search_seconds"] == 12.5 and table["search_seconds"].isna().sum() == 8
    assert table.loc[table["method"] == "flora", "delta_top1"].isna().all()

    same = table[table["method"] == "whole_space"]
    assert (same["delta_verdict"] == "identical model").all() and (same["delta_top1"] == 0).all()
    lower = table[table["method"] == "uniform_sampling"]
    assert (lower["delta_verdict"] == "worse").all() and (lower["delta_sim_verdict"] == "worse").all()
    mean, per_budget = lower.iloc[0], lower.iloc[1:]
    assert mean["delta_top1"] == pytest.approx(per_budget["delta_top1"].mean())
    assert mean["top1"] == pytest.approx(worse.mean())
    # paired: the replicates of a difference are the differences of the replicates, run by run
    for index, (_, row) in enumerate(per_budget.iterrows()):
        samples = bootstrap.combine(
            np.array([bootstrap.in_run(worse[run, index]) - bootstrap.in_run(flora[run, index]) for run in range(runs)])
        )
        assert (row["delta_low"], row["delta_high"]) == pytest.approx(interval(samples))
        assert row["flora_top1"] == pytest.approx(flora[:, index].mean())
    # the simultaneous interval holds over every per-budget row together: at least as wide
    assert (per_budget["delta_sim_low"] <= per_budget["delta_low"]).all()
    assert (per_budget["delta_sim_high"] >= per_budget["delta_high"]).all()


@pytest.fixture(scope="module")
def ablations(smoke_pipeline: Path) -> Path:
    """The ablations table the smoke pipeline wrote (every stage ran there, the ablations too)."""
    return smoke_pipeline / "results/ablations/report"


def test_the_ablations_stage_writes_its_table_figure_and_summary(ablations: Path, smoke_pipeline: Path) -> None:
    table = pd.read_csv(ablations / "ablations.csv")
    assert list(dict.fromkeys(table["protocol"])) == ["fine-tuned", "inherited"]
    assert list(dict.fromkeys(table["method"])) == ["flora", *ABLATIONS]
    assert len(table) == 2 * 5 * 2  # two protocols, five methods, a mean and one budget each
    compared = table[table["method"] != "flora"]
    assert compared["delta_verdict"].notna().all() and compared["delta_sim_low"].notna().all()
    assert (table.loc[table["budget"].isna(), "search_seconds"] > 0).all()
    shown = (ablations / "ablations.md").read_text()
    assert shown.startswith("Intervals omit run-to-run variance") and "no supernet" in shown
    assert (ablations / "ablations.png").stat().st_size > 10_000 and (ablations / "ablations.tex").is_file()
    summary = json.loads((ablations / "summary.json").read_text())
    assert set(summary["ablations"]) == set(ABLATIONS) and summary["statistics"]["runs"] == 1
    entry = summary["inherited"]["uniform_sampling"]
    assert entry["mean_over_budgets"]["delta_top1_vs_flora"]["verdict"] in (
        "better",
        "worse",
        "within noise",
        "identical model",
    )
    # what each ablation's stages did
    results = smoke_pipeline / "results"
    whole = json.loads((results / "ablations/whole_space/filter/metrics.json").read_text())
    assert whole["kept"] == whole["scored"]  # the whole space
    assert json.loads((results / "filter/metrics.json").read_text())["kept"] < whole["kept"]
    params = load_params(smoke_pipeline / "params.yaml")
    svd = json.loads((results / "ablations/svd_weights/retrain/0.5/metrics.json").read_text())
    assert svd["training"]["epochs"] == params.supernet.epochs + params.retrain.epochs  # equal training
    assert svd["training"]["inherited_steps"] == 0
    assert "random factors" in (results / "ablations/random_init/supernet/log.txt").read_text()


def test_the_ablations_stage_is_byte_identical_when_run_again(
    ablations: Path, smoke_pipeline: Path, tmp_path, monkeypatch
):
    (tmp_path / "results").mkdir()
    for folder in (smoke_pipeline / "results").iterdir():
        if folder.name != "ablations":
            (tmp_path / "results" / folder.name).symlink_to(folder)
    (tmp_path / "results/ablations").mkdir()
    for folder in (smoke_pipeline / "results/ablations").iterdir():
        if folder.name != "report":
            (tmp_path / "results/ablations" / folder.name).symlink_to(folder)
    shutil.copy(smoke_pipeline / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    assert main(["ablations", "--params", "params.yaml"]) == 0
    again = tmp_path / "results/ablations/report"
    written = [p.name for p in ablations.iterdir() if p.name != "log.txt"]
    assert len(written) == 5 and all((again / name).read_bytes() == (ablations / name).read_bytes() for name in written)
