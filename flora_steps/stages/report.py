"""Paper-style tables and figures from the finished pipeline, with intervals, and a summary of the results.

Reads the other stages' results (nothing is recomputed but a few thousand sampled
subnet sizes and the bootstrap) and writes `results/report/`. The results, comparison
and means tables hold both protocols (`protocol` column, `tables.PROTOCOLS`):
"fine-tuned" (every compressed model fine-tuned the same way, once per seed) and
"inherited" (the paper's: every compressed model as its fine-tuning starts, evaluated
once: FLORA's searched subnet and the control with the supernet's weights).

- `results.{csv,md,tex}`: every model (dense; SVD uniform, the uniform-rank control,
  FLORA, ViT-Slim, FLORA on ViT-Slim's model, OFB and FLORA on OFB's model, per budget): MACs, parameters, MACs
  reduction, test top-1 as mean ± std over seeds with its 95% interval, top-5, the
  delta to dense, and the training it had (optimizer steps and images, the inherited
  share included: the supernet's, ViT-Slim's search, the base model's)
- `comparison.{csv,md,tex}`: per FLORA budget, against the control and against SVD
  uniform, and per budget of FLORA on ViT-Slim's (OFB's) model, against ViT-Slim (OFB) alone: the
  top-1 difference at equal MACs (the baseline's curve interpolated at the point's
  MACs) and the extra MACs reduction at equal top-1, each with its 95% interval and
  verdict taken alone (unadjusted: better / worse / within noise / identical model /
  undetermined / out of range), and its simultaneous interval and verdict
- `means.{csv,md,tex}`: per comparison, both numbers' means over the method's budgets:
  the report's primary result
- `ranks.{csv,md,tex}`: every target layer's rank in every searched subnet
- `costs.{csv,md,tex}`: wall time of every stage run (the stages' own timers; the first
  run's, with several runs of the pipeline)
- `search_costs.{csv,md,tex}`: each method's search cost: the wall time of the stages
  that choose its model (once, and per budget), fine-tuning excluded
- `latency.{csv,md,tex}`: every model the latency stage timed (the first run's, on the
  compute device): MACs, measured ms per batch with quartiles, speedup, the latency
  table's prediction and its error, fine-tuned top-1 with its 95% interval;
  `latency.png`: top-1 against MACs and against measured latency, every method
- `latency_comparison.{csv,md,tex}`: FLORA under latency budgets against FLORA's curve
  of top-1 against measured latency (first run): the top-1 difference at equal latency
  and the extra latency reduction at equal top-1, per budget, under both protocols, with
  intervals and verdicts as in the comparison table
- `tradeoff.png` (the headline figure: per protocol, one panel per comparison, top-1 vs
  MACs with 95% intervals and the baseline's curve as interpolated, and a panel of the
  paired differences, means over budgets first), `spectra.png`,
  `sensitivity.png`, `search.png`, `ranks.png`, `sampling.png`
- `summary.json`: per protocol and compared method, the means over budgets and every
  budget's comparison, with intervals; an interval end is a number, ``"unbounded"``,
  or (an extra reduction's upper end) ``"< 1"``; an out-of-range number is ``null``
  with the verdict ``out of range``

With several runs of the pipeline (`runs`), every table row is the mean over runs, each
run compared with its own baselines; the figures of FLORA's own stages (spectra,
sensitivity, search, ranks, sampling) and the costs are the first run's.

Intervals: a paired, hierarchical bootstrap over runs, fine-tuning seeds and test images
(`flora_steps.report.stats`), the same replicates for every number. A report from one
run says (first in its tables, its log and `summary.json`) that its intervals omit
run-to-run variance. Outputs are deterministic: the same results give byte-identical
files.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..core import trace_costs
from ..core.search import CostTable
from ..core.space import SubnetSampler
from ..errors import UserError
from ..pipeline.catalogue import METHOD_STAGES, SEARCH_STAGES, STAGES, choosing_stages
from ..pipeline.methods import METHODS, RETRAINED, latency_comparisons
from ..pipeline.schema import budget_name
from ..report.figures import macs_unit, plot_ranks, plot_sampling, plot_search, plot_tradeoff
from ..report.latency import latency_table, on_latency_axis, plot_latency, readable_latency, timings_on
from ..report.layer_figures import plot_sensitivity, plot_spectra, single_layer_kl
from ..report.stats import PairedBootstrap
from ..report.tables import (
    PROTOCOLS,
    Evaluated,
    by_protocol,
    comparison_table,
    costs_table,
    ranks_table,
    readable,
    readable_comparison,
    readable_means,
    readable_results,
    readable_search_costs,
    results_table,
    search_costs_table,
)
from ..runtime.artifacts import (
    ModelSpec,
    read_csv,
    read_json,
    read_rank_config,
    read_space,
    save_figure,
    write_json,
)
from ..runtime.context import StageContext, run_as_program, stage_main
from ..runtime.models import input_shape
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
SAMPLED_SUBNETS = 4000


def sampled_macs(context: StageContext, space, rules=("lowrank", "uniform")) -> tuple[dict[str, np.ndarray], int]:
    """MACs of subnets drawn by each sampling rule from the filtered space (fixed seed), and the dense MACs."""
    spec = ModelSpec.model_validate(read_json(context.input("spec"), "model description"))
    with torch.device("meta"):
        skeleton = spec.build()
    costs = trace_costs(skeleton, input_shape(skeleton))
    table = CostTable.of_macs(space, costs)
    samples = {}
    for rule in rules:
        sampler, rng = SubnetSampler(space, rule), np.random.default_rng(context.params.seed)
        samples[rule] = np.array([table.cost(sampler.sample_indices(rng)) for _ in range(SAMPLED_SUBNETS)], dtype=float)
    return samples, costs.dense_macs


def by_budget(context: StageContext, key: str, budgets: list[float]) -> dict[float, Path]:
    """The paths of a per-budget input, by budget."""
    return dict(zip(budgets, context.inputs(key), strict=True))


def evaluated_models(context: StageContext) -> tuple[dict[str, list[Evaluated]], list[int]]:
    """Per protocol (``PROTOCOLS``), dense and every compressed model of every run of the pipeline with its
    per-seed, per-image results; the seeds they share."""
    base = context.input("pretrain_metrics")
    dense_metrics = read_json(base, "base model metrics")
    if dense_metrics.get("top1") is None:
        raise UserError(f"{base}: the base model was not evaluated (data.root missing?)")
    dense_correct, _, labels = correct_matrix(context.input("dense_predictions"), None)
    dense = Evaluated("dense", 1.0, dense_metrics, dense_correct)
    models = {protocol: [dense] for protocol in PROTOCOLS}
    seeds = SharedSeeds()
    for method, stage in METHOD_STAGES.items():
        budgets = getattr(context.params.budgets, STAGES[stage].foreach)
        fine_tuned, started = method_models(context, method, budgets, labels, seeds)
        models["fine-tuned"] += fine_tuned
        models["inherited"] += started
    return models, seeds.seeds or []


def budget_entries(method: str, results: pd.DataFrame, comparison: pd.DataFrame) -> list[dict]:
    """Per budget of ``method``: its MACs and top-1, and each of its comparisons, with intervals."""
    entries = []
    for budget, rows in comparison[comparison["method"] == method].groupby("budget", sort=True):
        point = results[(results["method"] == method) & (results["budget"] == budget)].iloc[0]
        entry = {
            "budget": float(budget),
            method: {
                "macs": int(point["macs"]),
                "top1": float(point["top1"]),
                "top1_std": clean(point["top1_std"]),
                "top1_interval": [float(point["top1_low"]), float(point["top1_high"])],
            },
        }
        for _, row in rows.iterrows():
            entry[f"vs_{row['baseline']}"] = {
                "top1_at_equal_macs": clean(row["baseline_top1"]),
                "delta_top1": compared_number(row, "delta"),
                "delta_top1_segment": clean(row["delta_span"]),  # upper over lower MACs of the curve segment used
                "baseline_macs_at_equal_top1": clean(row["baseline_macs"]),
                "extra_macs_reduction": compared_number(row, "extra"),
                "extra_macs_reduction_below": clean(row["extra_bound"]),  # when out of range below the curve
                "extra_macs_reduction_segment": clean(row["extra_span"]),
            }
        entries.append(entry)
    return entries


def summary(
    dense: Evaluated, results: pd.DataFrame, comparison: pd.DataFrame, means: pd.DataFrame, seeds, runs: int
) -> dict:
    """The report's numbers as JSON: per protocol and compared method, the means over budgets (the primary result)
    and every budget's comparisons, with intervals; and how they were computed."""
    compared = [method.name for method in METHODS.values() if method.baselines]

    def mean_over_budgets(rows: pd.DataFrame) -> dict:
        return {
            f"vs_{row['baseline']}": {
                "budgets": int(row["budgets"]),
                "delta_top1": compared_number(row, "delta"),
                "extra_macs_reduction": compared_number(row, "extra"),
            }
            for _, row in rows.iterrows()
        }

    fine_tuned = results[(results["protocol"] == "fine-tuned") & (results["method"] != "dense")]
    training = {
        method: {k: rows.iloc[0][k] for k in ("train_steps", "train_images", "supernet_steps")}
        for method, rows in fine_tuned.groupby("method", sort=True)
    }
    return {
        "dense": {"top1": dense.metrics["top1"], "macs": dense.metrics["macs"], "params": dense.metrics["params"]},
        "statistics": {
            "runs": runs,
            "seeds": seeds,
            "test_images": int(dense.correct.shape[1]),
            "interval": interval_description(runs),
            "omitted_variance": OMITTED_RUNS if runs == 1 else None,
            "primary": "mean_over_budgets; per-budget verdicts are unadjusted, simultaneous ones hold together "
            "over each table's numbers of one kind and protocol",
        },
        "protocols": PROTOCOLS,
        "training": {m: {k: None if pd.isna(v) else int(v) for k, v in t.items()} for m, t in training.items()},
        **{
            protocol: {
                method: {
                    "mean_over_budgets": mean_over_budgets(
                        means[(means["protocol"] == protocol) & (means["method"] == method)]
                    ),
                    "budgets": budget_entries(
                        method,
                        results[results["protocol"] == protocol],
                        comparison[comparison["protocol"] == protocol],
                    ),
                }
                for method in compared
            }
            for protocol in PROTOCOLS
        },
    }


