"""The report's statistics: the paired bootstrap, its intervals, and comparisons on hand-made results."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from flora_steps.report.stats import Estimate, PairedBootstrap, interval, seed_std, simultaneous
from flora_steps.report.tables import (
    Compared,
    Curve,
    Evaluated,
    _compare,
    _mean,
    comparison_table,
    readable_comparison,
    readable_means,
    results_table,
)
from flora_steps.stages.report import compared_number


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


def population(rng: np.random.Generator, shape: tuple[int, ...], images: int, shift_sd: float) -> np.ndarray:
    """``correct[..., image]`` of a model with 80% expected top-1: each image has a difficulty shared by every
    run and seed, 10% of the images are a coin toss per fine-tuning, and each run (or seed) shifts the model's
    accuracy by a normal amount of ``shift_sd``."""
    difficulty = rng.random(images)
    shift = rng.normal(0, shift_sd, shape)[..., None]
    toss = rng.random((*shape, images)) < 0.1
    return (np.where(toss, rng.random((*shape, images)), difficulty) < 0.8 + shift).astype(float)


@pytest.mark.parametrize(
    ("shape", "runs", "shift_sd"),
    [
        ((3, 1000), 1, 0.0),  # test images dominate
        ((3, 1000), 1, 0.03),  # seeds dominate (as on ImageNet's 50,000 images): 3 points between seeds
        ((5, 1000), 1, 0.03),
        ((3, 2, 1000), 3, 0.03),  # runs dominate
    ],
)
def test_intervals_cover_the_true_top1_about_95_percent_of_the_time(shape, runs, shift_sd) -> None:
    """With 3 seeds a percentile bootstrap over seeds covers about 85% when seeds dominate; the t-weights keep 95%."""
    rng = np.random.default_rng(1)
    covered = 0
    for trial in range(200):
        model = population(rng, shape[:-1], shape[-1], shift_sd)
        bootstrap = PairedBootstrap(shape[-2], shape[-1], 400, np.random.default_rng(trial), runs=runs)
        low, high = interval(bootstrap.top1(model))
        covered += low <= 0.8 <= high
    assert 0.91 <= covered / 200 <= 0.995


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
    assert Estimate(0.2, low, high).verdict == "better"


def test_replicates_without_a_value_count_at_both_ends() -> None:
    """A replicate with no value (NaN) could be anything: below the lower end and above the upper one."""
    finite = np.linspace(0.1, 0.3, 1000)
    few = finite.copy()
    few[::100] = np.nan  # 1%: both ends move out, neither becomes unbounded
    low, high = interval(few)
    assert low < interval(finite)[0] < interval(finite)[1] < high and math.isfinite(low) and math.isfinite(high)
    many = finite.copy()
    many[::20] = np.nan  # 5%: more than either tail
    assert interval(many) == (-math.inf, math.inf)
    assert Estimate(0.2, *interval(many)).verdict == "undetermined"
    assert Estimate(0.0, 0.0, 0.0, identical=True).verdict == "identical model"


def test_simultaneous_intervals_hold_together() -> None:
    rng = np.random.default_rng(0)
    one = rng.normal(size=(1, 4000))
    assert simultaneous(one) == [interval(one[0])]
    independent = rng.normal(size=(10, 4000))
    joint = simultaneous(independent)
    inside = np.all([(low <= row) & (row <= high) for row, (low, high) in zip(independent, joint)], axis=0)
    assert 0.945 <= inside.mean() <= 0.96  # every number in its interval at once, in 95% of the replicates
    assert all(low < interval(row)[0] and high > interval(row)[1] for row, (low, high) in zip(independent, joint))
    assert joint[0][1] == pytest.approx(2.8, abs=0.15)  # Sidak: z at 1 - 0.05 / 20 is 2.80
    # Ten copies of one number are one comparison: nothing to widen.
    copies = np.repeat(one, 10, axis=0)
    assert simultaneous(copies) == [interval(one[0])] * 10
    assert simultaneous(np.empty((0, 10))) == []


def test_the_bootstrap_refuses_a_model_on_other_test_images() -> None:
    with pytest.raises(ValueError, match=r"expected \(1 or 3 seeds, 100 test images\), got \(3, 99\)"):
        PairedBootstrap(3, 100, 10, np.random.default_rng(0)).top1(np.ones((3, 99)))
    with pytest.raises(ValueError, match=r"expected 1 or 4 runs, got 2"):
        PairedBootstrap(3, 100, 10, np.random.default_rng(0), runs=4).top1(np.ones((2, 3, 100)))


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
    mean = means.set_index(["method", "baseline"]).loc["flora", "control"]
    assert mean["delta_top1"] == pytest.approx(0.025) and mean["extra_reduction"] == pytest.approx(0.125)
    assert mean["budgets"] == 2 and mean["delta_sim_low"] <= mean["delta_low"] < mean["delta_top1"]
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
    _, delta, _ = _compare(flora, point_samples, curve)
    delta_samples = delta.samples
    by_replicate = point_samples - np.array([np.interp(30, curve.macs, replicate) for replicate in curve.samples])
    assert np.allclose(delta_samples, by_replicate)
    control = {m.macs: m.correct for m in models if m.method == "control"}
    assert np.allclose(delta_samples, bootstrap.top1(flora.correct - 0.5 * control[20] - 0.5 * control[40]))
    assert delta.value == pytest.approx(table.iloc[0]["delta_top1"])


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
    mean = means.set_index(["method", "baseline"]).loc["flora", "control"]
    assert mean["delta_verdict"] == "out of range" and math.isnan(mean["delta_top1"])  # a mean needs every budget


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


def test_a_model_that_is_one_of_the_baselines_gets_identical_model() -> None:
    models = hand_made_models()
    twin = next(m for m in models if m.method == "control" and m.budget == 0.4)
    models.append(Evaluated("flora", 0.4, twin.metrics, twin.correct.copy()))
    table, means = comparison_table(
        models, PairedBootstrap(3, 200, 300, np.random.default_rng(0)), [("flora", "control")]
    )
    row = table.set_index("budget").loc[0.4]
    assert row["delta_top1"] == 0 and row["delta_low"] == row["delta_high"] == 0
    assert {row[f"{n}_{kind}"] for n in ("delta", "extra") for kind in ("verdict", "sim_verdict")} == {
        "identical model"
    }
    assert table.set_index("budget").loc[0.3, "delta_verdict"] == "better"
    assert means.iloc[0]["delta_verdict"] == "better"  # the mean over budgets has one model that is not a twin


def test_unbounded_ends_stay_apart_from_out_of_range_in_tables_and_json() -> None:
    """An extra reduction above every baseline model is below 100%, not +∞; a replicate of a mean whose budgets
    are unbounded on opposite sides has no value, and enough of them leave the mean undetermined."""
    finite = np.linspace(0.1, 0.3, 1000)
    above = Compared(0.2, np.where(np.arange(1000) < 100, np.inf, finite))  # 10% above every baseline model
    below = Compared(-0.2, np.where(np.arange(1000) < 100, -np.inf, -finite))  # the same replicates below
    mean = _mean([above, below])
    assert np.isnan(mean.samples[:100]).all() and mean.value == pytest.approx(0.0)
    rows = pd.DataFrame(
        [
            {"method": "m", "baseline": "b", "budgets": 1}
            | number.columns("delta", None)
            | number.columns("extra", None)
            for number in (above, mean, Compared(None, None))
        ]
    )
    assert rows["extra_verdict"].tolist() == ["better", "undetermined", "out of range"]
    shown = readable_means(rows)
    assert shown["mean extra MACs reduction % [95% interval]"].tolist() == [
        "20.00 [12.50, < 100]",
        "0.00 [−∞, < 100]",
        "out of range",
    ]
    assert shown["mean Δ top-1 [95% interval]"].tolist()[:2] == ["+20.00 [+12.50, +∞]", "+0.00 [−∞, +∞]"]
    assert compared_number(rows.iloc[0], "extra")["interval"] == [pytest.approx(0.125, abs=1e-3), "< 1"]
    assert compared_number(rows.iloc[1], "extra") == {
        "value": pytest.approx(0.0),
        "interval": ["unbounded", "< 1"],
        "verdict": "undetermined",
        "simultaneous_interval": ["unbounded", "< 1"],
        "simultaneous_verdict": "undetermined",
    }
    assert compared_number(rows.iloc[1], "delta")["interval"] == ["unbounded", "unbounded"]
    assert compared_number(rows.iloc[2], "delta") == {
        "value": None,
        "interval": None,
        "verdict": "out of range",
        "simultaneous_interval": None,
        "simultaneous_verdict": "out of range",
    }


def test_with_several_runs_each_run_compares_its_own_models_and_the_replicates_combine_them() -> None:
    """Three runs: each has its own control curve and its own FLORA subnet (at other MACs); a row is the mean of
    the runs' comparisons, and its replicates are the runs' replicates weighed by the same run weights."""
    dense = hand_made_models()[0]
    models, expected = [dense], []
    for run, (shift, flora_macs) in enumerate(((0, 30), (10, 32), (-10, 28))):
        for budget, macs, right in ((0.2, 20, 140 + shift), (0.4, 40, 160 + shift)):
            correct = np.zeros((3, 200))
            correct[:, :right] = 1
            models.append(Evaluated("control", budget, {"macs": macs, "params": macs, "top5": 1.0}, correct, run))
        correct = np.zeros((3, 200))
        correct[:, : 160 + shift] = 1
        models.append(Evaluated("flora", 0.3, {"macs": flora_macs, "params": 30, "top5": 1.0}, correct, run))
        curve = (140 + shift) / 200 + (flora_macs - 20) / 20 * 0.1  # the run's control line at FLORA's MACs
        expected.append((160 + shift) / 200 - curve)
    bootstrap = PairedBootstrap(3, 200, 400, np.random.default_rng(0), runs=3)
    table, means = comparison_table(models, bootstrap, [("flora", "control")])
    row = table.iloc[0]
    assert row["delta_top1"] == pytest.approx(np.mean(expected)) and row["macs"] == 30
    per_run = []
    for run in range(3):
        curve = Curve.of([m for m in models if m.method == "control" and m.run == run], dense, bootstrap)
        flora = next(m for m in models if m.method == "flora" and m.run == run)
        per_run.append(_compare(flora, bootstrap.in_run(flora.correct), curve)[1].samples)
    combined = bootstrap.combine(np.array(per_run))
    assert interval(combined) == pytest.approx((row["delta_low"], row["delta_high"]))
    assert np.allclose(combined, np.sum(bootstrap.weights.T * np.array(per_run), axis=0))
    assert means.iloc[0]["delta_top1"] == pytest.approx(row["delta_top1"])
    results = results_table(models, bootstrap).set_index("method")
    assert results.loc["flora", "runs"] == 3 and results.loc["flora", "macs"] == 30
    assert results.loc["dense", "runs"] == 1
