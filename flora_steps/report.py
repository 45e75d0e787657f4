"""Paper-style tables and figures from the finished pipeline, and a summary of the headline numbers.

Reads the other stages' results (nothing is recomputed but a few thousand sampled
subnet sizes) and writes `results/report/`:

- `results.{csv,md,tex}`: dense vs uniform vs FLORA per budget: MACs, parameters,
  MACs reduction, test top-1/top-5 and the delta to dense
- `extra_reduction.{csv,md,tex}`: per FLORA budget, the MACs the uniform baseline
  needs for the same top-1 (interpolated on its curve, closed by the dense model)
  and the extra MACs reduction of FLORA
- `ranks.{csv,md,tex}`: every target layer's rank in every searched subnet
- `costs.{csv,md,tex}`: wall time of every stage run (the stages' own timers)
- `tradeoff.png` (the headline figure: top-1 vs MACs), `spectra.png`,
  `sensitivity.png`, `search.png`, `ranks.png`, `sampling.png`
- `summary.json`: the headline numbers

Outputs are deterministic: the same results give byte-identical files.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from .artifacts import (
    ModelSpec,
    read_json,
    read_rank_config,
    read_space,
    save_figure,
    write_csv,
    write_json,
    write_text,
)
from .core import trace_costs
from .core.evolution import MacsTable
from .core.space import SubnetSampler
from .errors import UserError
from .figures import (
    macs_unit,
    plot_ranks,
    plot_sampling,
    plot_search,
    plot_sensitivity,
    plot_spectra,
    plot_tradeoff,
    single_layer_kl,
)
from .models import input_shape
from .params import Params
from .stage import RESULTS, budget_name, log, stage_dir, stage_main
from .tables import costs_table, extra_reduction_table, latex, markdown, ranks_table, readable, results_table

STAGE = "report"
SAMPLED_SUBNETS = 4000


def read_csv(path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except FileNotFoundError:
        raise UserError(f"{path}: not found (run the stage that writes it first)") from None


def write_table(stem: str, table: pd.DataFrame, shown: pd.DataFrame) -> None:
    """``<stem>.csv`` (raw numbers), ``<stem>.md`` and ``<stem>.tex`` (readable)."""
    out = stage_dir(STAGE)
    write_csv(out / f"{stem}.csv", table)
    write_text(out / f"{stem}.md", markdown(shown))
    write_text(out / f"{stem}.tex", latex(shown))


def sampled_macs(params: Params, space, rules=("lowrank", "uniform")) -> tuple[dict[str, np.ndarray], int]:
    """MACs of subnets drawn by each sampling rule from the filtered space (fixed seed), and the dense MACs."""
    spec = ModelSpec.model_validate(read_json(RESULTS / "decompose" / "model.json", "model description"))
    with torch.device("meta"):
        skeleton = spec.build()
    costs = trace_costs(skeleton, input_shape(skeleton))
    table = MacsTable.from_space(space, costs)
    samples = {}
    for rule in rules:
        sampler, rng = SubnetSampler(space, rule), np.random.default_rng(params.seed)
        samples[rule] = np.array([table.macs(sampler.sample_indices(rng)) for _ in range(SAMPLED_SUBNETS)], dtype=float)
    return samples, costs.dense_macs


def run(params: Params) -> None:
    out = stage_dir(STAGE)
    budgets = params.budgets
    dense = read_json(RESULTS / "pretrain" / "metrics.json", "base model metrics")
    if dense.get("top1") is None:
        raise UserError("results/pretrain/metrics.json: the base model was not evaluated (data.root missing?)")
    methods = {
        "uniform": {
            b: read_json(RESULTS / "retrain" / "uniform" / budget_name(b) / "metrics.json", "metrics")
            for b in budgets.uniform
        },
        "flora": {
            b: read_json(RESULTS / "retrain" / "flora" / budget_name(b) / "metrics.json", "metrics")
            for b in budgets.search
        },
    }
    results = results_table(dense, methods)
    extra = extra_reduction_table(results)
    divisor, unit = macs_unit(dense["macs"])
    write_table("results", results, readable(results, divisor, unit))
    write_table("extra_reduction", extra, readable(extra, divisor, unit))

    layers = read_csv(RESULTS / "decompose" / "layers.csv")
    configs = {b: read_rank_config(RESULTS / "search" / budget_name(b) / "ranks.json").ranks for b in budgets.search}
    ranks = ranks_table(layers, configs)
    write_table("ranks", ranks, ranks)

    seconds = [
        (stage, read_json(RESULTS / stage / "metrics.json", "metrics")["seconds"])
        for stage in ("pretrain", "decompose", "filter", "supernet")
    ]
    seconds += [
        (f"search {b}", read_json(RESULTS / "search" / budget_name(b) / "metrics.json", "metrics")["seconds"])
        for b in budgets.search
    ]
    seconds += [
        (f"retrain {m} {b}", metrics["seconds"])
        for m, by_budget in methods.items()
        for b, metrics in sorted(by_budget.items())
    ]
    costs = costs_table(seconds)
    write_table("costs", costs, readable(costs, divisor, unit))

    space = read_space(RESULTS / "filter" / "space.json")
    histories = {budget_name(b): read_csv(RESULTS / "search" / budget_name(b) / "history.csv") for b in budgets.search}
    fractions = ranks.set_index("layer")[[str(b) for b in sorted(configs)]].div(
        ranks.set_index("layer")["full_rank"], axis=0
    )
    save_figure(out / "tradeoff.png", plot_tradeoff(results, extra))
    save_figure(
        out / "spectra.png", plot_spectra(read_csv(RESULTS / "decompose" / "spectra.csv"), params.decompose.targets)
    )
    save_figure(
        out / "sensitivity.png",
        plot_sensitivity(single_layer_kl(read_csv(RESULTS / "filter" / "sensitivity.csv"), space)),
    )
    save_figure(out / "search.png", plot_search(histories))
    save_figure(out / "ranks.png", plot_ranks(fractions))
    save_figure(out / "sampling.png", plot_sampling(*sampled_macs(params, space)))

    best = extra.dropna(subset=["extra_reduction"])
    summary = {
        "dense": {"top1": dense["top1"], "macs": dense["macs"], "params": dense["params"]},
        "budgets": [
            {
                "budget": float(row["budget"]),
                "flora": {"top1": row["top1"], "macs": int(row["macs"])},
                "uniform": {
                    "top1": methods["uniform"][row["budget"]]["top1"],
                    "macs": methods["uniform"][row["budget"]]["macs"],
                },
                "extra_macs_reduction": None if math.isnan(row["extra_reduction"]) else row["extra_reduction"],
            }
            for _, row in extra.iterrows()
        ],
        "max_extra_macs_reduction": float(best["extra_reduction"].max()) if len(best) else None,
        "pipeline_seconds": round(float(costs["seconds"].iloc[-1]), 2),
    }
    write_json(out / "summary.json", summary)
    log.info(
        "FLORA vs uniform at equal top-1: up to %s extra MACs reduction",
        "n/a" if summary["max_extra_macs_reduction"] is None else f"{100 * summary['max_extra_macs_reduction']:.1f}%",
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