def stage_seconds(context: StageContext) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Wall time of the stage runs before the retrains, from the stages' own timers: those that run once
    by stage, the per-budget ones by stage (one entry per budget, in the order of its budgets list)."""

    def seconds(path: Path) -> float:
        return float(read_json(path, "metrics")["seconds"])

    once, per_budget = {}, {}
    for name, stage in SEARCH_STAGES.items():
        runs = [seconds(path) for path in context.inputs(f"{name}_metrics")]
        if stage.foreach:
            per_budget[name] = runs
        elif runs:  # none: the stage is idle under these budgets
            once[name] = runs[0]
    return once, per_budget


def method_search_costs(context: StageContext, once: dict[str, float], per_budget: dict[str, list[float]]) -> dict:
    """Per compressed model's method: the stage runs that choose its models once, with their seconds (a
    per-budget stage's run at a budgets key named ``<stage> at budgets.<key>``), and its per-budget stage."""
    budgets = context.params.budgets
    choosing = {}
    for method in RETRAINED:
        if not getattr(budgets, RETRAINED[method].budgets):
            continue  # no models
        stages, searched = choosing_stages(method)
        runs = []
        for stage, key in stages:
            if key is None:
                runs.append((stage, once[stage]))
            else:
                index = getattr(budgets, STAGES[stage].foreach).index(getattr(budgets, key))
                runs.append((f"{stage} at budgets.{key}", per_budget[stage][index]))
        choosing[method] = (runs, searched)
    return choosing


