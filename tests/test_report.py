"""The report stage: every table and figure from a smoke results tree, byte-identical reruns, the trade-off maths."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from flora_steps.cli import main
from flora_steps.pipeline.catalogue import idle_stages
from flora_steps.report.figures import plot_tradeoff
from flora_steps.report.tradeoff import (
    envelope,
    extra_reduction,
    extra_reduction_or_bound,
    macs_for_accuracy,
    pareto_front,
    segment_span,
    top1_at_macs,
)

TABLES = ["results", "comparison", "means", "ranks", "costs", "search_costs", "latency", "latency_comparison"]
FIGURES = ["tradeoff", "spectra", "sensitivity", "search", "ranks", "sampling", "latency"]


def test_macs_for_accuracy_interpolates_on_the_pareto_front() -> None:
    macs, top1 = [30, 50, 70, 100], [0.80, 0.90, 0.92, 0.95]
    assert macs_for_accuracy(macs, top1, 0.85) == pytest.approx(40)
    assert macs_for_accuracy(macs, top1, 0.91) == pytest.approx(60)
    assert macs_for_accuracy(macs, top1, 0.80) == 30  # exactly the cheapest point
    assert macs_for_accuracy(macs, top1, 0.70) is None  # below the curve: never extrapolated
    assert macs_for_accuracy(macs, top1, 0.96) is None  # above dense
    # A dip does not count: a dominated point is off the front.
    assert macs_for_accuracy([30, 50, 70, 100], [0.80, 0.90, 0.85, 0.95], 0.90) == pytest.approx(50)
    assert macs_for_accuracy([100, 30], [0.95, 0.80], 0.875) == pytest.approx(65)  # order does not matter


def test_extra_reduction_on_a_hand_made_curve() -> None:
    # Uniform needs 60 MACs for 91% top-1; FLORA gets 91% with 40: one third fewer MACs.
    assert extra_reduction(40, 0.91, [30, 50, 70, 100], [0.80, 0.90, 0.92, 0.95]) == pytest.approx(1 / 3)
    assert extra_reduction(80, 0.85, [30, 50, 70, 100], [0.80, 0.90, 0.92, 0.95]) == pytest.approx(-1.0)
    assert extra_reduction(40, 0.99, [30, 100], [0.8, 0.95]) is None


@pytest.mark.parametrize(
    ("curve", "point", "expected"),
    [
        (([30, 60, 100], [0.9, 0.9, 0.9]), (40, 0.9), 1 - 40 / 30),  # flat curve: its cheapest point reaches it
        (([30, 60, 100], [0.9, 0.9, 0.9]), (40, 0.905), None),  # flat curve, point above it: out of range
        (([30, 60, 100], [0.8, 0.9, 0.95]), (20, 0.7), None),  # point below the cheapest uniform model
        (([30, 60, 100], [0.8, 0.9, 0.95]), (50, 0.96), None),  # point above dense
        (([30, 60, 80, 100], [0.8, 0.92, 0.88, 0.95]), (50, 0.9), 1 - 50 / 55),  # non-monotone: the front
        # the dominated 80-MACs point is dropped: 0.93 lies a third of the way from (60, 0.92) to (100, 0.95)
        (([30, 60, 80, 100], [0.8, 0.92, 0.88, 0.95]), (50, 0.93), 1 - 50 / (60 + 40 / 3)),
        (([30, 30, 100], [0.7, 0.8, 0.95]), (25, 0.8), 1 - 25 / 30),  # equal MACs: the better model stands
    ],
)
def test_extra_reduction_edge_cases(curve, point, expected) -> None:
    result = extra_reduction(*point, *curve)
    assert result == (None if expected is None else pytest.approx(expected))


def test_the_pareto_front_drops_dominated_points_and_keeps_the_best_of_equal_macs() -> None:
    assert pareto_front([30, 60, 80, 100], [0.8, 0.92, 0.88, 0.95]) == [0, 1, 3]
    assert pareto_front([100, 30, 30], [0.95, 0.7, 0.8]) == [2, 0]  # MACs order, whatever the input order
    assert pareto_front([30, 60], [0.9, 0.9]) == [0]  # no more top-1 for more MACs: off the front
    xs, ys = envelope([30, 60, 100], [0.8, 0.96, 0.95])  # a model above dense: flat up to dense's MACs
    assert xs.tolist() == [30, 60, 100] and ys.tolist() == [0.8, 0.96, 0.96]


def test_top1_at_macs_reads_the_front_and_never_extrapolates() -> None:
    curve = ([20, 40, 100], [0.8, 0.9, 0.95])
    assert top1_at_macs(*curve, 25) == pytest.approx(0.825)
    assert top1_at_macs(*curve, 40) == pytest.approx(0.9) and top1_at_macs(*curve, 100) == pytest.approx(0.95)
    assert top1_at_macs(*curve, 19.9) is None and top1_at_macs(*curve, 101) is None
    assert top1_at_macs([], [], 50) is None
    # A worse model added to the curve does not lower it: 80 MACs reads the (60, 0.92)-(100, 0.95) segment.
    assert top1_at_macs([30, 60, 80, 100], [0.8, 0.92, 0.88, 0.95], 80) == pytest.approx(0.935)
    assert top1_at_macs([30, 60, 100], [0.8, 0.96, 0.95], 80) == pytest.approx(0.96)


def test_out_of_range_replicates_become_unbounded_ends() -> None:
    curve = ([30, 60, 100], [0.8, 0.9, 0.95])
    assert extra_reduction_or_bound(20, 0.7, *curve) == -np.inf  # below the cheapest point: no lower bound
    assert extra_reduction_or_bound(50, 0.96, *curve) == np.inf  # above dense: no upper bound
    assert extra_reduction_or_bound(45, 0.9, *curve) == pytest.approx(0.25)


@pytest.fixture(scope="module")
def reported(smoke_pipeline: Path, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("report")
    (directory / "results").mkdir()
    for folder in (smoke_pipeline / "results").iterdir():  # every stage's but the ablations'
        if folder.name != "ablations":
            (directory / "results" / folder.name).symlink_to(folder)
    shutil.copy(smoke_pipeline / "params.yaml", directory / "params.yaml")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)
        assert main(["report", "--params", "params.yaml"]) == 0
    return directory


def test_report_writes_every_table_and_figure(reported: Path) -> None:
    out = reported / "results/report"
    for name in TABLES:
        for suffix in ("csv", "md", "tex"):
            assert (out / f"{name}.{suffix}").stat().st_size > 0, f"{name}.{suffix}"
    for name in FIGURES:
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    both = pd.read_csv(out / "results.csv")
    assert {"protocol", "method", "budget", "macs", "params", "top1"} <= set(both.columns)
    results = both[both["protocol"] == "fine-tuned"].reset_index(drop=True)
    # The paper's protocol: the same models as their fine-tuning starts, evaluated once, with only what they inherit.
    before = both[both["protocol"] == "inherited"].reset_index(drop=True)
    assert list(before["method"]) == list(results["method"]) and before["seeds"].isna().all()
    flora_metrics = json.loads((reported / "results/retrain/flora/0.5/metrics.json").read_text())
    assert before[before["method"] == "flora"]["top1"].item() == pytest.approx(flora_metrics["top1_before_finetune"])
    assert (before["train_steps"] == before["supernet_steps"]).iloc[1:].all()
    methods = ["dense"] + ["uniform"] * 2 + ["control"] * 2 + ["flora", "control_latency", "uniform_latency"]
    methods += ["flora_latency"]
    methods += ["slim", "slim_latency", "slim_flora", "slim_flora_latency"]
    methods += ["ofb", "ofb", "ofb_latency", "ofb_flora", "ofb_flora_latency"]
    assert list(results["method"]) == methods
    assert list(results["budget"]) == [
        1.0,
        0.4,
        0.5,
        0.4,
        0.5,
        0.5,
        0.98,
        0.98,
        0.98,
        0.35,
        0.98,
        0.4,
        0.98,
        0.35,
        0.5,
        0.98,
        0.4,
        0.98,
    ]
    assert (results["top1_low"] <= results["top1"]).all() and (results["top1"] <= results["top1_high"]).all()
    assert list(results["seeds"].fillna(0)) == [0] + [2] * 17
    flora = results[results["method"] == "flora"].iloc[0]
    control = results[results["method"] == "control"].iloc[0]
    uniform = results[results["method"] == "uniform"].iloc[0]
    assert flora["train_steps"] == control["train_steps"] > flora["supernet_steps"] > 0  # supernet + retrain
    assert uniform["train_images"] == flora["train_images"] and uniform["supernet_steps"] == 0  # equal training
    slim = results[(results["method"] == "slim") & (results["budget"] == 0.35)].iloc[0]
    on_slim = results[results["method"] == "slim_flora"].iloc[0]
    # FLORA on ViT-Slim's model inherits ViT-Slim's search, its base's fine-tuning and its own supernet: as much
    # training as ViT-Slim's own models
    base_steps = json.loads((reported / "results/on_slim/base/metrics.json").read_text())["finetune_steps"]
    assert base_steps > 0 and on_slim["supernet_steps"] == slim["supernet_steps"] + base_steps + flora["supernet_steps"]
    assert on_slim["train_steps"] == slim["train_steps"]
    assert on_slim["macs"] <= 0.4 * results.iloc[0]["macs"] < 0.5 * results.iloc[0]["macs"]  # below budgets.slim_base
    ofb = results[(results["method"] == "ofb") & (results["budget"] == 0.5)].iloc[0]  # budgets.ofb_base
    on_ofb = results[results["method"] == "ofb_flora"].iloc[0]
    assert on_ofb["supernet_steps"] == ofb["supernet_steps"] + base_steps + flora["supernet_steps"]  # equal again
    assert on_ofb["train_steps"] == ofb["train_steps"] and on_ofb["macs"] < ofb["macs"]
    assert "\\begin{tabular}" in (out / "results.tex").read_text()
    assert "| method" in (out / "results.md").read_text() and " ± " in (out / "results.md").read_text()
    every = pd.read_csv(out / "comparison.csv")
    assert list(every["protocol"]) == ["fine-tuned"] * 4 + ["inherited"] * 4
    comparison = every[every["protocol"] == "fine-tuned"]
    assert list(comparison["method"]) == ["flora", "flora", "slim_flora", "ofb_flora"]
    assert list(comparison["baseline"]) == ["control", "uniform", "slim", "ofb"]
    assert list(comparison["budget"]) == [0.5, 0.5, 0.4, 0.4]
    verdicts = ["better", "worse", "within noise", "identical model", "undetermined", "out of range"]
    assert comparison[["delta_verdict", "delta_sim_verdict", "extra_sim_verdict"]].isin(verdicts).all(axis=None)
    assert ((comparison["delta_sim_low"] <= comparison["delta_low"]) | comparison["delta_low"].isna()).all()
    means = pd.read_csv(out / "means.csv")
    assert list(means["protocol"]) == ["fine-tuned"] * 4 + ["inherited"] * 4
    means = means[means["protocol"] == "fine-tuned"]
    assert list(means["method"]) == ["flora", "flora", "slim_flora", "ofb_flora"] and means["budgets"].eq(1).all()
    assert means["delta_top1"].tolist() == pytest.approx(comparison["delta_top1"].tolist())  # one budget each
    for name in ("results", "comparison", "means"):  # one run: the tables say first what their intervals omit
        assert (out / f"{name}.md").read_text().startswith("Intervals omit run-to-run variance")
    ranks = pd.read_csv(out / "ranks.csv")
    assert len(ranks) == 12 and list(ranks.columns) == ["layer", "full_rank", "0.5"]
    costs = pd.read_csv(out / "costs.csv")
    assert costs["stage"].iloc[-1] == "total"
    assert costs["seconds"].iloc[-1] == pytest.approx(costs["seconds"].iloc[:-1].sum())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dense"]["macs"] == 3_495_040
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "summary.json").stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any other file
    fine_tuned = summary["fine-tuned"]
    assert set(summary["inherited"]) == set(fine_tuned) == {"flora", "slim_flora", "ofb_flora"}
    assert [entry["budget"] for entry in fine_tuned["flora"]["budgets"]] == [0.5]
    entry = fine_tuned["flora"]["budgets"][0]
    assert entry["flora"]["top1"] == pytest.approx(flora["top1"], abs=1e-6) and entry["flora"]["macs"] == flora["macs"]
    assert set(entry) == {"budget", "flora", "vs_control", "vs_uniform"}
    assert entry["vs_control"]["delta_top1"]["verdict"] == comparison["delta_verdict"].iloc[0]
    assert entry["vs_control"]["delta_top1"]["interval"] == pytest.approx(
        comparison.iloc[0][["delta_low", "delta_high"]]
    )
    assert summary["statistics"]["seeds"] == [0, 1] and summary["statistics"]["test_images"] == 360
    assert summary["statistics"]["runs"] == 1 and "run-to-run variance" in summary["statistics"]["omitted_variance"]
    assert fine_tuned["flora"]["mean_over_budgets"]["vs_control"]["delta_top1"]["value"] == pytest.approx(
        means["delta_top1"][0], abs=1e-6
    )
    assert "max_extra_macs_reduction" not in summary  # never a maximum over budgets
    assert set(fine_tuned["flora"]["mean_over_budgets"]) == {"vs_control", "vs_uniform"}
    assert [entry["budget"] for entry in fine_tuned["slim_flora"]["budgets"]] == [0.4]
    assert set(fine_tuned["slim_flora"]["budgets"][0]) == {"budget", "slim_flora", "vs_slim"}
    assert set(summary["inherited"]["slim_flora"]["mean_over_budgets"]) == {"vs_slim"}
    assert set(summary["inherited"]["ofb_flora"]["budgets"][0]) == {"budget", "ofb_flora", "vs_ofb"}
    search_costs = pd.read_csv(out / "search_costs.csv").set_index("method")
    assert list(search_costs.index) == [
        *("uniform", "control", "flora", "control_latency", "uniform_latency", "flora_latency"),
        *("slim", "slim_latency", "slim_flora", "slim_flora_latency", "ofb", "ofb_latency", "ofb_flora"),
        "ofb_flora_latency",
    ]
    for base in ("slim", "ofb"):  # FLORA's latency stages on the pruned model, its latency table, and that model's
        stages = search_costs.loc[f"{base}_flora_latency", "stages"]
        assert f"latency_table_on_{base}" in stages and f"supernet_flora_latency_on_{base}" in stages, stages
        assert f"base_on_{base}" in stages and f"search_flora_latency_on_{base} per budget" in stages, stages

    # The latency methods carry the latency table's timing too; FLORA's its own filter and supernet, not FLORA's.
    def seconds(folder: str) -> float:
        return json.loads((reported / "results" / folder / "metrics.json").read_text())["seconds"]

    once = ("latency_table", "decompose", "filter", "filter_latency", "supernet_latency")
    assert search_costs.loc["flora_latency", "stages"] == (
        "latency_table + decompose + filter + filter_latency + supernet_flora_latency + search_flora_latency per budget"
    )
    assert search_costs.loc["flora_latency", "one_off_seconds"] == pytest.approx(sum(map(seconds, once)), abs=0.02)
    assert search_costs.loc["slim_latency", "one_off_seconds"] == pytest.approx(
        seconds("latency_table") + seconds("slim"), abs=0.02
    )
    assert search_costs.loc["ofb", "budgets"] == 2 and search_costs.loc["ofb", "one_off_seconds"] == 0
    assert search_costs.loc["slim_flora", "one_off_seconds"] > search_costs.loc["slim", "one_off_seconds"]
    flora_cost = search_costs.loc["flora"]
    assert flora_cost["total_seconds"] == pytest.approx(
        flora_cost["one_off_seconds"] + flora_cost["per_budget_seconds"]
    )


def test_report_is_byte_identical_when_run_again(reported: Path, monkeypatch) -> None:
    out = reported / "results/report"
    first = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "log.txt"}
    monkeypatch.chdir(reported)
    assert main(["report", "--params", "params.yaml"]) == 0
    second = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "log.txt"}
    assert first.keys() == second.keys() and len(first) == len(TABLES) * 3 + len(FIGURES) + 1
    assert [name for name in first if first[name] != second[name]] == []


def test_report_without_retrain_results_is_one_clear_line(smoke_pipeline: Path, tmp_path: Path, monkeypatch, capsys):
    (tmp_path / "results").mkdir()
    (tmp_path / "results/pretrain").symlink_to(smoke_pipeline / "results/pretrain")
    shutil.copy(smoke_pipeline / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--params", "params.yaml"]) == 2
    assert "results/retrain/uniform/0.4/predictions.csv: not found" in capsys.readouterr().err


def test_the_headline_figure_has_a_panel_per_comparison_and_protocol_and_one_of_differences() -> None:
    """Each panel fits its own comparison: an outlier of the baseline far below is marked at the edge, not drawn;
    coincident MACs are moved apart; the differences panel lists the mean over budgets first."""
    rows = [
        ("dense", 1.0, 100.0, 0.95),
        ("ofb", 0.2, 20.0, 0.40),  # 40%: far below everything compared
        ("ofb", 0.3, 30.0, 0.80),
        ("ofb", 0.5, 50.0, 0.90),
        ("ofb", 0.6, 60.0, 0.88),  # dominated: the 50-MACs model is more accurate
        ("ofb_flora", 0.3, 30.0, 0.82),  # the same MACs as OFB's 0.3 model
        ("ofb_flora", 0.45, 45.0, 0.86),
    ]
    one = pd.DataFrame(rows, columns=["method", "budget", "macs", "top1"])
    one = one.assign(top1_low=one["top1"] - 0.02, top1_high=one["top1"] + 0.02)
    results = pd.concat([one.assign(protocol=p) for p in ("fine-tuned", "inherited")], ignore_index=True)
    number = {"delta_low": -0.01, "delta_high": 0.05, "delta_sim_low": -0.02, "delta_sim_high": 0.06}
    comparison = pd.DataFrame(
        [
            {"protocol": p, "method": "ofb_flora", "baseline": "ofb", "budget": b, "delta_top1": d}
            | number
            | {"delta_verdict": "within noise"}
            for p in ("fine-tuned", "inherited")
            for b, d in ((0.3, 0.02), (0.45, 0.0))
        ]
    )
    means = comparison.groupby(["protocol", "method", "baseline"], as_index=False).first().assign(delta_top1=0.01)
    figure = plot_tradeoff(results, comparison, means)
    assert len(figure.axes) == 4  # 2 protocols x (one comparison + the differences)
    curve, differences = figure.axes[:2]
    assert curve.get_title() == "FLORA on OFB vs OFB" and curve.get_ylabel() == "fine-tuned\ntest top-1 (%)"
    low, high = curve.get_ylim()
    assert 70 < low < 78 and 95 < high < 100  # fits 78-97, not the 40% outlier
    assert [text.get_text() for text in curve.texts] == ["40.0"]  # the outlier's value at the edge
    xs = sorted(x for line in curve.lines for x in np.atleast_1d(line.get_xdata()) if 29e-6 < x < 31e-6)  # MMACs
    assert xs[0] < 30e-6 < xs[-1]  # OFB's and FLORA on OFB's 30-MACs points side by side
    labels = [tick.get_text() for tick in differences.get_yticklabels()]
    assert labels == ["FLORA on OFB − OFB: mean", "budget 0.3", "budget 0.45"]
    assert figure.axes[2].get_ylabel() == "inherited\ntest top-1 (%)"


def test_segment_span_is_the_width_of_the_segment_an_interpolation_uses() -> None:
    edges = np.array([20.0, 40.0, 100.0])
    assert segment_span(edges, 25) == 2.0
    assert segment_span(edges, 40) == 1.0  # a measured point
    assert segment_span(edges, 60) == 2.5
    assert segment_span(edges, 10) is None
    # on the front: the dominated 60-MACs point does not split the 40-100 segment
    assert segment_span(envelope([20, 40, 60, 100], [0.8, 0.9, 0.85, 0.95])[0], 70) == 2.5


def test_a_new_method_is_one_record(monkeypatch) -> None:
    """A throwaway method added through the public API: the tables, comparisons and figure pick it up."""
    import numpy as np

    from flora_steps.pipeline import methods
    from flora_steps.report.stats import PairedBootstrap
    from flora_steps.report.tables import Evaluated, comparison_table, results_table

    record = methods.Method(
        "random_ranks",
        "random ranks, from the supernet",
        "random ranks",
        {"color": "tab:gray", "marker": "x"},
        build="uniform_ranks",
        source="supernet",
        budgets="uniform",
        baselines=("control",),
    )
    monkeypatch.setitem(methods.METHODS, record.name, record)
    rng = np.random.default_rng(0)

    def model(method: str, budget: float, macs: int, accuracy: float) -> Evaluated:
        correct = (rng.random((2, 200)) < accuracy).astype(float)
        metrics = {"macs": macs, "params": 1000, "top1": correct.mean(), "top5": 1.0, "seeds": [{"top1": 0.5}] * 2}
        return Evaluated(method, budget, metrics, correct)

    models = [model("dense", 1.0, 100, 0.95), model("control", 0.3, 30, 0.6), model("control", 0.6, 60, 0.85)]
    models += [model("random_ranks", 0.5, 50, 0.8)]
    bootstrap = PairedBootstrap(2, 200, 200, np.random.default_rng(1))
    results = results_table(models, bootstrap)
    assert list(results["method"]) == ["dense", "control", "control", "random_ranks"]  # the records' order
    comparison, means = comparison_table(models, bootstrap)
    assert means[["method", "baseline"]].values.tolist() == [["random_ranks", "control"]]
    assert list(comparison[comparison["method"] == "random_ranks"]["baseline"]) == ["control"]
    figure = plot_tradeoff(
        results.assign(protocol="fine-tuned"),
        comparison.assign(protocol="fine-tuned"),
        means.assign(protocol="fine-tuned"),
    )
    legend = [text.get_text() for legend in figure.legends for text in legend.get_texts()]
    assert "random ranks, from the supernet" in legend
    assert figure.axes[0].get_title() == "random ranks vs control"


#: The latency tables of FLORA's pruned bases: not replicated, though in their bases' folders.
BASE_TABLES = ("on_slim/latency_table", "on_ofb/latency_table")


def test_a_report_over_two_runs_reads_every_run(smoke_pipeline: Path, reported: Path, tmp_path: Path, monkeypatch):
    """``runs: 2`` (here the smoke run's results twice): one report whose rows are over both runs, without the
    one-run note; the same results in each run give the one-run report's numbers."""
    (tmp_path / "results/runs").mkdir(parents=True)
    for stage in ("pretrain", "latency_table", "latency_table_ofb", "latency", *BASE_TABLES):  # once for every run
        (tmp_path / "results" / stage).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "results" / stage).symlink_to(smoke_pipeline / "results" / stage)
    for run in (0, 1):
        (tmp_path / f"results/runs/{run}").mkdir()
        for folder in (smoke_pipeline / "results").iterdir():  # every replicated stage's
            if folder.name not in ("pretrain", "latency_table", "latency_table_ofb", "latency", "ablations"):
                (tmp_path / f"results/runs/{run}" / folder.name).symlink_to(folder)
    params = yaml.safe_load((smoke_pipeline / "params.yaml").read_text()) | {"runs": 2}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--params", "params.yaml"]) == 0
    results = pd.read_csv("results/report/results.csv")
    assert list(results["runs"]) == [1] + [2] * 17 + [1] + [2] * 17
    summary = json.loads(Path("results/report/summary.json").read_text())
    assert summary["statistics"]["runs"] == 2 and summary["statistics"]["omitted_variance"] is None
    assert not Path("results/report/means.md").read_text().startswith("Intervals omit")
    one_run = pd.read_csv(reported / "results/report/comparison.csv")
    assert pd.read_csv("results/report/comparison.csv")["delta_top1"].tolist() == pytest.approx(
        one_run["delta_top1"].tolist(), nan_ok=True
    )


