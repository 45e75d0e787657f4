"""Fine-tune a compressed model with distillation, once per seed, and evaluate it: FLORA, a baseline, ViT-Slim or OFB.

    python -m flora_steps.stages.retrain --params params.yaml --method flora --budget 0.5
    python -m flora_steps.stages.retrain --params params.yaml --method control --budget 0.5
    python -m flora_steps.stages.retrain --params params.yaml --method uniform --budget 0.5
    python -m flora_steps.stages.retrain --params params.yaml --method slim --budget 0.5
    python -m flora_steps.stages.retrain --params params.yaml --method flora --base slim --budget 0.4
    python -m flora_steps.stages.retrain --params params.yaml --method ofb --budget 0.3
    python -m flora_steps.stages.retrain --params params.yaml --method flora --base ofb --budget 0.26

Five kinds of compressed model, so that a comparison isolates one thing:

- `flora`: the subnet `search` found for the budget, with the supernet's weights,
  fine-tuned for `retrain.epochs`.
- `control`: one rank ratio on every target layer (the largest whose MACs fit the
  budget), with the supernet's weights, fine-tuned exactly like FLORA. FLORA vs the
  control is what rank allocation buys: same supernet, same fine-tuning.
- `uniform`: the same uniform ranks as the control, from the SVD of the base model
  (`decompose`), fine-tuned for `retrain.uniform_epochs` (null: `supernet.epochs +
  retrain.epochs`, as many training images as FLORA's supernet plus its fine-tuning).
- `slim`: ViT-Slim's model (`slim` stage: masks and weights searched together),
  physically sliced at the largest keep share whose MACs fit the budget
  (`flora_steps.pruning.slim`), fine-tuned for `retrain.slim_epochs` (null:
  `retrain.base_epochs + supernet.epochs + retrain.epochs`, the training FLORA on a
  ViT-Slim model gets after the same search); it inherits the search's training.
- `ofb`: OFB's model searched at the budget (`ofb` stage, already sliced), fine-tuned
  for `retrain.ofb_epochs` (null: `retrain.base_epochs + supernet.epochs +
  retrain.epochs`, the training FLORA on an OFB model gets after the same search); it
  inherits the search's training.

`--base slim` runs FLORA on ViT-Slim's model at `budgets.slim_base`, fine-tuned for
`retrain.base_epochs` (`base` stage), instead of the dense one, with its own
decompose, filter, supernet and search stages under `results/on_slim/`; it inherits
ViT-Slim's search and that fine-tuning too. `--base ofb` does the same on OFB's model
searched at `budgets.ofb_base`, under `results/on_ofb/`. ViT-Slim's and OFB's own
models fine-tune for `retrain.base_epochs + supernet.epochs + retrain.epochs` (their
keys null): the training FLORA on their model has in all. Budgets are fractions of
the dense model's MACs, but for the methods under latency budgets (`flora_latency`,
`control_latency`, `uniform_latency`, `slim_latency`, each like its namesake): there
the latency table (`latency_table`) predicts the cost, of ranks or of ViT-Slim's widths,
and the method's own list (`budgets.latency` for FLORA and its control, `budgets.uniform_latency`,
`budgets.slim_latency`) limits it.

A factorised layer becomes two `nn.Linear` (in -> r, r -> out), a layer at full rank
or at/above break-even one dense `nn.Linear`. Fine-tuning distils from the dense base
model (AdamW, warmup + cosine) once per seed of `retrain.seeds`, from the same start;
each seed keeps a checkpoint every epoch, and a killed run resumes (finished seeds are
not trained again). Runs on several processes with `torchrun` (DDP, `compute.processes`),
each evaluating its share of the val and test images. Writes `results/retrain/<method>/<budget>/`:

- `model.safetensors` + `model.json`: the model of the first seed (plain timm model
  plus factorised pairs; see docs/using-a-model.md for loading it with torch and timm only)
- `ranks.json`: its rank config (the same for every seed)
- `history.csv`: per seed and epoch, train loss, lr, optimizer steps and images so far,
  val top-1 and loss
- `predictions.csv`: per seed, every test image's label and predicted class (the
  report's paired statistics compare methods on the same images)
- `predictions_inherited.csv`: the same for the model as fine-tuning starts (the
  supernet's, the search's or the SVD's weights): the report's "inherited" protocol
- `metrics.json`: test top-1 (mean and std over seeds), top-5 and val top-1 (means),
  each seed's test and val numbers, top-1 and top-5 before fine-tuning, MACs (checked against
  `torch.utils.flop_counter`), parameters, and the training each seed had: its own
  optimizer steps and images, and those inherited from the supernet

Inference latency is measured by the `latency` stage, for every model side by side.
"""

