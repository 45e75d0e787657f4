"""Evolutionary search of the best subnet under one MACs budget, with the supernet's inherited weights.

    python -m flora_steps.stages.search --params params.yaml --budget 0.5

A subnet picks one rank tuple per block from the filtered space (`filter`); it is
legal when its MACs lie in [budget - search.band, budget] (fractions of the dense
model's MACs). Fitness is val top-1 of the trained supernet (`supernet`) at the
subnet's ranks, ties broken by the distillation loss to the dense base model. The
val split is drawn once (`seed`) into three disjoint parts, so that the choice does
not rest on the noise of a few images and the reported top-1 is not the one that
chose: the evolution scores subnets on `search.val_images` of them; its `search.top_k`
best candidates are re-ranked on every val image but the held-out ones (the
evolution's and the rest), and the fittest there is chosen; `search.held_out`
images, which choose nothing, measure it. The search itself
(stratified initial population, mutation, crossover, random fill, a cache of
visited subnets) is `flora_steps.core.search`; as in the released code, a mutation
draws a block's new rank tuple by the supernet's sampling rule (`supernet.sampling`:
p ∝ 1/∏ratio) and a crossover takes each layer's rank from either parent. Under `torchrun` (`compute.processes`)
every process scores each subnet on its share of the images.

`search --method flora_latency --budget B` (one per budget of `budgets.latency`) is the
same search with the latency the machine's table predicts (`latency_table`) as a
subnet's cost: legal in [B - search.band x dense latency, B], B a share of the dense
model's latency or milliseconds (`budgets.latency_unit`); it writes under
`results/search_latency/<budget>/`, with each candidate's predicted milliseconds. With
`--base slim` or `--base ofb` (budgets `budgets.slim_flora_latency`,
`budgets.ofb_flora_latency`) it prices by that pruned model's table
(`latency_table_on_slim`/`_on_ofb`), its budgets shares of that model's latency.
Writes `results/search/<budget>/`:

- `ranks.json`: the chosen subnet as a rank config
- `history.csv`: per generation, evaluations so far, best and top-k mean fitness, best MACs
- `candidates.csv`: the best candidates, in the evolution's order: MACs, val top-1 on the
  evolution's images, on every choosing image, and on the held-out images; which was chosen
- `metrics.json`: the chosen subnet's val top-1 on the held-out images (`top1`) and on the
  images that chose it, MACs, parameters; evaluations per second
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import total_ordering

import numpy as np
import pandas as pd
import torch

from ..core import RankConfig, lowrank_layers, set_ranks, trace_costs
from ..core.search import CostTable, EvolutionSettings, Genome, Operators, evolve, genome_choices
from ..core.space import SearchSpace, sampling_probabilities
from ..errors import UserError
from ..pipeline.methods import METHODS
from ..pipeline.schema import budgets_key
from ..runtime.artifacts import load_model, read_space, write_csv, write_json, write_rank_config
from ..runtime.context import StageContext, run_as_program, stage_main
from ..runtime.data import build_splits, make_loader, partition
from ..runtime.distributed import is_first, sum_over_processes
from ..runtime.latency import LatencyBudget, latency_budget
from ..runtime.models import data_config, input_shape
from ..runtime.progress import progress
from ..runtime.training import autocast, distillation_loss

log = logging.getLogger(__name__)
HISTORY_COLUMNS = ["generation", "evaluations", "best_top1", "best_loss", "top_k_mean_top1", "best_macs"]


@total_ordering
@dataclass(frozen=True)
class Fitness:
    """Val top-1 of a subnet; between equal top-1, the lower distillation loss is fitter."""

    top1: float
    loss: float

    @classmethod
    def of(cls, tally: np.ndarray) -> Fitness:
        """From a tally (correct, summed loss, images)."""
        correct, loss, images = tally
        return cls(correct / images, loss / images)

    def __lt__(self, other: Fitness) -> bool:
        return (self.top1, -self.loss) < (other.top1, -other.loss)


class SubnetScorer:
    """Scores subnets of a supernet on fixed batches against the dense model's logits.

    Under ``torchrun`` each process holds its share of the images and every tally
    combines all shares, so every process runs the same evolution.
    """

    def __init__(self, supernet: torch.nn.Module, teacher: torch.nn.Module, loader, params, device: torch.device):
        self.supernet = supernet.eval()
        self.batches = [(images.to(device), labels.to(device)) for images, labels in loader]
        with torch.no_grad(), autocast(device, params.compute.amp):
            self.teacher_logits = [teacher(images).float() for images, _ in self.batches]
        self.temperature = params.supernet.temperature
        self.amp = params.compute.amp
        self.device = device

    @torch.no_grad()
    def tally(self, ranks: dict[str, int]) -> np.ndarray:
        """(images right, summed distillation loss, images) of the subnet at ``ranks``, over every process."""
        set_ranks(self.supernet, ranks)
        correct, loss, count = 0, 0.0, 0
        for (images, labels), targets in zip(self.batches, self.teacher_logits, strict=True):
            with autocast(images.device, self.amp):
                logits = self.supernet(images).float()
            correct += (logits.argmax(1) == labels).sum().item()
            loss += distillation_loss(logits, targets, labels, self.temperature, 0.0).item() * len(labels)
            count += len(labels)
        return np.array(sum_over_processes([correct, loss, count], self.device))


def val_parts(val, cfg, seed: int) -> tuple:
    """The val split in three disjoint parts: the evolution's (``search.val_images``), the rest of the images
    that choose among its best candidates, and ``search.held_out`` images that only measure the chosen one."""
    if cfg.held_out >= len(val):
        raise UserError(
            f"search.held_out: {cfg.held_out} leaves no val image to search on (the val split has {len(val)})"
        )
    held_out, choosing = partition(val, cfg.held_out, seed)
    evolution, rest = partition(choosing, cfg.val_images or len(choosing), seed)
    return evolution, rest, held_out


def check_reachable(
    table: CostTable, low: float, high: float, key: str, budget: float, describe: Callable[[float], str]
) -> None:
    """One clear line (``UserError`` naming the budgets ``key``) when no subnet can land in [``low``, ``high``];
    ``describe`` puts a cost in words."""
    if table.smallest > high:
        raise UserError(
            f"{key}: {budget} is below the cheapest subnet of the filtered space ({describe(table.smallest)}); "
            "add smaller filter.ratios or raise the budget"
        )
    if table.largest < low:
        raise UserError(
            f"{key}: {budget} is not below the model FLORA compresses ({describe(table.largest)}, less search.band): "
            "FLORA can only make it smaller; lower the budget"
        )


@dataclass(frozen=True)
class SearchBudget:
    """What a search's budget limits (the MACs, or the latency the table predicts) and its legal band."""

    table: CostTable  # the cost of every genome
    low: float
    high: float
    describe: Callable[[float], str]  # a cost in words
    unit: str  # the cost's name in the logs


