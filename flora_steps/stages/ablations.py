"""The paper's ablations of FLORA: each one's test top-1 under both protocols and its paired difference to FLORA.

    snakemake --cores 8 ablations        # or: dvc repro ablations

Each ablation (`flora_steps.pipeline.methods.ABLATIONS`) is FLORA on the dense model with
one of its parts taken out, searched at FLORA's budgets (`budgets.search`) with the same
search and fine-tuned like FLORA, in every run of the pipeline (`runs`):

- `whole_space`: no candidate filtering; the supernet trains and the search runs on every
  rank tuple of the grid (`filter.ratios`) instead of the filtered space
- `uniform_sampling`: the supernet draws its subnets, and the search its mutations,
  uniformly instead of by the low-rank-aware rule (`supernet.sampling: uniform`)
- `random_init`: no weight inheritance; the supernet's factors start at random, not from
  the SVD (`supernet.init: random`)
- `svd_weights`: no supernet; the search scores subnets with the SVD's weights, and the chosen
  subnet is fine-tuned from them for `supernet.epochs + retrain.epochs` (as long as FLORA's
  supernet and fine-tuning together; `retrain.uniform_epochs` when set)

Writes `results/ablations/report/`:

- `ablations.{csv,md,tex}`: per protocol ("fine-tuned", "inherited"), FLORA's and each
  ablation's mean over budgets (the primary result) and each budget: MACs, test top-1 with
  its 95% interval, and the paired difference to FLORA at the same budget with its 95%
  interval and verdict (unadjusted) and its simultaneous interval and verdict; each method's
  search cost (its filter, supernet and searches, first run's seconds)
- `ablations.png`: per protocol, every method's top-1 per budget and the paired differences
- `summary.json`: the same numbers per protocol and ablation, with how they were computed

Intervals: the report's paired, hierarchical bootstrap over runs, fine-tuning seeds and
test images (`flora_steps.report.stats`).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from ..pipeline.catalogue import ABLATION_COSTS
from ..pipeline.methods import ABLATION_METHODS, ABLATIONS, METHODS
from ..report.ablations import REFERENCE, ablation_table, label, readable_ablations
from ..report.figures import macs_unit, plot_ablations
from ..report.stats import PairedBootstrap
from ..report.tables import PROTOCOLS, Evaluated, by_protocol
from ..runtime.artifacts import read_json, save_figure, write_json
from ..runtime.context import StageContext, run_as_program, stage_main
from ..runtime.results import (
    OMITTED_RUNS,
    REPLICATES,
    SharedSeeds,
    clean,
    compared_number,
    correct_matrix,
    interval_description,
    method_models,
    write_table,
)

log = logging.getLogger(__name__)


def search_seconds(context: StageContext) -> dict[str, float]:
    """Each method's search cost in the first run: the seconds of its filter, supernet and every search."""
    return {
        method: sum(
            float(read_json(path, "metrics")["seconds"])
            for stage in stages
            for path in context.inputs(f"{stage}_metrics")
        )
        for method, stages in ABLATION_COSTS.items()
    }


def summary(table: pd.DataFrame, seeds: list[int], runs: int, images: int) -> dict:
    """The ablation table as JSON: per protocol, FLORA's top-1 and each ablation's, with its difference to FLORA
    (mean over budgets first, then per budget)."""

    def entry(row: pd.Series) -> dict:
        numbers = {
            "macs": round(float(row["macs"])),
            "top1": float(row["top1"]),
            "top1_interval": [float(row["top1_low"]), float(row["top1_high"])],
        }
        if row["method"] != REFERENCE:
            numbers["delta_top1_vs_flora"] = compared_number(row, "delta")
        return numbers

    numbers = {}
    for protocol in PROTOCOLS:
        numbers[protocol] = {}
        for method, rows in table[table["protocol"] == protocol].groupby("method", sort=False):
            mean, per_budget = rows[rows["budget"].isna()].iloc[0], rows[rows["budget"].notna()]
            numbers[protocol][method] = {
                "label": label(method),
                "search_seconds": clean(mean["search_seconds"]),
                "mean_over_budgets": entry(mean),
                "budgets": [{"budget": float(row["budget"]), **entry(row)} for _, row in per_budget.iterrows()],
            }
    return {
        "ablations": {name: ablation.label for name, ablation in ABLATIONS.items()},
        "statistics": {
            "runs": runs,
            "seeds": seeds,
            "test_images": images,
            "interval": interval_description(runs),
            "omitted_variance": OMITTED_RUNS if runs == 1 else None,
            "compared": "each ablation with FLORA at the same budget, paired on the same runs, seeds and images; "
            "per-budget verdicts are unadjusted, simultaneous ones hold together over the means, and over the "
            "per-budget rows, of one protocol",
        },
        "protocols": PROTOCOLS,
        **numbers,
    }


def run(context: StageContext) -> None:
    params = context.params
    _, _, labels = correct_matrix(context.input("dense_predictions"), None)
    models: dict[str, list[Evaluated]] = {protocol: [] for protocol in PROTOCOLS}
    seeds = SharedSeeds()
    for method in (REFERENCE, *ABLATION_METHODS):
        fine_tuned, started = method_models(context, method, params.budgets.search, labels, seeds)
        models["fine-tuned"] += fine_tuned
        models["inherited"] += started
    runs = len({model.run for model in models["fine-tuned"]})
    bootstrap = PairedBootstrap(
        max(len(seeds.seeds or []), 1), len(labels), REPLICATES, np.random.default_rng(params.seed), runs=runs
    )
    note = f"Intervals omit {OMITTED_RUNS}." if bootstrap.omits_runs else None
    if note:
        log.warning(note)
    seconds = search_seconds(context)
    table = by_protocol({protocol: ablation_table(group, bootstrap, seconds) for protocol, group in models.items()})
    divisor, unit = macs_unit(float(table["macs"].max()))
    shown = readable_ablations(table, divisor, unit)
    write_table(context, "ablations", table, shown, note)
    styles = {REFERENCE: METHODS[REFERENCE].style} | {name: m.style for name, m in ABLATION_METHODS.items()}
    names = {method: label(method) for method in styles}
    save_figure(context.output("figure"), plot_ablations(table, styles, names))
    write_json(context.output("summary"), summary(table, seeds.seeds or [], runs, len(labels)))
    for _, row in shown[table["budget"].isna().to_numpy()].iterrows():
        log.info(
            "%s, %s, mean over budgets: top-1 %s; vs FLORA %s, %s",
            *row[["protocol", "method", "top-1 % [95% interval]", "Δ top-1 vs FLORA [95% interval]"]],
            row["verdict (unadjusted)"],
        )


def main(argv: list[str] | None = None) -> int:
    return stage_main("ablations", __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    run_as_program(main)
