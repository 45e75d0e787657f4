"""The report's tables as pandas DataFrames, built from the stages' results; and their text forms.

Every table is written three ways (`write_table`): CSV with raw numbers, and
Markdown and LaTeX with readable ones (MACs in G/M units, top-1 in percent,
intervals in brackets). Intervals come from one ``PairedBootstrap`` shared by
every table, so that the numbers of one report agree with each other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..pipeline.methods import METHODS, comparisons
from .stats import Estimate, PairedBootstrap, interval, seed_std, simultaneous
from .tradeoff import WIDE_SEGMENT, envelope, extra_reduction, extra_reduction_or_bound, segment_span, top1_at_macs

RESULT_COLUMNS = [
    "method",
    "budget",
    "macs",
    "params",
    "top1",
    "top1_std",
    "top1_low",
    "top1_high",
    "top5",
    "macs_reduction",
    "delta_top1",
    "seeds",
    "runs",
    "train_steps",
    "train_images",
    "supernet_steps",
]
NUMBERS = {"delta": "delta_top1", "extra": "extra_reduction"}  # each compared number's column prefix and name


def number_columns(prefix: str) -> list[str]:
    """A compared number's columns: value, interval and verdict (unadjusted), simultaneous interval and verdict."""
    parts = ("low", "high", "verdict", "sim_low", "sim_high", "sim_verdict")
    return [NUMBERS[prefix], *(f"{prefix}_{part}" for part in parts)]


COMPARISON_COLUMNS = [
    "method",
    "budget",
    "baseline",
    "macs",
    "top1",
    "baseline_top1",
    *number_columns("delta"),
    "delta_span",
    "baseline_macs",
    *number_columns("extra"),
    "extra_bound",
    "extra_span",
]
MEAN_COLUMNS = ["method", "baseline", "budgets", *number_columns("delta"), *number_columns("extra")]
#: How the compared models were evaluated: every table holds both, every claim names one.
PROTOCOLS = {
    "fine-tuned": "every compressed model fine-tuned the same way, once per seed (ours, stricter)",
    "inherited": "the paper's: every compressed model as its fine-tuning starts (the supernet's, the pruning "
    "search's or the SVD's weights), evaluated once without fine-tuning",
}