from __future__ import annotations

import copy
import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
from torch import nn

from ..core import CostModel, RankConfig, count_macs, lowrank_layers, materialise, trace_costs
from ..core.uniform import fit_uniform_ratio
from ..errors import UserError
from ..pipeline.methods import ABLATION_METHODS, BASES, RETRAINED, Method
from ..pipeline.schema import budgets_key
from ..pruning.slim import slice_to_budget
from ..pruning.structure import block_heads, part_widths
from ..runtime.artifacts import (
    ModelSpec,
    load_model,
    read_json,
    read_masks,
    read_rank_config,
    save_model,
    write_csv,
    write_json,
    write_rank_config,
)
from ..runtime.context import StageContext, run_as_program, stage_main
from ..runtime.data import build_splits, make_loader
from ..runtime.distributed import is_first
from ..runtime.latency import latency_budget
from ..runtime.models import data_config, input_shape
from ..runtime.training import (
    HISTORY_COLUMNS,
    PREDICTION_COLUMNS,
    distillation,
    evaluate,
    finish,
    fit,
    frozen_teacher,
    prediction_table,
    validation,
)

log = logging.getLogger(__name__)
HISTORY = ["seed", *HISTORY_COLUMNS, "val_top1", "val_loss"]


@dataclass(frozen=True)
class Start:
    """A compressed model before fine-tuning: the model, its rank config, its spec, how it was made, its MACs."""

    model: nn.Module
    ranks: dict[str, int]
    spec: ModelSpec
    origin: dict
    macs: int


def factorised_layers(model: nn.Module, ranks: dict[str, int]) -> dict[str, int]:
    """The layers of ``ranks`` that ``materialise`` made a factorised pair (the others became dense)."""
    return {name: rank for name, rank in ranks.items() if isinstance(model.get_submodule(name), nn.Sequential)}


def searched_ranks(context: StageContext, source: nn.Module, spec: ModelSpec, costs: CostModel, dense: CostModel):
    """The rank config the method's search found for the budget."""
    config = read_rank_config(context.input("ranks"))
    if config.model != spec.model:
        raise UserError(f"{context.input('ranks')}: for model {config.model}, not {spec.model}")
    return config.ranks, {}


def uniform_ranks(context: StageContext, source: nn.Module, spec: ModelSpec, costs: CostModel, dense: CostModel):
    """One rank ratio on every target layer: the largest whose MACs (``costs`` prices the source) or, for a latency
    method, whose latency the table predicts fit the budget."""
    budget, multiple = context.budget, context.params.retrain.uniform_rank_multiple
    limit, price = budget * dense.dense_macs, None
    allowed = None
    if context.stage.cost == "latency":
        latency = latency_budget(context.input("table"), context.device, context.params)
        # only ratios whose ranks the table timed: off its grid a pair can run slower than both timed neighbours,
        # even than the dense layer (rank 44 of a 64-wide layer on one CPU thread), which interpolation misses
        limit, price, allowed = latency.limit(budget), latency.table.predict_ms, latency.table.timed
    try:
        ratio, ranks = fit_uniform_ratio(costs, list(lowrank_layers(source)), limit, multiple, price, allowed)
    except ValueError as error:
        raise UserError(f"{budgets_key(context.stage.foreach)}: {budget}: {error}") from None
    return ranks, {"rank_ratio": round(ratio, 6)} | ({"predicted_ms": round(price(ranks), 4)} if price else {})


def factorised(choose) -> Callable[[StageContext, Method, CostModel], Start]:
    """A builder that materialises the source model with the ranks ``choose`` picks."""

    def build(context: StageContext, method: Method, dense: CostModel) -> Start:
        source, spec = load_model(context.input("model"))
        costs = trace_costs(source, input_shape(source))  # the base FLORA compresses: the dense model or a sliced one
        ranks, choice = choose(context, source, spec, costs, dense)
        try:
            model = materialise(source, ranks)
        except (KeyError, ValueError) as error:
            raise UserError(f"rank config for budget {context.budget}: {error}") from None
        # the source's architecture (its pruned blocks and embedding width) with plain factorised pairs
        plain = spec.model_copy(update={"lowrank": {}, "factorised": factorised_layers(model, ranks)})
        return Start(model, ranks, plain, {"source": method.origin, **choice}, costs.macs(ranks))

    return build