def test_the_run_of_a_stage_is_checked_against_the_params(
    smoke_pipeline: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    params = yaml.safe_load((smoke_pipeline / "params.yaml").read_text())
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text(yaml.safe_dump(params))
    two.write_text(yaml.safe_dump(params | {"runs": 2}))
    for command, expected in (
        (["decompose", "--params", str(one), "--run", "1"], "--run 1: the params have runs: 1"),
        (["decompose", "--params", str(two)], "--run: give one of 0 to 1 (the params have runs: 2)"),
        (["decompose", "--params", str(two), "--run", "2"], "--run: give one of 0 to 1 (the params have runs: 2)"),
    ):
        assert main(command) == 2
        assert capsys.readouterr().err.strip().endswith(f"error: {expected}")
    assert not (tmp_path / "results").exists()


def test_the_report_sets_accuracy_against_measured_latency(smoke_pipeline: Path, reported: Path) -> None:
    """Every timed model beside its top-1; FLORA under latency budgets against FLORA's curve at equal latency."""
    out = reported / "results/report"
    latency = pd.read_csv(out / "latency.csv")
    timed = pd.read_csv(smoke_pipeline / "results/latency/latency.csv")
    assert list(zip(latency["method"], latency["budget"], strict=True)) == list(
        zip(timed["method"], timed["budget"], strict=True)
    )
    assert (latency["latency_ms"] == timed["latency_ms"]).all() and latency["top1"].between(0, 1).all()
    results = pd.read_csv(out / "results.csv")
    fine_tuned = results[results["protocol"] == "fine-tuned"].set_index(["method", "budget"])
    assert latency.set_index(["method", "budget"])["top1"].equals(
        fine_tuned.loc[latency.set_index(["method", "budget"]).index, "top1"]
    )
    compared = pd.read_csv(out / "latency_comparison.csv")
    # each FLORA under latency budgets against FLORA on the same model under MACs budgets
    pairs = [("flora_latency", "flora"), ("slim_flora_latency", "slim_flora"), ("ofb_flora_latency", "ofb_flora")]
    assert list(compared["protocol"]) == ["fine-tuned"] * 3 + ["inherited"] * 3
    assert list(zip(compared["method"], compared["baseline"], strict=True)) == pairs * 2
    compared = compared[compared["method"] == "flora_latency"]
    flora_latency = latency.set_index("method").loc["flora_latency"]
    # its x: its measured latency, in microseconds
    assert ((compared["latency_us"] - 1000 * flora_latency["latency_ms"]).abs() <= 1).all()
    for prefix in ("delta", "extra"):
        assert {f"{prefix}_low", f"{prefix}_high", f"{prefix}_verdict"} <= set(compared.columns)
    shown = (out / "latency_comparison.md").read_text()
    assert shown.startswith("The first run's models, timed on cpu.") and "extra latency reduction" in shown


#: The methods under latency budgets whose lists may be empty, as the default leaves them.
OPTIONAL_LATENCY = ("uniform_latency", "slim_latency", "ofb_latency", "slim_flora_latency", "ofb_flora_latency")


def test_a_method_without_budgets_runs_no_stage_and_leaves_the_report(
    smoke_pipeline: Path, reported: Path, tmp_path: Path, monkeypatch
) -> None:
    """Emptying the optional latency lists idles their methods' stages (FLORA's latency stages on the pruned models
    too, not those models' latency tables, which predict FLORA on them); the report over the same results then
    has every other row and comparison as before (simultaneous intervals, over fewer comparisons, narrow), and none
    of theirs."""
    params = yaml.safe_load((smoke_pipeline / "params.yaml").read_text())
    params["budgets"] |= {name: [] for name in OPTIONAL_LATENCY}
    assert idle_stages(params["budgets"]) == {
        *(f"retrain_{method}" for method in ("uniform_latency", "slim_latency", "ofb_latency")),
        "ofb_latency",
        *(
            f"{stage}_on_{base}"
            for base in ("slim", "ofb")
            for stage in ("filter_latency", "supernet_flora_latency", "search_flora_latency", "retrain_flora_latency")
        ),
    }
    (tmp_path / "results").mkdir()
    for folder in (reported / "results").iterdir():
        if folder.name != "report":
            (tmp_path / "results" / folder.name).symlink_to(folder.resolve())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--params", "params.yaml"]) == 0
    out, full = tmp_path / "results/report", reported / "results/report"
    for name in ("results", "comparison", "search_costs", "latency_comparison"):
        kept = pd.read_csv(full / f"{name}.csv")
        kept = kept[~kept["method"].isin(OPTIONAL_LATENCY)].reset_index(drop=True)
        made = pd.read_csv(out / f"{name}.csv")
        alone = [column for column in made.columns if "_sim" not in column]
        pd.testing.assert_frame_equal(made[alone], kept[alone], check_exact=False, rtol=1e-9)
    assert set(pd.read_csv(out / "latency.csv")["method"]).isdisjoint(OPTIONAL_LATENCY)
