"""Fine-tune a compressed model with distillation and evaluate it: a FLORA subnet or the uniform baseline.

    python -m flora_steps.retrain --params params.yaml --method flora --budget 0.5
    python -m flora_steps.retrain --params params.yaml --method uniform --budget 0.5

`flora`: the subnet `search` found for the budget, materialised from the supernet's
weights. `uniform`: one rank ratio on every target layer, the largest whose MACs
fit the budget, materialised from the SVD of the base model (`decompose`). Either
way a factorised layer becomes two `nn.Linear` (in -> r, r -> out) and a layer at
full rank or at/above break-even one dense `nn.Linear`. Both are fine-tuned
identically (`retrain` params: distillation from the dense base model, AdamW,
warmup + cosine; a checkpoint every epoch, resumed after a kill). Writes
`results/retrain/<method>/<budget>/`:

- `model.safetensors` + `model.json`: the compressed model (plain timm model plus
  factorised pairs; see the README for loading it with torch and timm only)
- `ranks.json`: its rank config
- `history.csv`: per epoch, train loss, lr, val top-1 and loss
- `metrics.json`: test top-1/top-5 and loss (and top-1 before fine-tuning), val
  top-1, MACs (checked against `torch.utils.flop_counter`), parameters

Inference latency is measured by the `latency` stage, for every model side by side.
"""

from __future__ import annotations

import logging

import pandas as pd
from torch import nn

from .artifacts import (
    ModelSpec,
    load_model,
    read_rank_config,
    save_model,
    write_csv,
    write_json,
    write_rank_config,
)
from .core import CostModel, RankConfig, count_macs, lowrank_layers, materialise, trace_costs
from .core.uniform import fit_uniform_ratio
from .data import build_splits, make_loader
from .errors import UserError
from .models import data_config, input_shape
from .stage import StageContext, stage_main
from .training import distillation, evaluate, finish, fit

log = logging.getLogger(__name__)
HISTORY_COLUMNS = ["epoch", "train_loss", "lr", "val_top1", "val_loss"]


def factorised_layers(model: nn.Module, ranks: dict[str, int]) -> dict[str, int]:
    """The layers of ``ranks`` that ``materialise`` made a factorised pair (the others became dense)."""
    return {name: rank for name, rank in ranks.items() if isinstance(model.get_submodule(name), nn.Sequential)}


def compressed_model(context: StageContext, costs: CostModel) -> tuple[nn.Module, dict[str, int], ModelSpec, dict]:
    """The materialised model, its rank config, its spec and how its ranks were chosen.

    ``costs`` is the base model's cost model (the uniform chooser prices ranks with it).
    """
    params, budget = context.params, context.budget
    source, spec = load_model(context.input("model"))
    if context.method == "flora":
        config = read_rank_config(context.input("ranks"))
        if config.model != spec.model:
            raise UserError(f"{context.input('ranks')}: for model {config.model}, not {spec.model}")
        ranks, origin = config.ranks, {"source": "supernet weights, searched ranks"}
    else:
        try:
            ratio, ranks = fit_uniform_ratio(
                costs, list(lowrank_layers(source)), budget * costs.dense_macs, params.retrain.uniform_rank_multiple
            )
        except ValueError as error:
            raise UserError(f"budgets.uniform: {budget}: {error}") from None
        origin = {"source": "SVD of the base model, uniform rank ratio", "rank_ratio": round(ratio, 6)}
    try:
        model = materialise(source, ranks)
    except (KeyError, ValueError) as error:
        raise UserError(f"rank config for budget {budget}: {error}") from None
    plain = ModelSpec(model=spec.model, model_kwargs=spec.model_kwargs, factorised=factorised_layers(model, ranks))
    return model, ranks, plain, origin


def run(context: StageContext) -> None:
    params, device, method = context.params, context.device, context.method
    teacher, _ = load_model(context.input("teacher"))
    shape = input_shape(teacher)
    costs = trace_costs(teacher, shape)
    model, ranks, spec, origin = compressed_model(context, costs)
    macs = costs.macs(ranks)
    counted = count_macs(model, shape)
    if counted != macs:
        raise RuntimeError(f"MACs mismatch: the cost model says {macs}, flop_counter counts {counted}")
    log.info(
        "%s at budget %s: %d factorised layers, %.3f of dense MACs (%d), %d parameters",
        method,
        context.budget_name,
        len(spec.factorised),
        macs / costs.dense_macs,
        macs,
        sum(p.numel() for p in model.parameters()),
    )

    splits = build_splits(params.data, data_config(teacher), teacher.num_classes)
    model.to(device)
    teacher.to(device).eval().requires_grad_(False)
    workers, batch, amp = params.compute.workers, params.data.eval_batch_size, params.compute.amp
    test_loader = make_loader(splits.test, batch, False, workers)
    val_loader = make_loader(splits.val, batch, False, workers)
    before = evaluate(model, test_loader, device, amp, "test")
    log.info("test top-1 before fine-tuning %.2f%%", 100 * before["top1"])

    def validate(network) -> dict[str, float]:
        val = evaluate(network, val_loader, device, amp, "val")
        return {"val_top1": val["top1"], "val_loss": val["loss"]}

    cfg = params.retrain
    loss = distillation(teacher, cfg.temperature, cfg.hard_label_weight)
    history = fit(model, splits.train, loss, validate, cfg, context, "retrain")

    test = evaluate(model, test_loader, device, amp, "test")
    # the last epoch already evaluated the final weights on the val split
    val_top1 = history[-1]["val_top1"] if history else validate(model)["val_top1"]
    model.cpu()
    metrics = {
        "method": method,
        "budget": context.budget,
        "top1": test["top1"],
        "top5": test["top5"],
        "test_loss": test["loss"],
        "top1_before_finetune": before["top1"],
        "val_top1": val_top1,
        "macs": macs,
        "macs_fraction": round(macs / costs.dense_macs, 6),
        "params": sum(p.numel() for p in model.parameters()),
        **origin,
        "seconds": context.seconds(),
    }
    save_model(context.output("model"), model, spec)
    write_rank_config(context.output("ranks"), RankConfig(model=spec.model, ranks=ranks))
    write_csv(context.output("history"), pd.DataFrame(history, columns=HISTORY_COLUMNS))
    write_json(context.output("metrics"), metrics)
    finish(context)
    log.info("test top-1 %.2f%%, val top-1 %.2f%%", 100 * test["top1"], 100 * val_top1)


def main(argv: list[str] | None = None) -> int:
    return stage_main("retrain", __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