def sliced(context: StageContext, method: Method, dense: CostModel) -> Start:
    """The searched model sliced by its masks at the largest keep share whose MACs or, for a latency method, whose
    latency the table predicts from its widths fit the budget."""
    source, spec = load_model(context.input("model"))
    heads = block_heads(source)  # before slicing
    limit, widths = context.budget * dense.dense_macs, None
    if context.stage.cost == "latency":
        latency = latency_budget(context.input("table"), context.device, context.params, widths=True)
        limit, widths = latency.limit(context.budget), latency.table
    try:
        model, structure, keep, macs = slice_to_budget(
            source, read_masks(context.input("masks")), dense, limit, latency=widths
        )
    except ValueError as error:
        raise UserError(f"{budgets_key(context.stage.foreach)}: {context.budget}: {error}") from None
    origin = {"source": method.origin, "keep": round(keep, 6)}
    if widths is not None:
        origin["predicted_ms"] = round(widths.predict_ms(part_widths(structure, heads)), 4)
    return Start(model, {}, spec.model_copy(update={"pruned": structure}), origin, macs)


def as_searched(context: StageContext, method: Method, dense: CostModel) -> Start:
    """The model its search left at the budget (already sliced)."""
    source, spec = load_model(context.input("model"))
    macs = trace_costs(source, input_shape(source)).dense_macs
    return Start(source, {}, spec, {"source": method.origin}, macs)


#: How each method's model is built (``methods.Method.build``).
BUILDERS: dict[str, Callable[[StageContext, Method, CostModel], Start]] = {
    "searched_ranks": factorised(searched_ranks),
    "uniform_ranks": factorised(uniform_ranks),
    "sliced": sliced,
    "as_searched": as_searched,
}


def method_of(context: StageContext) -> Method:
    """The method record of this run's stage (``--method``, ``--base`` and ``--ablation``)."""
    stage = context.stage
    return next(
        m
        for m in (*RETRAINED.values(), *ABLATION_METHODS.values())
        if m.option == context.method and m.base == stage.base and m.ablation == stage.ablation
    )


def fine_tuning_epochs(context: StageContext, method: Method) -> int:
    """Epochs of each seed's fine-tuning: ``retrain.epochs``, or the method's own key (``Method.epochs``),
    whose ``null`` gives ``supernet.epochs + retrain.epochs``: as many training images as FLORA's supernet
    plus its fine-tuning (the SVD uniform baseline); for a model from a pruning method's search (FLORA also runs
    on its models), plus ``retrain.base_epochs``: as much as FLORA on its fine-tuned model gets after the same
    search."""
    cfg = context.params.retrain
    if method.epochs is None:
        return cfg.epochs
    chosen = getattr(cfg, method.epochs.removeprefix("retrain."))
    if chosen is not None:
        return chosen
    return context.params.supernet.epochs + cfg.epochs + (cfg.base_epochs if method.source in BASES else 0)


def inherited_training(context: StageContext) -> dict[str, int]:
    """Optimizer steps and images of the training a model inherits (``Method.inherits``: the supernet's, or a
    pruning method's search), and on a compressed base the training that base had."""
    steps, images = 0, 0
    for key in ("inherited", "base_training"):
        if key in context.stage.inputs:
            trained = read_json(context.input(key), "metrics of the training the model inherits")
            steps, images = steps + int(trained["train_steps"]), images + int(trained["train_images"])
    return {"steps": steps, "images": images}