def macs_budget(macs: CostTable, dense: int, budget: float, band: float) -> SearchBudget:
    """A budget in fractions of the dense model's MACs (``macs``: the space's)."""
    return SearchBudget(
        macs,
        (budget - band) * dense,
        budget * dense,
        lambda macs: f"{macs / dense:.4f} of the dense MACs",
        "MACs",
    )


def latency_budget_of(space: SearchSpace, latency: LatencyBudget, budget: float, band: float) -> SearchBudget:
    """A budget in the latency the table predicts (``budgets.latency_unit``)."""
    table = CostTable.from_space(space, latency.table.layer_ms, latency.table.dense_ms)
    return SearchBudget(table, *latency.band(budget, band), latency.describe, "ms")


def choose(
    top: list[Genome],
    tallies: dict[Genome, np.ndarray],
    ranks_of: Callable[[Genome], dict[str, int]],
    rest: SubnetScorer | None,
    held_out: SubnetScorer,
    macs: CostTable,
    latency: CostTable | None = None,
) -> pd.DataFrame:
    """The evolution's best candidates (``top``, best first), re-ranked on every choosing image (the evolution's and
    ``rest``'s, if any): the fittest there is chosen; each is also measured on the held-out images, which choose
    nothing."""
    rows = []
    for index, genome in enumerate(top):
        ranks = ranks_of(genome)
        choosing = tallies[genome] + (0 if rest is None else rest.tally(ranks))
        rows.append(
            {
                "search_rank": index + 1,
                "macs": round(macs.cost(genome)),
                **({} if latency is None else {"predicted_ms": round(latency.cost(genome), 4)}),
                "search_top1": Fitness.of(tallies[genome]).top1,
                "choosing_top1": Fitness.of(choosing).top1,
                "choosing_loss": Fitness.of(choosing).loss,
                "held_out_top1": Fitness.of(held_out.tally(ranks)).top1,
            }
        )
    best = max(range(len(rows)), key=lambda i: Fitness(rows[i]["choosing_top1"], rows[i]["choosing_loss"]))
    return pd.DataFrame(rows).assign(chosen=lambda t: t.index == best)