def write_latency(
    context: StageContext,
    protocols: dict[str, list[Evaluated]],
    results: pd.DataFrame,
    bootstrap: PairedBootstrap,
    note: str | None,
) -> None:
    """Accuracy against measured latency on the compute device (the last device the latency stage timed on): every
    model's table and figure, and each latency comparison (``methods.latency_comparisons``) under both protocols,
    on the first run's models."""
    timings = read_csv(context.input("latency"))
    timings = timings_on(timings, timings["device"].iloc[-1])
    table = latency_table(results[results["protocol"] == "fine-tuned"], timings)
    write_table(context, "latency", table, readable_latency(table), note)
    save_figure(context.output("latency_figure"), plot_latency(table))
    pairs = latency_comparisons()
    compared = {
        protocol: comparison_table(on_latency_axis(group, timings), bootstrap, pairs)[0]
        for protocol, group in protocols.items()
    }
    comparison = by_protocol(compared)
    shown = readable_comparison(comparison, 1000.0, "ms").rename(columns=lambda c: c.replace("MACs", "latency"))
    comparison = comparison.rename(columns=lambda c: c.replace("macs", "latency_us"))
    first_run = f"The first run's models, timed on {timings['device'].iloc[0]}."
    write_table(context, "latency_comparison", comparison, shown, f"{first_run} {note}" if note else first_run)
    for row in shown.itertuples(index=False):
        log.info("latency comparison: %s", ", ".join(str(value) for value in row))


