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

import logging
import math
from pathlib import Path

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
from .layout import budget_name
from .models import build_model, input_shape
from .stage import StageContext, stage_main
from .tables import costs_table, extra_reduction_table, latex, markdown, ranks_table, readable, results_table

log = logging.getLogger(__name__)
SAMPLED_SUBNETS = 4000


def read_csv(path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except FileNotFoundError:
        raise UserError(f"{path}: not found (run the stage that writes it first)") from None


def write_table(context: StageContext, name: str, table: pd.DataFrame, shown: pd.DataFrame) -> None:
    """``<name>.csv`` (raw numbers), ``<name>.md`` and ``<name>.tex`` (readable)."""
    write_csv(context.output(f"{name}_csv"), table)
    write_text(context.output(f"{name}_md"), markdown(shown))
    write_text(context.output(f"{name}_tex"), latex(shown))


def sampled_macs(context: StageContext, space, rules=("lowrank", "uniform")) -> tuple[dict[str, np.ndarray], int]:
    """MACs of subnets drawn by each sampling rule from the filtered space (fixed seed), and the dense MACs."""
    spec = ModelSpec.model_validate(read_json(context.input("spec"), "model description"))
    with torch.device("meta"):
        skeleton = build_model(spec.model, spec.model_kwargs, spec.lowrank, spec.factorised)
    costs = trace_costs(skeleton, input_shape(skeleton))
    table = MacsTable.from_space(space, costs)
    samples = {}
    for rule in rules:
        sampler, rng = SubnetSampler(space, rule), np.random.default_rng(context.params.seed)
        samples[rule] = np.array([table.macs(sampler.sample_indices(rng)) for _ in range(SAMPLED_SUBNETS)], dtype=float)
    return samples, costs.dense_macs


def by_budget(context: StageContext, key: str, budgets: list[float]) -> dict[float, Path]:
    """The paths of a per-budget input, by budget."""
    return dict(zip(budgets, context.inputs(key), strict=True))


def run(context: StageContext) -> None:
    params, budgets = context.params, context.params.budgets
    dense = read_json(context.input("base"), "base model metrics")
    if dense.get("top1") is None:
        raise UserError(f"{context.input('base')}: the base model was not evaluated (data.root missing?)")
    methods = {
        method: {b: read_json(path, "metrics") for b, path in by_budget(context, method, values).items()}
        for method, values in (("uniform", budgets.uniform), ("flora", budgets.search))
    }
    results = results_table(dense, methods)
    extra = extra_reduction_table(results)
    divisor, unit = macs_unit(dense["macs"])
    write_table(context, "results", results, readable(results, divisor, unit))
    write_table(context, "extra_reduction", extra, readable(extra, divisor, unit))

    layers = read_csv(context.input("layers"))
    configs = {
        b: read_rank_config(path).ranks for b, path in by_budget(context, "search_ranks", budgets.search).items()
    }
    ranks = ranks_table(layers, configs)
    write_table(context, "ranks", ranks, ranks)

    seconds = [
        (stage, read_json(context.input(key), "metrics")["seconds"])
        for stage, key in (
            ("pretrain", "base"),
            ("decompose", "decompose"),
            ("filter", "filter"),
            ("supernet", "supernet"),
        )
    ]
    seconds += [
        (f"search {b}", read_json(path, "metrics")["seconds"])
        for b, path in by_budget(context, "search", budgets.search).items()
    ]
    seconds += [
        (f"retrain {m} {b}", metrics["seconds"])
        for m, results_by_budget in methods.items()
        for b, metrics in sorted(results_by_budget.items())
    ]
    costs = costs_table(seconds)
    write_table(context, "costs", costs, readable(costs, divisor, unit))

    space = read_space(context.input("space"))
    histories = {
        budget_name(b): read_csv(path) for b, path in by_budget(context, "search_history", budgets.search).items()
    }
    fractions = ranks.set_index("layer")[[str(b) for b in sorted(configs)]].div(
        ranks.set_index("layer")["full_rank"], axis=0
    )
    save_figure(context.output("tradeoff"), plot_tradeoff(results, extra))
    save_figure(context.output("spectra"), plot_spectra(read_csv(context.input("spectra")), params.decompose.targets))
    save_figure(
        context.output("sensitivity"),
        plot_sensitivity(single_layer_kl(read_csv(context.input("sensitivity")), space)),
    )
    save_figure(context.output("search"), plot_search(histories))
    save_figure(context.output("ranks_figure"), plot_ranks(fractions))
    save_figure(context.output("sampling"), plot_sampling(*sampled_macs(context, space)))

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
    write_json(context.output("summary"), summary)
    log.info(
        "FLORA vs uniform at equal top-1: up to %s extra MACs reduction",
        "n/a" if summary["max_extra_macs_reduction"] is None else f"{100 * summary['max_extra_macs_reduction']:.1f}%",
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main("report", __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
