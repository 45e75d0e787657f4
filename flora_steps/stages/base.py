"""Fine-tune a pruning method's model at its base budget: the finished model FLORA compresses further.

    python -m flora_steps.stages.base --params params.yaml --base slim
    python -m flora_steps.stages.base --params params.yaml --base ofb

The paper combines FLORA with finished compressed models, so FLORA's base is the pruning
method's model at its base budget after fine-tuning, not its search's raw output:
ViT-Slim's searched model sliced at `budgets.slim_base` (as `retrain --method slim`
slices it), or OFB's model searched at `budgets.ofb_base` (one of `budgets.ofb`). It is
fine-tuned with distillation from the dense model like `retrain` fine-tunes, for
`retrain.base_epochs` with the first seed of `retrain.seeds`. The pruning method's own
models then fine-tune for `retrain.base_epochs + supernet.epochs + retrain.epochs`
(`retrain.slim_epochs`, `retrain.ofb_epochs`: null), as much as FLORA on this base
gets in all (a budget of FLORA at or above this model's MACs stops its `search` with
one line). Checkpoints every epoch and resumes after a kill. Writes
`results/on_<base>/base/`:

- `model.safetensors` + `model.json`: the fine-tuned model (a plain, smaller timm model)
- `history.csv`: per epoch, train loss, lr, steps, images, val top-1 and loss
- `metrics.json`: its MACs (`torch.utils.flop_counter`; for ViT-Slim checked against the
  cost model, and its keep share), parameters, test top-1 before and after fine-tuning,
  and its training: the search's and its own
"""

from __future__ import annotations

import logging

import pandas as pd

from ..core import count_macs, trace_costs
from ..errors import UserError
from ..pipeline.methods import BASES, METHODS
from ..pruning.slim import slice_to_budget
from ..runtime.artifacts import load_model, read_json, read_masks, save_model, write_csv, write_json
from ..runtime.context import StageContext, run_as_program, stage_main
from ..runtime.data import build_splits, make_loader
from ..runtime.distributed import is_first
from ..runtime.models import data_config, input_shape
from ..runtime.training import HISTORY_COLUMNS, distillation, evaluate, finish, fit, frozen_teacher, validation

log = logging.getLogger(__name__)
HISTORY = [*HISTORY_COLUMNS, "val_top1", "val_loss"]


def run(context: StageContext) -> None:
    params, device, base = context.params, context.device, BASES[context.stage.base]
    budget = getattr(params.budgets, base.budget)
    teacher, _ = load_model(context.input("teacher"))
    shape = input_shape(teacher)
    dense = trace_costs(teacher, shape)
    model, spec = load_model(context.input("model"))
    sliced = {}
    if "masks" in context.stage.inputs:  # ViT-Slim: slice its searched model at the base budget
        try:
            model, structure, keep, predicted = slice_to_budget(
                model, read_masks(context.input("masks")), dense, budget * dense.dense_macs
            )
        except ValueError as error:
            raise UserError(f"budgets.{base.budget}: {budget}: {error}") from None
        spec, sliced = spec.model_copy(update={"pruned": structure}), {"keep": round(keep, 6)}
    macs = count_macs(model, shape)
    if sliced and macs != predicted:
        raise RuntimeError(f"MACs mismatch: the cost model says {predicted}, flop_counter counts {macs}")
    fraction = macs / dense.dense_macs
    cfg, epochs, seed = params.retrain, params.retrain.base_epochs, params.retrain.seeds[0]
    splits = build_splits(params.data, data_config(teacher), teacher.num_classes)
    model.to(device)
    teacher = frozen_teacher(teacher, device, params.compute.teacher_cache)
    batch, amp = params.data.eval_batch_size, params.compute.amp
    test_loader = make_loader(splits.test, batch, device, context.workers, splits.on_device)
    val_loader = make_loader(splits.val, batch, device, context.workers, splits.on_device)
    before = evaluate(model, test_loader, device, amp, "test")["top1"]
    log.info(
        "%s's model at %s: %.3f of dense MACs, test top-1 %.2f%%; fine-tuning %d epochs (seed %d)",
        METHODS[base.name].short,
        budget,
        fraction,
        100 * before,
        epochs,
        seed,
    )

    validate = validation(val_loader, device, amp)
    history = fit(
        model,
        splits.train,
        distillation(teacher, cfg.temperature, cfg.hard_label_weight),
        validate,
        cfg,
        section="retrain",
        epochs=epochs,
        on_device=splits.on_device,
        **context.fit_arguments(seed, epochs),
    )
    after = evaluate(model, test_loader, device, amp, "test")["top1"]
    log.info("test top-1 %.2f%% after fine-tuning", 100 * after)
    if not is_first():
        return
    searched = read_json(context.input("inherited"), "metrics of the pruning method's search")
    steps, images = (history[-1]["steps"], history[-1]["images"]) if history else (0, 0)
    save_model(context.output("model"), model.cpu(), spec)
    write_csv(context.output("history"), pd.DataFrame(history, columns=HISTORY))
    write_json(
        context.output("metrics"),
        {
            "budget": budget,
            "macs": macs,
            "macs_fraction": round(fraction, 6),
            **sliced,
            "params": sum(p.numel() for p in model.parameters()),
            "top1_before_finetune": before,
            "top1": after,
            "finetune_epochs": epochs,
            "finetune_steps": steps,
            "train_steps": int(searched["train_steps"]) + steps,  # what FLORA on this model inherits
            "train_images": int(searched["train_images"]) + images,
            "seconds": context.seconds(),
        },
    )
    finish(context.out)


def main(argv: list[str] | None = None) -> int:
    return stage_main("base", __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    run_as_program(main)