def run(context: StageContext) -> None:
    params, budgets = context.params, context.params.budgets
    protocols, seeds = evaluated_models(context)
    models = protocols["fine-tuned"]
    dense = models[0]
    bootstrap = PairedBootstrap(
        max(len(seeds), 1),
        dense.correct.shape[1],
        REPLICATES,
        np.random.default_rng(params.seed),
        runs=len({model.run for model in models}),
    )
    note = f"Intervals omit {OMITTED_RUNS}." if bootstrap.omits_runs else None
    if note:
        log.warning(note)
    results = by_protocol({protocol: results_table(group, bootstrap) for protocol, group in protocols.items()})
    compared = {protocol: comparison_table(group, bootstrap) for protocol, group in protocols.items()}
    comparison = by_protocol({protocol: tables[0] for protocol, tables in compared.items()})
    means = by_protocol({protocol: tables[1] for protocol, tables in compared.items()})
    divisor, unit = macs_unit(dense.macs)
    write_table(context, "results", results, readable_results(results, divisor, unit), note)
    write_table(context, "comparison", comparison, readable_comparison(comparison, divisor, unit), note)
    write_table(context, "means", means, readable_means(means), note)

    layers = read_csv(context.input("layers"))
    configs = {
        b: read_rank_config(path).ranks for b, path in by_budget(context, "search_ranks", budgets.search).items()
    }
    ranks = ranks_table(layers, configs)
    write_table(context, "ranks", ranks, ranks)

    once, per_budget = stage_seconds(context)
    searches = [
        (f"{stage} {budget_name(b)}", value)
        for stage, runs in per_budget.items()
        for b, value in zip(getattr(budgets, STAGES[stage].foreach), runs, strict=True)
    ]
    retrains = [(f"retrain {m.method} {m.budget}", float(m.metrics["seconds"])) for m in models[1:] if m.run == 0]
    costs = costs_table([*once.items(), *searches, *retrains])
    write_table(context, "costs", costs, readable(costs))
    search_costs = search_costs_table(method_search_costs(context, once, per_budget), per_budget)
    write_table(context, "search_costs", search_costs, readable_search_costs(search_costs))

    space = read_space(context.input("space"))
    histories = {
        budget_name(b): read_csv(path) for b, path in by_budget(context, "search_history", budgets.search).items()
    }
    fractions = ranks.set_index("layer")[[str(b) for b in sorted(configs)]].div(
        ranks.set_index("layer")["full_rank"], axis=0
    )
    save_figure(context.output("tradeoff"), plot_tradeoff(results, comparison, means))
    write_latency(context, protocols, results, bootstrap, note)
    save_figure(context.output("spectra"), plot_spectra(read_csv(context.input("spectra")), params.decompose.targets))
    save_figure(
        context.output("sensitivity"),
        plot_sensitivity(single_layer_kl(read_csv(context.input("sensitivity")), space)),
    )
    save_figure(context.output("search"), plot_search(histories))
    save_figure(context.output("ranks_figure"), plot_ranks(fractions))
    save_figure(context.output("sampling"), plot_sampling(*sampled_macs(context, space)))

    numbers = summary(dense, results, comparison, means, seeds, bootstrap.runs)
    numbers["pipeline_seconds"] = round(float(costs["seconds"].iloc[-1]), 2)
    write_json(context.output("summary"), numbers)
    shown = readable_means(means)
    for _, row in shown.iterrows():
        log.info(
            "%s, %s vs %s, mean over %s budgets: top-1 at equal MACs %s, %s; fewer MACs at equal top-1 %s, %s",
            *row[["protocol", "method", "baseline", "budgets", "mean Δ top-1 [95% interval]", "Δ verdict"]],
            *row[["mean extra MACs reduction % [95% interval]", "reduction verdict"]],
        )


def main(argv: list[str] | None = None) -> int:
    return stage_main("report", __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    run_as_program(main)