def by_protocol(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One table per protocol stacked into one, with a first column ``protocol``."""
    return pd.concat(
        [table.assign(protocol=protocol)[["protocol", *table.columns]] for protocol, table in tables.items()],
        ignore_index=True,
    )


def _protocol_first(table: pd.DataFrame, shown: pd.DataFrame) -> pd.DataFrame:
    """A readable table with the raw table's protocol column first, when it has one."""
    return shown.assign(protocol=table["protocol"])[["protocol", *shown.columns]] if "protocol" in table else shown


@dataclass(frozen=True)
class Evaluated:
    """One model of the report: its method and budget, its metrics, ``correct[seed, test image]`` (0/1), and the
    run of the pipeline it comes from (the dense model is in every run's comparisons)."""

    method: str
    budget: float
    metrics: Mapping
    correct: np.ndarray
    run: int = 0

    @property
    def macs(self) -> float:
        return float(self.metrics["macs"])


def by_model(models: Sequence[Evaluated]) -> dict[tuple[str, float], list[Evaluated]]:
    """Each method's model at each budget, in every run (by run), dense first, then in the records' order."""
    order = {method: index for index, method in enumerate(METHODS)}
    grouped: dict[tuple[str, float], list[Evaluated]] = {}
    for model in sorted(models, key=lambda m: (order[m.method], m.budget, m.run)):
        grouped.setdefault((model.method, model.budget), []).append(model)
    return grouped


def results_table(models: Sequence[Evaluated], bootstrap: PairedBootstrap) -> pd.DataFrame:
    """Every model, dense first, then each method by budget: size, top-1 with its spread and interval, training.

    With several runs, a method's models at one budget are one row: MACs and parameters
    are their means (a search may land elsewhere in each run), the spread is over every
    run's seeds, the interval over runs, seeds and images.
    """
    dense = next(m for m in models if m.method == "dense")
    rows = []
    for (method, budget), runs in by_model(models).items():
        top1 = bootstrap.estimate(np.stack([m.correct for m in runs]))
        seeds = [s["top1"] for m in runs for s in m.metrics.get("seeds", [])]
        training = runs[0].metrics.get("training", {})
        rows.append(
            {
                "method": method,
                "budget": budget,
                "macs": round(float(np.mean([m.macs for m in runs]))),
                "params": round(float(np.mean([m.metrics["params"] for m in runs]))),
                "top1": top1.value,
                "top1_std": seed_std(seeds),
                "top1_low": top1.low,
                "top1_high": top1.high,
                "top5": float(np.mean([m.metrics["top5"] for m in runs])),
                "seeds": len(runs[0].metrics.get("seeds", [])) or None,  # none for the dense model: not fine-tuned
                "runs": len(runs),
                "train_steps": training.get("total_steps"),
                "train_images": training.get("total_images"),
                "supernet_steps": training.get("inherited_steps"),
            }
        )
    table = pd.DataFrame(rows)
    table["macs_reduction"] = 1 - table["macs"] / dense.macs
    table["delta_top1"] = table["top1"] - float(dense.correct.mean())
    counts = ["seeds", "train_steps", "train_images", "supernet_steps"]
    table[counts] = table[counts].astype("Int64")  # whole numbers, blank for the dense model
    return table[RESULT_COLUMNS]


@dataclass(frozen=True)
class Curve:
    """A baseline's models in one run, closed by the dense model, in MACs order: their MACs, top-1s and bootstrap
    top-1s in that run."""

    models: list[Evaluated]
    macs: np.ndarray
    top1: list[float]
    samples: np.ndarray  # (replicates, points)

    @classmethod
    def of(cls, baseline: Sequence[Evaluated], dense: Evaluated, bootstrap: PairedBootstrap) -> Curve:
        points = sorted([*baseline, dense], key=lambda m: m.macs)
        samples = np.stack([bootstrap.in_run(m.correct) for m in points], axis=1)
        return cls(points, np.array([m.macs for m in points]), [float(m.correct.mean()) for m in points], samples)

    def holds(self, model: Evaluated) -> bool:
        """Whether one of the curve's models is ``model`` itself: same MACs, same predictions."""
        return any(
            m.macs == model.macs and m.correct.shape == model.correct.shape and np.array_equal(m.correct, model.correct)
            for m in self.models
        )


@dataclass
class Compared:
    """One compared number (a difference at equal MACs, an extra reduction) of one row: its value and replicates
    (``None`` out of range), and whether both sides are the same model."""

    value: float | None
    samples: np.ndarray | None
    identical: bool = False

    def columns(self, prefix: str, simultaneous: tuple[float, float] | None) -> dict:
        """The row's columns for this number (``number_columns``)."""
        if self.value is None or self.samples is None:
            nothing = dict.fromkeys(number_columns(prefix), np.nan)
            return nothing | {f"{prefix}_verdict": "out of range", f"{prefix}_sim_verdict": "out of range"}
        marginal = Estimate(self.value, *interval(self.samples), self.identical)
        joint = Estimate(self.value, *(simultaneous or (marginal.low, marginal.high)), self.identical)
        return {
            NUMBERS[prefix]: self.value,
            f"{prefix}_low": marginal.low,
            f"{prefix}_high": marginal.high,
            f"{prefix}_verdict": marginal.verdict,
            f"{prefix}_sim_low": joint.low,
            f"{prefix}_sim_high": joint.high,
            f"{prefix}_sim_verdict": joint.verdict,
        }


def _compare(point: Evaluated, point_samples: np.ndarray, curve: Curve) -> tuple[dict, Compared, Compared]:
    """One point against one baseline curve: the row's plain columns, and its two compared numbers."""
    row: dict = {"macs": int(point.metrics["macs"]), "top1": float(point.correct.mean())}
    identical = curve.holds(point)
    edges = envelope(curve.macs, curve.top1)[0]
    row["delta_span"] = segment_span(edges, point.macs) or np.nan
    baseline = top1_at_macs(curve.macs, curve.top1, point.macs)
    row["baseline_top1"] = np.nan if baseline is None else baseline
    delta = Compared(None, None, identical)
    if baseline is not None:  # each replicate reads its own curve's Pareto front at the point's MACs: paired
        curve_samples = np.array([top1_at_macs(curve.macs, replicate, point.macs) for replicate in curve.samples])
        delta = Compared(row["top1"] - baseline, point_samples - curve_samples, identical)

    value = extra_reduction(point.macs, row["top1"], curve.macs, curve.top1)
    extra = Compared(value, None, identical)
    row["extra_bound"] = np.nan
    if value is None:
        if row["top1"] < curve.top1[0]:  # the baseline's cheapest model is already more accurate: a bound
            row["extra_bound"] = 1 - point.macs / curve.macs[0]
    else:
        extra.samples = np.array(
            [extra_reduction_or_bound(point.macs, f, curve.macs, c) for f, c in zip(point_samples, curve.samples)]
        )
    row["baseline_macs"] = np.nan if value is None else point.macs / (1 - value)
    row["extra_span"] = np.nan if value is None else segment_span(edges, row["baseline_macs"]) or np.nan
    return row, delta, extra


def _over_runs(numbers: Sequence[Compared], bootstrap: PairedBootstrap) -> Compared:
    """One number of one row from its value in each run: the mean, and the replicates combined by the runs'
    weights (``PairedBootstrap.combine``); out of range when it is in a run; identical when it is in every run."""
    if any(n.value is None or n.samples is None for n in numbers):
        return Compared(None, None, all(n.identical for n in numbers))
    samples = bootstrap.combine(np.array([n.samples for n in numbers]))
    return Compared(float(np.mean([n.value for n in numbers])), samples, all(n.identical for n in numbers))


def _row_over_runs(rows: Sequence[dict]) -> dict:
    """A row's plain columns from each run's: means (MACs, top-1s, the bound a reduction obeys in every run; NaN
    when a run has none) and the widest interpolation of any run."""

    def mean(key: str) -> float:
        return float(np.mean([row[key] for row in rows]))

    def widest(key: str) -> float:
        spans = [row[key] for row in rows if not np.isnan(row[key])]
        return max(spans) if spans else np.nan

    return {
        "macs": round(mean("macs")),
        "top1": mean("top1"),
        "baseline_top1": mean("baseline_top1"),
        "delta_span": widest("delta_span"),
        "baseline_macs": mean("baseline_macs"),
        "extra_bound": mean("extra_bound"),
        "extra_span": widest("extra_span"),
    }


def _mean(numbers: Sequence[Compared]) -> Compared:
    """The mean over budgets of one comparison's numbers, from the same replicates; out of range when a budget is.
    A replicate with an unboundedly low and an unboundedly high budget has no value (NaN)."""
    if any(n.value is None for n in numbers):
        return Compared(None, None)
    with np.errstate(invalid="ignore"):
        samples = np.mean([n.samples for n in numbers], axis=0)
    return Compared(float(np.mean([n.value for n in numbers])), samples, all(n.identical for n in numbers))


def _table(rows: list[dict], numbers: list[dict[str, Compared]], columns: list[str]) -> pd.DataFrame:
    """Rows with each compared number's columns; simultaneous intervals over the table's rows, per number."""
    for prefix in NUMBERS:
        present = [index for index, row in enumerate(numbers) if row[prefix].value is not None]
        ends = dict(zip(present, simultaneous(np.array([numbers[i][prefix].samples for i in present])), strict=True))
        for index, (row, compared) in enumerate(zip(rows, numbers, strict=True)):
            row |= compared[prefix].columns(prefix, ends.get(index))
    return pd.DataFrame(rows, columns=columns)


def comparison_table(
    models: Sequence[Evaluated], bootstrap: PairedBootstrap, compared: Sequence[tuple[str, str]] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per comparison (method, baseline) and budget of the method: top-1 difference at equal MACs, extra MACs
    reduction at equal top-1; and per comparison, their means over the method's budgets (the primary result).

    ``compared`` defaults to every method against each of its baselines (``methods.comparisons``).
    Each run compares its own models with its own baseline curve (closed by the shared
    dense model); a row is the mean over runs, and its replicates combine the runs'.
    Every number is paired on the same runs, seeds and test images and has its 95%
    interval and verdict (unadjusted: each taken alone) and its simultaneous interval and
    verdict (holding together with every other number of its kind in the same table).
    A mean over budgets is out of range when one of its budgets is. A method without
    models has no rows.
    """
    dense = next(m for m in models if m.method == "dense")
    grouped = by_model(models)
    rows, numbers, mean_rows, mean_numbers = [], [], [], []
    for method, baseline in comparisons() if compared is None else compared:
        budgets = sorted(budget for name, budget in grouped if name == method)
        if not budgets:
            continue
        runs = sorted({model.run for model in models if model.method == method})
        curves = {  # each run's baseline curve, closed by the shared dense model
            run: Curve.of([m for m in models if m.method == baseline and m.run == run], dense, bootstrap)
            for run in runs
        }
        own = []
        for budget in budgets:
            plain, deltas, extras = zip(
                *(
                    _compare(point, bootstrap.in_run(point.correct), curves[point.run])
                    for point in grouped[method, budget]
                ),
                strict=True,
            )
            rows.append({"method": method, "budget": budget, "baseline": baseline, **_row_over_runs(plain)})
            own.append({"delta": _over_runs(deltas, bootstrap), "extra": _over_runs(extras, bootstrap)})
        numbers += own
        mean_rows.append({"method": method, "baseline": baseline, "budgets": len(budgets)})
        mean_numbers.append({prefix: _mean([n[prefix] for n in own]) for prefix in NUMBERS})
    return _table(rows, numbers, COMPARISON_COLUMNS), _table(mean_rows, mean_numbers, MEAN_COLUMNS)


def ranks_table(layers: pd.DataFrame, configs: Mapping[float, Mapping[str, int]]) -> pd.DataFrame:
    """Rank of every target layer (rows) in every searched subnet (columns); a dense layer shows its full rank."""
    table = pd.DataFrame({"layer": layers["layer"], "full_rank": layers["full_rank"]})
    for budget in sorted(configs):
        table[str(budget)] = [
            configs[budget].get(layer, full) for layer, full in zip(layers["layer"], layers["full_rank"], strict=True)
        ]
    return table


def costs_table(seconds: Sequence[tuple[str, float]]) -> pd.DataFrame:
    """Wall time of each stage run, from the stages' own timers, with the total."""
    table = pd.DataFrame(seconds, columns=["stage", "seconds"])
    return pd.concat([table, pd.DataFrame([{"stage": "total", "seconds": table["seconds"].sum()}])], ignore_index=True)


def search_costs_table(
    choosing: Mapping[str, tuple[Sequence[tuple[str, float]], str | None]], per_budget: Mapping[str, Sequence[float]]
) -> pd.DataFrame:
    """Each method's search cost, from the stages' own timers: ``choosing`` gives per method the stage runs
    that choose its models once, with their seconds, and the stage it runs per budget (if any), whose runs'
    seconds are in ``per_budget``. The supernet counts (its training is also the fine-tuning its subnets start
    from); the retrains do not."""
    rows = []
    for method, (once, searched) in choosing.items():
        stages = [stage for stage, _ in once]
        runs = list(per_budget.get(searched, [])) if searched else []
        one_off = sum(seconds for _, seconds in once)
        rows.append(
            {
                "method": method,
                "stages": " + ".join([*stages, *([f"{searched} per budget"] if searched else [])]),
                "one_off_seconds": one_off,
                "per_budget_seconds": float(np.mean(runs)) if runs else 0.0,
                "budgets": len(runs) if searched else None,
                "total_seconds": one_off + sum(runs),
            }
        )
    table = pd.DataFrame(rows)
    table["budgets"] = table["budgets"].astype("Int64")
    return table


def readable_search_costs(table: pd.DataFrame) -> pd.DataFrame:
    """The search costs for Markdown/LaTeX: seconds with one decimal."""
    shown = table.copy()
    for column in ("one_off_seconds", "per_budget_seconds", "total_seconds"):
        shown[column] = shown[column].map(lambda v: f"{v:.1f}")
    shown["budgets"] = shown["budgets"].map(_count)
    return shown.rename(
        columns={
            "stages": "search stages",
            "one_off_seconds": "once (s)",
            "per_budget_seconds": "per budget (s, mean)",
            "total_seconds": "total (s)",
        }
    )


def percent(value: float, signed: bool = False) -> str:
    """A fraction in percent; an unbounded end as ±∞, except an unsigned one (a reduction), which stays below 100."""
    if pd.isna(value):
        return "—"
    if np.isinf(value):
        return "−∞" if value < 0 else "+∞" if signed else "< 100"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def bracket(low: float, high: float, signed: bool) -> str:
    return f"[{percent(low, signed)}, {percent(high, signed)}]"


def _count(value: float | None) -> str:
    return "—" if value is None or pd.isna(value) else f"{int(value):,}"


def readable_results(table: pd.DataFrame, macs_divisor: float, macs_unit: str) -> pd.DataFrame:
    """The results table for Markdown/LaTeX: top-1 as mean ± std over seeds with its 95% interval, in percent."""
    return _protocol_first(
        table,
        pd.DataFrame(
            {
                "method": table["method"],
                "budget": table["budget"].map(lambda b: f"{b:g}"),
                f"macs ({macs_unit})": (table["macs"] / macs_divisor).map(lambda v: f"{v:.3f}"),
                "params": (table["params"] / 1e6).map(lambda v: f"{v:.3f} M"),
                "MACs reduction": table["macs_reduction"].map(lambda v: f"{percent(v)}%"),
                "top-1 % (mean ± std)": [
                    percent(top1) + ("" if pd.isna(std) else f" ± {percent(std)}")
                    for top1, std in zip(table["top1"], table["top1_std"], strict=True)
                ],
                "95% interval": [
                    bracket(lo, hi, False) for lo, hi in zip(table["top1_low"], table["top1_high"], strict=True)
                ],
                "Δ top-1 vs dense": table["delta_top1"].map(lambda v: percent(v, True)),
                "seeds": table["seeds"].map(_count),
                "runs": table["runs"].map(_count),
                "training steps (inherited)": [
                    "—" if pd.isna(steps) else f"{_count(steps)} ({_count(share)})"
                    for steps, share in zip(table["train_steps"], table["supernet_steps"], strict=True)
                ],
                "training images": table["train_images"].map(_count),
            }
        ),
    )


def readable_comparison(table: pd.DataFrame, macs_divisor: float, macs_unit: str) -> pd.DataFrame:
    """The comparison table for Markdown/LaTeX: differences in points of top-1, reductions in percent; per number,
    its 95% interval and verdict taken alone (unadjusted), then its simultaneous interval and verdict."""
    return _protocol_first(
        table,
        pd.DataFrame(
            {
                "method": table["method"],
                "budget": table["budget"].map(lambda b: f"{b:g}"),
                "baseline": table["baseline"],
                macs_unit: (table["macs"] / macs_divisor).map(lambda v: f"{v:.3f}"),
                "top-1 %": table["top1"].map(percent),
                "baseline top-1 % at equal MACs": [
                    f"{percent(value)}{_wide(span)}" for value, span in zip(table["baseline_top1"], table["delta_span"])
                ],
                "Δ top-1 [95% interval]": with_interval(table, "delta"),
                "Δ verdict (unadjusted)": table["delta_verdict"],
                "Δ simultaneous interval: verdict": simultaneous_text(table, "delta"),
                f"baseline {macs_unit} at equal top-1": [
                    "out of range" if pd.isna(v) else f"{v / macs_divisor:.3f}{_wide(span)}"
                    for v, span in zip(table["baseline_macs"], table["extra_span"])
                ],
                "extra MACs reduction % [95% interval]": [
                    _bounded(number, bound)
                    for number, bound in zip(with_interval(table, "extra"), table["extra_bound"])
                ],
                "reduction verdict (unadjusted)": table["extra_verdict"],
                "reduction simultaneous interval: verdict": simultaneous_text(table, "extra"),
            }
        ),
    )


def readable_means(table: pd.DataFrame) -> pd.DataFrame:
    """The means over budgets (the primary result) for Markdown/LaTeX."""
    return _protocol_first(
        table,
        pd.DataFrame(
            {
                "method": table["method"],
                "baseline": table["baseline"],
                "budgets": table["budgets"].map(_count),
                "mean Δ top-1 [95% interval]": with_interval(table, "delta"),
                "Δ verdict": table["delta_verdict"],
                "Δ simultaneous interval: verdict": simultaneous_text(table, "delta"),
                "mean extra MACs reduction % [95% interval]": with_interval(table, "extra"),
                "reduction verdict": table["extra_verdict"],
                "reduction simultaneous interval: verdict": simultaneous_text(table, "extra"),
            }
        ),
    )


def with_interval(table: pd.DataFrame, prefix: str) -> list[str]:
    """A compared number with its 95% interval (differences signed, in points; reductions in percent)."""
    signed = prefix == "delta"
    return [
        "out of range" if pd.isna(value) else f"{percent(value, signed)} {bracket(low, high, signed)}"
        for value, low, high in zip(table[NUMBERS[prefix]], table[f"{prefix}_low"], table[f"{prefix}_high"])
    ]


def simultaneous_text(table: pd.DataFrame, prefix: str) -> list[str]:
    signed = prefix == "delta"
    return [
        verdict if pd.isna(low) else f"{bracket(low, high, signed)}: {verdict}"
        for low, high, verdict in zip(
            table[f"{prefix}_sim_low"], table[f"{prefix}_sim_high"], table[f"{prefix}_sim_verdict"], strict=True
        )
    ]


def _wide(span: float) -> str:
    """A note on an interpolation across a segment wider than ``WIDE_SEGMENT`` in MACs; empty otherwise."""
    return f" (interpolated across {span:.3g}× in MACs)" if not pd.isna(span) and span > WIDE_SEGMENT else ""


def _bounded(number: str, bound: float) -> str:
    """An extra MACs reduction; out of range below the baseline's cheapest model, the bound it obeys."""
    if number == "out of range" and not pd.isna(bound):
        return f"out of range: below {percent(bound)} (the baseline's cheapest model is more accurate)"
    return number


def readable(table: pd.DataFrame) -> pd.DataFrame:
    """A copy of a plain table (ranks, costs) for Markdown/LaTeX: seconds with one decimal."""
    shown = table.copy()
    if "seconds" in shown:
        shown["seconds"] = shown["seconds"].map(lambda v: f"{v:.1f}")
    return shown


def markdown(table: pd.DataFrame) -> str:
    return table.to_markdown(index=False, disable_numparse=True) + "\n"


def latex(table: pd.DataFrame) -> str:
    escaped = table.rename(columns=lambda c: str(c).replace("_", r"\_").replace("%", r"\%"))
    escaped = escaped.map(lambda v: v.replace("_", r"\_").replace("%", r"\%") if isinstance(v, str) else v)
    return escaped.to_latex(index=False)