def run(context: StageContext) -> None:
    params, device, budget = context.params, context.device, context.budget
    cfg = params.search
    supernet, spec = load_model(context.input("model"))
    teacher, _ = load_model(context.input("teacher"))
    space = read_space(context.input("space"), {n: layer.max_rank for n, layer in lowrank_layers(supernet).items()})
    costs = trace_costs(supernet, input_shape(supernet))
    macs = CostTable.of_macs(space, costs)  # every subnet's MACs, whatever its budget limits
    dense = trace_costs(teacher, input_shape(teacher)).dense_macs  # budgets are fractions of the dense model's MACs
    base = context.stage.base
    model = "the dense model" if base == "dense" else f"{METHODS[base].short}'s model"  # what latency budgets are of
    limit = (
        macs_budget(macs, dense, budget, cfg.band)
        if context.stage.cost == "macs"
        else latency_budget_of(
            space, latency_budget(context.input("table"), device, params, model=model), budget, cfg.band
        )
    )
    table, low, high = limit.table, limit.low, limit.high
    check_reachable(table, low, high, budgets_key(context.stage.foreach), budget, limit.describe)

    splits = build_splits(params.data, data_config(supernet), supernet.num_classes)
    parts = val_parts(splits.val, cfg, params.seed)
    supernet.to(device)
    teacher.to(device).eval()
    evolution, rest, held_out = (
        SubnetScorer(
            supernet,
            teacher,
            make_loader(part, params.data.eval_batch_size, device, context.workers, splits.on_device),
            params,
            device,
        )
        for part in parts
    )
    log.info(
        "budget %s: %s in [%.6g, %.6g]; space spans [%.6g, %.6g]; fitness on %d val images, the best %d "
        "candidates chosen on %d more, the chosen one measured on %d held out",
        context.budget_name,
        limit.unit,
        low,
        high,
        table.smallest,
        table.largest,
        *(len(parts[0]), cfg.top_k, len(parts[1]), len(parts[2])),
    )

    settings = EvolutionSettings(
        population=cfg.population,
        top_k=cfg.top_k,
        mutations=cfg.mutations,
        mutation_prob=cfg.mutation_prob,
        crossovers=cfg.crossovers,
        generations=cfg.generations,
    )
    weights = [sampling_probabilities(block, params.supernet.sampling) for block in space.blocks]
    operators = Operators.from_space(space, weights)  # mutation by the supernet's sampling, crossover per layer
    bar = progress(desc=f"search {context.budget_name}", total=cfg.generations)

    tallies: dict[Genome, np.ndarray] = {}

    def fitness(genome: Genome) -> Fitness:
        tallies[genome] = evolution.tally(space.ranks(genome_choices(space, genome)))
        return Fitness.of(tallies[genome])

    def report(row: dict) -> None:
        bar.update()
        bar.set_postfix(top1=f"{row['best'].top1:.4f}", evaluations=row["evaluations"], refresh=False)
        log.info(
            "generation %d: best val top-1 %.2f%% (loss %.4f, %s), %d evaluated",
            row["generation"],
            100 * row["best"].top1,
            row["best"].loss,
            limit.describe(row["best_cost"]),
            row["evaluations"],
        )

    search_started = time.perf_counter()
    try:
        rng = np.random.default_rng(params.seed)
        result = evolve(table, fitness, low, high, settings, rng, report, operators)
    except ValueError as error:
        raise UserError(f"{budgets_key(context.stage.foreach)}: {budget}: {error}") from None
    finally:
        bar.close()
    search_seconds = time.perf_counter() - search_started
    candidates = choose(
        result.top,
        tallies,
        lambda g: space.ranks(genome_choices(space, g)),
        rest if len(parts[1]) else None,
        held_out,
        macs,
        None if table is macs else table,
    )
    set_ranks(supernet, {})
    chosen = candidates[candidates["chosen"]].iloc[0]
    genome = result.top[int(chosen["search_rank"]) - 1]
    ranks = space.ranks(genome_choices(space, genome))
    history = pd.DataFrame(
        [
            {
                "generation": row["generation"],
                "evaluations": row["evaluations"],
                "best_top1": row["best"].top1,
                "best_loss": row["best"].loss,
                "top_k_mean_top1": float(np.mean([score.top1 for score in row["top_k"]])),
                "best_macs": round(macs.cost(row["best_genome"])),
            }
            for row in result.history
        ],
        columns=HISTORY_COLUMNS,
    )
    if not is_first():
        return
    write_rank_config(context.output("ranks"), RankConfig(model=spec.model, ranks=ranks))
    write_csv(context.output("history"), history)
    write_csv(context.output("candidates"), candidates)
    write_json(
        context.output("metrics"),
        {
            "budget": budget,
            "top1": float(chosen["held_out_top1"]),  # val top-1, supernet weights, on images that did not choose it
            "held_out_images": len(parts[2]),
            "search_top1": float(chosen["search_top1"]),  # on the evolution's images: optimistic (it chose)
            "choosing_top1": float(chosen["choosing_top1"]),  # on every image that chose it
            "choosing_images": len(parts[0]) + len(parts[1]),
            "macs": int(chosen["macs"]),
            "macs_fraction": round(int(chosen["macs"]) / dense, 6),
            **(
                {"predicted_ms": float(chosen["predicted_ms"]), "limit_ms": round(high, 6)}
                if "predicted_ms" in candidates
                else {}
            ),
            "params": costs.params(ranks),
            "evaluations": result.evaluations,
            "evaluations_per_second": round(result.evaluations / search_seconds, 2),
            "seconds": context.seconds(),
        },
    )
    log.info(
        "chosen subnet (search's #%d): val top-1 %.2f%% on %d held-out images (%.2f%% on the evolution's, %.2f%% "
        "on every image that chose it) at %.3f of dense MACs, %s (%d evaluations, %.1f/s)",
        chosen["search_rank"],
        100 * chosen["held_out_top1"],
        len(parts[2]),
        100 * chosen["search_top1"],
        100 * chosen["choosing_top1"],
        chosen["macs"] / dense,
        limit.describe(table.cost(genome)),
        result.evaluations,
        result.evaluations / search_seconds,
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main("search", __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    run_as_program(main)
