"""Slice ViT-Slim's searched model at `budgets.slim_base`: the base model FLORA compresses further.

    python -m flora_steps.stages.slim_base --params params.yaml

The `slim` stage's model and masks, sliced like `retrain --method slim` slices them
(the largest keep share of each mask type whose MACs fit the budget, mask values
folded into the weights), but not fine-tuned: FLORA's supernet, trained on this model,
is its fine-tuning, so FLORA on ViT-Slim has the training of ViT-Slim's own models
(`retrain.slim_epochs: null`). Writes `results/slim_base/`:

- `model.safetensors` + `model.json`: the sliced model (a plain, smaller timm model)
- `metrics.json`: its MACs (checked against `torch.utils.flop_counter`), parameters,
  keep share, test top-1 as sliced, and the training it inherits (ViT-Slim's search)
"""

from __future__ import annotations

import logging

from ..core import count_macs, trace_costs
from ..errors import UserError
from ..pruning.slim import slice_to_budget
from ..runtime.artifacts import load_model, read_json, read_masks, save_model, write_json
from ..runtime.context import StageContext, run_as_program, stage_main
from ..runtime.data import build_splits, make_loader
from ..runtime.models import data_config, input_shape
from ..runtime.training import evaluate

log = logging.getLogger(__name__)


def run(context: StageContext) -> None:
    params, device = context.params, context.device
    budget = params.budgets.slim_base
    searched, spec = load_model(context.input("model"))
    shape = input_shape(searched)
    costs = trace_costs(searched, shape)
    try:
        model, structure, keep, macs = slice_to_budget(
            searched, read_masks(context.input("masks")), costs, budget * costs.dense_macs
        )
    except ValueError as error:
        raise UserError(f"budgets.slim_base: {budget}: {error}") from None
    counted = count_macs(model, shape)
    if counted != macs:
        raise RuntimeError(f"MACs mismatch: the cost model says {macs}, flop_counter counts {counted}")

    splits = build_splits(params.data, data_config(model), model.num_classes)
    loader = make_loader(splits.test, params.data.eval_batch_size, device, context.workers, splits.on_device)
    test = evaluate(model.to(device), loader, device, params.compute.amp, "test")
    log.info(
        "keep share %.4f: %.3f of dense MACs (%d), test top-1 %.2f%% as sliced",
        keep,
        macs / costs.dense_macs,
        macs,
        100 * test["top1"],
    )
    searched_for = read_json(context.input("inherited"), "metrics of ViT-Slim's search")
    save_model(context.output("model"), model.cpu(), spec.model_copy(update={"pruned": structure}))
    write_json(
        context.output("metrics"),
        {
            "budget": budget,
            "keep": round(keep, 6),
            "macs": macs,
            "macs_fraction": round(macs / costs.dense_macs, 6),
            "params": sum(p.numel() for p in model.parameters()),
            "top1": test["top1"],
            "train_steps": int(searched_for["train_steps"]),
            "train_images": int(searched_for["train_images"]),
            "seconds": context.seconds(),
        },
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main("slim_base", __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    run_as_program(main)
