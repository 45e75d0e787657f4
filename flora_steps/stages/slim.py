"""Search ViT-Slim's masks on the base model: soft masks and weights trained together, distilled, L1-sparse.

    python -m flora_steps.stages.slim --params params.yaml

ViT-Slim (Chavan et al., CVPR 2022) puts a learnable mask, initialised to 1, on every
attention head channel (shared by q, k and v) and every MLP hidden unit of the base
model (`flora_steps.pruning.slim`), and trains masks and weights with distillation from
the base model plus an L1 term on the masks, one weight per dimension type
(`slim.attention_weight`, `slim.mlp_weight`). AdamW with a constant learning rate as in
the released code (`slim.min_lr` = `slim.lr`); the masks in their own group
(`slim.mask_lr`, decayed by `slim.mask_weight_decay` as the release decays everything).
The released mask rate is for a search of `slim.released_steps` optimizer steps; a
shorter search multiplies it by `released_steps / its steps` (null: no rescaling), as
OFB's search rates are, so that the masks can travel as far as in the release. Gradient
clipping; DDP under `torchrun`, where the L1 term is added once per step (the released
code divides it by the number of processes). Checkpoints every epoch and resumes
after a kill. The `retrain` stage's `slim` method then slices this model at each
budget of `budgets.slim` and fine-tunes it. Writes `results/slim/`:

- `model.safetensors` + `model.json`: the base model with the searched weights (plain timm)
- `masks.safetensors`: every mask's values, one tensor per `<block>/<type>`
- `history.csv`: per epoch, train loss, lr, steps, images, val top-1 of the masked
  model, and the share of attention and MLP masks below 0.01
- `metrics.json`: final val top-1, the mask shares, the mask rate's rescaling, optimizer
  steps and training images
"""

from __future__ import annotations

import logging

import pandas as pd
import torch
from torch import nn

from ..errors import UserError
from ..pruning.slim import ATTENTION, MLP, attach_masks, detach_masks, sparsity_loss
from ..runtime.artifacts import load_model, save_masks, save_model, write_csv, write_json
from ..runtime.context import StageContext, run_as_program, stage_main
from ..runtime.data import build_splits, make_loader
from ..runtime.distributed import is_first
from ..runtime.models import data_config
from ..runtime.training import (
    HISTORY_COLUMNS,
    GroupOptions,
    distillation,
    evaluate,
    finish,
    fit,
    frozen_teacher,
    rate_multiple,
)

log = logging.getLogger(__name__)
HISTORY = [*HISTORY_COLUMNS, "val_top1", "attention_below_0.01", "mlp_below_0.01"]


def share_below(masks: dict[tuple[str, str], torch.Tensor], kind: str, level: float = 0.01) -> float:
    """The share of ``kind``'s mask values whose magnitude is below ``level``."""
    values = torch.cat([mask.detach().abs().flatten() for (_, k), mask in masks.items() if k == kind])
    return float((values < level).float().mean())


def run(context: StageContext) -> None:
    params, cfg, device = context.params, context.params.slim, context.device
    model, spec = load_model(context.input("model"))
    teacher, _ = load_model(context.input("teacher"))
    try:
        masks = attach_masks(model)
    except ValueError as error:
        raise UserError(f"model.name: ViT-Slim cannot slim {spec.model}: {error}") from None
    mask_names = [name for name, parameter in model.named_parameters() if name.endswith(".mask")]
    model.to(device)
    teacher = frozen_teacher(teacher, device, params.compute.teacher_cache)
    log.info(
        "%d mask values on attention head channels, %d on MLP hidden units",
        sum(m.numel() for (_, kind), m in masks.items() if kind == ATTENTION),
        sum(m.numel() for (_, kind), m in masks.items() if kind == MLP),
    )

    splits = build_splits(params.data, data_config(model), model.num_classes)
    val_loader = make_loader(splits.val, params.data.eval_batch_size, device, context.workers, splits.on_device)
    distil = distillation(teacher, cfg.temperature, cfg.hard_label_weight)
    weights = {ATTENTION: cfg.attention_weight, MLP: cfg.mlp_weight}

    def loss(network: nn.Module, images, labels, rng) -> torch.Tensor:
        return distil(network, images, labels, rng) + sparsity_loss(masks, weights)

    def validate(network: nn.Module) -> dict[str, float]:
        top1 = evaluate(network, val_loader, device, params.compute.amp, "val")["top1"]
        return {"val_top1": top1} | {f"{kind}_below_0.01": share_below(masks, kind) for kind in (ATTENTION, MLP)}

    mask_options = GroupOptions(
        lr_scale=cfg.mask_lr / cfg.lr, weight_decay=cfg.mask_weight_decay, reference_steps=cfg.released_steps
    )
    history = fit(
        model,
        splits.train,
        loss,
        validate,
        cfg,
        section="slim",
        groups=dict.fromkeys(mask_names, mask_options),
        on_device=splits.on_device,
        **context.fit_arguments(),
    )
    values = detach_masks(model)
    if not is_first():
        return
    save_model(context.output("model"), model.cpu(), spec)
    save_masks(context.output("masks"), values)
    write_csv(context.output("history"), pd.DataFrame(history, columns=HISTORY))
    last = history[-1]
    write_json(
        context.output("metrics"),
        {
            "val_top1": last["val_top1"],
            "attention_below_0.01": last["attention_below_0.01"],
            "mlp_below_0.01": last["mlp_below_0.01"],
            "mask_rate_multiple": rate_multiple(cfg.released_steps, last["steps"]),
            "train_steps": last["steps"],
            "train_images": last["images"],
            "seconds": context.seconds(),
        },
    )
    finish(context.out)


def main(argv: list[str] | None = None) -> int:
    return stage_main("slim", __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    run_as_program(main)
