"""The report's statistics: the paired bootstrap, its intervals, and comparisons on hand-made results."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flora_steps.report.stats import Estimate, PairedBootstrap, interval, seed_std
from flora_steps.report.tables import Curve, Evaluated, _compare, comparison_table, readable_comparison, results_table


def correct(rng: np.random.Generator, seeds: int, images: int, top1: float) -> np.ndarray:
    return (rng.random((seeds, images)) < top1).astype(float)


def test_a_difference_on_the_same_images_is_paired() -> None:
    """Two models right on the same 360 of 400 images, one also on 12 more: +3 points, clearly above zero."""
    baseline = np.zeros((3, 400))
    baseline[:, :360] = 1
    better = baseline.copy()
    better[:, 360:372] = 1
    bootstrap = PairedBootstrap(3, 400, 2000, np.random.default_rng(0))
    delta = Estimate(0.03, *interval(bootstrap.top1(better - baseline)))
    assert delta.low > 0.01 and delta.high < 0.05 and delta.verdict == "better"
    # Unpaired, the two 95% intervals of top-1 overlap: only pairing separates them.
    assert bootstrap.estimate(better).low < bootstrap.estimate(baseline).high
    same = bootstrap.top1(baseline - baseline)
    assert interval(same) == (0.0, 0.0) and Estimate(0.0, *interval(same)).verdict == "within noise"


def test_intervals_cover_the_true_top1_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(1)
    covered = 0
    for trial in range(200):
        model = correct(rng, 3, 300, 0.9)
        bootstrap = PairedBootstrap(3, 300, 400, np.random.default_rng(trial))
        low, high = interval(bootstrap.top1(model))
        covered += low <= 0.9 <= high
    assert 0.88 <= covered / 200 <= 0.99


def test_seed_to_seed_spread_widens_the_interval() -> None:
    rng = np.random.default_rng(2)
    steady = np.tile(correct(rng, 1, 360, 0.9), (3, 1))
    unsteady = steady.copy()
    unsteady[0, :60] = 0  # one seed much worse
    bootstrap = PairedBootstrap(3, 360, 2000, np.random.default_rng(0))
    width = [np.subtract(*interval(bootstrap.top1(m))[::-1]) for m in (steady, unsteady)]
    assert width[1] > 1.5 * width[0]
    assert seed_std([0.9, 0.9, 0.9]) == 0.0 and seed_std([0.9]) is None


def test_an_interval_with_out_of_range_replicates_is_unbounded_on_that_side() -> None:
    samples = np.concatenate([np.linspace(0.1, 0.3, 900), np.full(100, np.inf)])
    low, high = interval(samples)
    assert low == pytest.approx(0.1, abs=0.01) and math.isinf(high)
    assert Estimate(0.2, low, high).as_dict() == {"value": 0.2, "low": low, "high": None, "verdict": "better"}


def test_the_bootstrap_refuses_a_model_on_other_test_images() -> None:
    with pytest.raises(ValueError, match="seeds x test images"):
        PairedBootstrap(3, 100, 10, np.random.default_rng(0)).top1(np.ones((3, 99)))


def hand_made_models() -> list[Evaluated]:
    """Dense at 100 MACs (95%), a control curve at 20/40/60 MACs (70/80/90%), FLORA at 30 and 50 MACs.

    Every model is right on a prefix of the 200 test images, the same for each of 3 seeds.
    """

    def model(method: str, budget: float, macs: int, right: int) -> Evaluated:
        matrix = np.zeros((1 if method == "dense" else 3, 200))
        matrix[:, :right] = 1
        seeds = [] if method == "dense" else [{"top1": right / 200}] * 3
        return Evaluated(method, budget, {"macs": macs, "params": macs, "top5": 1.0, "seeds": seeds}, matrix)

    return [
        model("dense", 1.0, 100, 190),
        *(model("control", b, m, r) for b, m, r in ((0.2, 20, 140), (0.4, 40, 160), (0.6, 60, 180))),
        *(model("uniform", b, m, r) for b, m, r in ((0.2, 20, 100), (0.4, 40, 120), (0.6, 60, 140))),
        model("flora", 0.3, 30, 160),  # as good as the control at 40 MACs
        model("flora", 0.5, 50, 170),  # exactly the control curve at 50 MACs
    ]


def test_comparison_at_equal_macs_and_at_equal_top1_on_hand_made_curves() -> None:
    bootstrap = PairedBootstrap(3, 200, 1000, np.random.default_rng(0))
    table, means = comparison_table(hand_made_models(), bootstrap)
    control = table[table["baseline"] == "control"].set_index("budget")
    # At 30 MACs the control curve is halfway between 70% and 80%: FLORA's 80% is +5 points.
    assert control.loc[0.3, "baseline_top1"] == pytest.approx(0.75)
    assert control.loc[0.3, "delta_top1"] == pytest.approx(0.05)
    assert control.loc[0.3, "delta_verdict"] == "better" and control.loc[0.3, "delta_low"] > 0
    # The control needs 40 MACs for 80%: FLORA saves a quarter.
    assert control.loc[0.3, "baseline_macs"] == pytest.approx(40)
    assert control.loc[0.3, "extra_reduction"] == pytest.approx(0.25)
    # On the curve: no difference, and the verdict says so.
    assert control.loc[0.5, "delta_top1"] == pytest.approx(0.0)
    assert control.loc[0.5, "delta_verdict"] == "within noise"
    assert control.loc[0.5, "extra_low"] <= 0 <= control.loc[0.5, "extra_high"]
    assert means["flora", "control"]["delta_top1"].value == pytest.approx(0.025)
    assert means["flora", "control"]["extra_reduction"].value == pytest.approx(0.125)
    uniform = table[table["baseline"] == "uniform"].set_index("budget")
    assert uniform.loc[0.3, "delta_top1"] == pytest.approx(0.8 - 0.55)
    assert uniform.loc[0.5, "baseline_macs"] == pytest.approx(60 + 40 * (170 - 140) / (190 - 140))


def test_the_replicates_of_a_difference_are_the_differences_of_the_replicates() -> None:
    """Paired: with a stable front, each replicate's difference at equal MACs is the point's top-1 minus the
    curve's, and equals the per-image difference from the mix of the curve's two neighbours."""
    bootstrap = PairedBootstrap(3, 200, 300, np.random.default_rng(0))
    models = hand_made_models()
    table, _ = comparison_table(models, bootstrap, [("flora", "control")])
    dense = models[0]
    curve = Curve.of([m for m in models if m.method == "control"], dense, bootstrap)
    flora = next(m for m in models if m.method == "flora" and m.budget == 0.3)
    point_samples = bootstrap.top1(flora.correct)
    row, delta_samples, _ = _compare(flora, point_samples, curve)
    by_replicate = point_samples - np.array([np.interp(30, curve.macs, replicate) for replicate in curve.samples])
    assert np.allclose(delta_samples, by_replicate)
    control = {m.macs: m.correct for m in models if m.method == "control"}
    assert np.allclose(delta_samples, bootstrap.top1(flora.correct - 0.5 * control[20] - 0.5 * control[40]))
    assert row["delta_top1"] == pytest.approx(table.iloc[0]["delta_top1"])


def test_a_dominated_baseline_model_changes_neither_comparison() -> None:
    models = hand_made_models()
    table, _ = comparison_table(models, PairedBootstrap(3, 200, 300, np.random.default_rng(0)), [("flora", "control")])
    worse = Evaluated("control", 0.5, {"macs": 50, "params": 50, "top5": 1.0}, np.zeros((3, 200)))
    worse.correct[:, :150] = 1  # 75% at 50 MACs: below the 40-MACs model
    with_worse, _ = comparison_table(
        [*models, worse], PairedBootstrap(3, 200, 300, np.random.default_rng(0)), [("flora", "control")]
    )
    for column in ("baseline_top1", "delta_top1", "baseline_macs", "extra_reduction"):
        assert with_worse[column].tolist() == pytest.approx(table[column].tolist())


def test_a_flora_point_outside_the_baseline_curve_gets_no_number() -> None:
    models = [m for m in hand_made_models() if not (m.method == "control" and m.budget == 0.2)]
    table, means = comparison_table(models, PairedBootstrap(3, 200, 200, np.random.default_rng(0)))
    row = table[(table["baseline"] == "control") & (table["budget"] == 0.3)].iloc[0]
    assert row["delta_verdict"] == "out of range" and math.isnan(row["delta_top1"])  # 30 MACs < cheapest control, 40
    assert row["extra_reduction"] == pytest.approx(0.25)  # at equal top-1 it is in range: 80% is the 40-MACs point
    assert "delta_top1" not in means["flora", "control"]  # a mean over budgets needs every budget


def test_a_point_below_the_cheapest_baseline_model_gets_a_bound_not_a_number() -> None:
    """A point less accurate than the baseline's cheapest model: the baseline would match it with fewer MACs
    than that model's, so the extra reduction is below ``1 - point MACs / cheapest MACs``."""
    models = [*hand_made_models(), Evaluated("slim", 0.3, {"macs": 30, "params": 30, "top5": 1.0}, np.ones((3, 200)))]
    models[-1].correct[:, 170:] = 0  # 85% at 30 MACs
    models.append(Evaluated("slim_flora", 0.4, {"macs": 40, "params": 40, "top5": 1.0}, np.zeros((3, 200))))
    models[-1].correct[:, :160] = 1  # 80% at 40 MACs: worse and bigger
    table, _ = comparison_table(
        models, PairedBootstrap(3, 200, 200, np.random.default_rng(0)), [("slim_flora", "slim")]
    )
    row = table.iloc[0]
    assert row["extra_verdict"] == "out of range" and math.isnan(row["extra_reduction"])
    assert row["extra_bound"] == pytest.approx(1 - 40 / 30)
    assert row["delta_top1"] == pytest.approx(0.8 - (0.85 + 0.1 * (40 - 30) / 70))  # curve: 85% at 30, 95% at 100
    shown = readable_comparison(table, 1, "MACs").iloc[0]
    assert shown["extra MACs reduction % [95% interval]"].startswith("out of range: below -33.33")


def test_results_table_gives_mean_std_interval_and_training() -> None:
    models = hand_made_models()
    models[-1] = Evaluated(
        "flora",
        0.5,
        {
            "macs": 50,
            "params": 50,
            "top5": 1.0,
            "seeds": [{"top1": 0.84}, {"top1": 0.85}, {"top1": 0.86}],
            "training": {"total_steps": 30, "total_images": 1920, "inherited_steps": 20},
        },
        models[-1].correct,
    )
    table = results_table(models, PairedBootstrap(3, 200, 500, np.random.default_rng(0)))
    assert list(table["method"]) == ["dense"] + ["uniform"] * 3 + ["control"] * 3 + ["flora"] * 2
    row = table.iloc[-1]
    assert row["top1"] == pytest.approx(0.85) and row["top1_std"] == pytest.approx(0.01)
    assert row["top1_low"] < 0.85 < row["top1_high"]
    assert (row["train_steps"], row["train_images"], row["supernet_steps"]) == (30, 1920, 20)
    assert table.iloc[0]["delta_top1"] == 0 and row["delta_top1"] == pytest.approx(0.85 - 0.95)