def run(context: StageContext) -> None:
    params, device, method = context.params, context.device, context.method
    record = method_of(context)
    teacher, _ = load_model(context.input("teacher"))
    shape = input_shape(teacher)
    costs = trace_costs(teacher, shape)
    built = BUILDERS[record.build](context, record, costs)
    start, ranks, spec, origin, macs = built.model, built.ranks, built.spec, built.origin, built.macs
    counted = count_macs(start, shape)
    if counted != macs:
        raise RuntimeError(f"MACs mismatch: the cost model says {macs}, flop_counter counts {counted}")
    cfg, epochs = params.retrain, fine_tuning_epochs(context, record)
    log.info(
        "%s at budget %s: %d factorised layers, %.3f of dense MACs (%d), %d parameters; %d epochs for each of seeds %s",
        method,
        context.budget_name,
        len(spec.factorised),
        macs / costs.dense_macs,
        macs,
        sum(p.numel() for p in start.parameters()),
        epochs,
        params.retrain.seeds,
    )

    splits = build_splits(params.data, data_config(teacher), teacher.num_classes)
    start.to(device)
    teacher = frozen_teacher(teacher, device, params.compute.teacher_cache)
    batch, amp = params.data.eval_batch_size, params.compute.amp
    test_loader = make_loader(splits.test, batch, device, context.workers, splits.on_device)
    val_loader = make_loader(splits.val, batch, device, context.workers, splits.on_device)
    before = evaluate(start, test_loader, device, amp, "test", keep_predictions=True)
    log.info("test top-1 before fine-tuning %.2f%%", 100 * before["top1"])

    validate = validation(val_loader, device, amp)
    loss = distillation(teacher, cfg.temperature, cfg.hard_label_weight)
    runs, histories, predictions = [], [], []
    for seed in params.retrain.seeds:
        model = copy.deepcopy(start)
        history = fit(
            model,
            splits.train,
            loss,
            validate,
            cfg,
            section="retrain",
            epochs=epochs,
            on_device=splits.on_device,
            **context.fit_arguments(seed, epochs),
        )
        test = evaluate(model, test_loader, device, amp, "test", keep_predictions=True)
        val_top1 = history[-1]["val_top1"] if history else validate(model)["val_top1"]
        log.info("seed %d: test top-1 %.2f%%, val top-1 %.2f%%", seed, 100 * test["top1"], 100 * val_top1)
        runs.append(
            {
                "seed": seed,
                "top1": test["top1"],
                "top5": test["top5"],
                "test_loss": test["loss"],
                "val_top1": val_top1,
                "steps": history[-1]["steps"] if history else 0,
                "images": history[-1]["images"] if history else 0,
            }
        )
        histories.append(pd.DataFrame(history, columns=HISTORY[1:]).assign(seed=seed)[HISTORY])
        predictions.append(prediction_table(test).assign(seed=seed))
        if seed == params.retrain.seeds[0] and is_first():
            save_model(context.output("model"), model.cpu(), spec)

    top1 = [r["top1"] for r in runs]
    inherited = inherited_training(context)
    metrics = {
        "method": method,
        "budget": context.budget,
        "top1": statistics.fmean(top1),
        "top1_std": statistics.stdev(top1) if len(top1) > 1 else None,
        "top5": statistics.fmean(r["top5"] for r in runs),
        "val_top1": statistics.fmean(r["val_top1"] for r in runs),
        "top1_before_finetune": before["top1"],
        "top5_before_finetune": before["top5"],
        "seeds": runs,
        "macs": macs,
        "macs_fraction": round(macs / costs.dense_macs, 6),
        "params": sum(p.numel() for p in start.parameters()),
        **origin,
        "training": {
            "epochs": epochs,
            "steps": runs[0]["steps"],
            "images": runs[0]["images"],
            "inherited_steps": inherited["steps"],
            "inherited_images": inherited["images"],
            "total_steps": runs[0]["steps"] + inherited["steps"],
            "total_images": runs[0]["images"] + inherited["images"],
        },
        "seconds": context.seconds(),
    }
    if not is_first():
        return
    write_rank_config(context.output("ranks"), RankConfig(model=spec.model, ranks=ranks))
    write_csv(context.output("history"), pd.concat(histories, ignore_index=True))
    write_csv(context.output("predictions"), pd.concat(predictions, ignore_index=True)[["seed", *PREDICTION_COLUMNS]])
    write_csv(context.output("inherited_predictions"), prediction_table(before)[PREDICTION_COLUMNS])
    write_json(context.output("metrics"), metrics)
    finish(context.out)
    log.info(
        "test top-1 %.2f%% ± %.2f (mean ± std over %d seeds)",
        100 * metrics["top1"],
        100 * (metrics["top1_std"] or 0.0),
        len(runs),
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main("retrain", __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    run_as_program(main)
