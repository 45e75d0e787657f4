"""Search OFB's model at one MACs budget: unit scores, width distributions and weights trained together.

    python -m flora_steps.stages.ofb --params params.yaml --budget 0.3

OFB (Once for Both, Ye et al., CVPR 2024; `flora_steps.pruning.ofb`) gives every
attention (a joint grid of head counts x channels per head), MLP and the shared
embedding width of the base model a bi-mask `λ·σ(S) + (1 − λ)·V(α)` and trains it with
the weights in one stage: distillation from the base model on images whose patch
tokens are partly masked, plus the PMIM reconstruction loss (scaled to the task loss's
value, times `ofb.reconstruction_weight`), the MACs loss `ofb.macs_weight ·
((E[MACs] − budget) / dense MACs)²`, and per unfinished module the adaptive one-hot
loss (`ofb.onehot_weight`) and L1 on σ(S) (`ofb.attention_weight`, `mlp_weight`,
`embed_weight`). λ (`ofb.score_weight`) and the masked share of tokens
(`ofb.mask_ratio`) move linearly over `ofb.ramp_epochs`. `ofb.prunes_per_epoch` times an
epoch, progressive pruning kills the width candidates at probability `≤
ofb.prune_threshold / K` (keeping a module's widest while the budget band would
otherwise become unreachable) and slices away the units no live candidate keeps, their
AdamW state with them. At the end each module takes its most probable width, moved
if needed into the MACs band `[budget − search.band, budget]`; the model is sliced,
the mask values are folded into its weights, and it is a plain, smaller timm ViT.

One AdamW for weights, scores and logits; scores and logits learn at `ofb.arch_lr`
(following the weights' schedule) and are never weight-decayed, nor are tokens and
position embedding (the released code gives the logits their own AdamW, betas (0.5,
0.999)). Under `torchrun` (DDP) every process takes the same pruning decisions (the
logits stay in sync). PMIM's token masks are drawn per micro-batch, so
`ofb.micro_batch` changes which tokens are masked. Checkpoints every epoch with the
pruned shapes and resumes after a kill. The `retrain` stage's `ofb` method fine-tunes
the model. Writes `results/ofb/<budget>/`:

- `model.safetensors` + `model.json`: the sliced model (plain timm, embedding width and block sizes)
- `structure.json`: the embedding width, each block's heads, channels per head and MLP
  units, and its MACs (checked against `torch.utils.flop_counter`)
- `history.csv`: per epoch, train loss, lr, steps, images, val top-1 of the masked
  model, its expected MACs as a fraction of dense, the live width candidates, λ and the mask ratio
- `metrics.json`: MACs, parameters, val top-1 before and after slicing, optimizer steps and training images
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..core import count_macs, trace_costs
from ..errors import UserError
from ..params import OFBParams
from ..pruning.ofb import ATTENTION, EMBED, MLP, OFBCosts, OFBGrids, OFBSearch, module_kind, ramp
from ..runtime.artifacts import load_model, save_model, write_csv, write_json
from ..runtime.context import StageContext, run_as_program, stage_main
from ..runtime.data import build_splits, make_loader
from ..runtime.distributed import is_first
from ..runtime.models import data_config, input_shape
from ..runtime.training import HISTORY_COLUMNS, distillation_loss, evaluate, finish, fit

log = logging.getLogger(__name__)
HISTORY = [*HISTORY_COLUMNS, "val_top1", "expected_macs_fraction", "live_candidates", "score_weight", "mask_ratio"]


class Schedule:
    """OFB's schedule around each optimizer step (``training.TrainingHook``): λ and the mask ratio move with
    the epochs, and progressive pruning runs ``prunes_per_epoch`` times an epoch."""

    def __init__(self, search: OFBSearch, cfg: OFBParams, costs: OFBCosts, floor: float) -> None:
        self.search, self.cfg, self.mask_ratio = search, cfg, cfg.mask_ratio[0]
        self.costs, self.floor = costs, floor  # pruning keeps a structure of at least ``floor`` MACs possible

    def before_step(self, progress: float) -> None:
        self.search.weight = ramp(progress, self.cfg.ramp_epochs, *self.cfg.score_weight)
        self.mask_ratio = ramp(progress, self.cfg.ramp_epochs, *self.cfg.mask_ratio)

    def after_step(self, optimizer: torch.optim.Optimizer, steps: int, steps_per_epoch: int) -> bool:
        if steps % max(1, steps_per_epoch // self.cfg.prunes_per_epoch):
            return False
        return self.search.prune(self.cfg.prune_threshold, optimizer, self.costs, self.floor)

    def state_dict(self) -> dict[str, Any]:
        return {"shapes": self.search.shapes()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.search.restore_shapes(state["shapes"])


def search_terms(search: OFBSearch, costs: OFBCosts, target: float, dense: float, cfg: OFBParams) -> torch.Tensor:
    """The MACs loss and, per module still choosing its width, the adaptive one-hot loss and L1 on σ(S)."""
    total = cfg.macs_weight * ((search.expected_macs(costs) - target) / dense) ** 2
    sparsity = {EMBED: cfg.embed_weight, ATTENTION: cfg.attention_weight, MLP: cfg.mlp_weight}
    for key, mask in search.masks.items():
        if not mask.finished:
            total = (
                total
                + cfg.onehot_weight * mask.onehot_loss()
                + sparsity[module_kind(key)] * mask.scores.sigmoid().sum()
            )
    return total


def token_masks(rng: np.random.Generator, images: int, tokens: int, ratio: float) -> torch.Tensor:
    """(images, tokens) booleans: ``round(ratio · tokens)`` random patch tokens of each image are masked."""
    masked = round(ratio * tokens)
    return torch.from_numpy(rng.random((images, tokens)).argsort(axis=1) < masked)


def run(context: StageContext) -> None:
    params, cfg, device, budget = context.params, context.params.ofb, context.device, context.budget
    base, spec = load_model(context.input("model"))
    teacher, _ = load_model(context.input("teacher"))
    shape = input_shape(base)
    costs_dense = trace_costs(base, shape)
    grids = OFBGrids(cfg.head_ratios, cfg.head_dim_ratios, cfg.mlp_ratios, cfg.embed_ratios)
    try:
        costs = OFBCosts.of(base, costs_dense)
        search = OFBSearch(base, grids, in_chans=shape[0], target_window=cfg.target_window, seed=params.seed)
    except ValueError as error:
        raise UserError(f"model.name: OFB cannot prune {spec.model}: {error}") from None
    dense_macs = costs_dense.dense_macs
    target, low = budget * dense_macs, (budget - params.search.band) * dense_macs  # the band [low, target]
    smallest = search.smallest_macs(costs)
    if smallest > target:
        raise UserError(
            f"budgets.ofb: {budget} is below the smallest structure the candidate widths allow "
            f"({smallest / dense_macs:.3f} of the dense MACs); raise it, or lower the smallest of ofb.embed_ratios, "
            "head_ratios, head_dim_ratios, mlp_ratios"
        )
    search.to(device)
    teacher.to(device).eval().requires_grad_(False)
    log.info(
        "OFB at budget %s: %d candidate widths over %d modules, %d score units",
        context.budget_name,
        sum(mask.logits.numel() for mask in search.masks.values()),
        len(search.masks),
        sum(mask.scores.numel() for mask in search.masks.values()),
    )

    splits = build_splits(params.data, data_config(base), base.num_classes)
    val_loader = make_loader(splits.val, params.data.eval_batch_size, device, context.workers, splits.on_device)
    schedule = Schedule(search, cfg, costs, low)
    tokens = base.patch_embed.num_patches

    def loss(network: nn.Module, images: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator):
        masked = token_masks(rng, len(images), tokens, schedule.mask_ratio).to(images.device)
        logits, reconstruction = network(images, masked)
        with torch.no_grad():
            targets = teacher(images).float()
        task = distillation_loss(logits.float(), targets, labels, cfg.temperature, cfg.hard_label_weight)
        total = task + search_terms(search, costs, target, dense_macs, cfg)
        if cfg.reconstruction_weight:
            balance = task.detach() / reconstruction.detach().clamp_min(1e-8)  # PMIM as large as the task loss
            total = total + cfg.reconstruction_weight * balance * reconstruction
        return total

    def validate(network: nn.Module) -> dict[str, float]:
        top1 = evaluate(network, val_loader, device, params.compute.amp, "val")["top1"]
        with torch.no_grad():
            expected = float(search.expected_macs(costs)) / dense_macs
        return {
            "val_top1": top1,
            "expected_macs_fraction": expected,
            "live_candidates": search.live_candidates(),
            "score_weight": search.weight,
            "mask_ratio": schedule.mask_ratio,
        }

    architecture = {name: cfg.arch_lr / cfg.lr for name, _ in search.named_parameters() if name.startswith("masks.")}
    undecayed = ["mask_token", *(f"vit.{name}" for name in base.no_weight_decay())]
    history = fit(
        search,
        splits.train,
        loss,
        validate,
        cfg,
        section="ofb",
        no_decay=undecayed,
        on_device=splits.on_device,
        hook=schedule,
        lr_scales=architecture,
        **context.fit_arguments(),
    )
    try:
        cells = search.fit_to_budget(costs, low, target)
    except ValueError as error:
        raise UserError(f"budgets.ofb: {budget}: {error}") from None
    model, embed_dim, structure = search.finalise(cells)
    macs = costs.structure_macs(embed_dim, structure)
    counted = count_macs(model, shape)
    if counted != macs:
        raise RuntimeError(f"MACs mismatch: the cost model says {macs}, flop_counter counts {counted}")
    sliced_top1 = evaluate(model, val_loader, device, params.compute.amp, "val")["top1"]
    log.info(
        "budget %s: embedding %d, blocks %s; %.3f of dense MACs (%d); val top-1 %.2f%% as sliced",
        context.budget_name,
        embed_dim,
        ", ".join(f"{b.heads}x{b.head_dim}/{b.mlp_hidden}" for b in structure.values()),
        macs / dense_macs,
        macs,
        100 * sliced_top1,
    )
    if not is_first():
        return
    save_model(
        context.output("model"), model.cpu(), spec.model_copy(update={"pruned": structure, "embed_dim": embed_dim})
    )
    write_json(
        context.output("structure"),
        {
            "embed_dim": embed_dim,
            "blocks": {name: dataclasses.asdict(block) for name, block in structure.items()},
            "macs": macs,
            "macs_fraction": round(macs / dense_macs, 6),
        },
    )
    write_csv(context.output("history"), pd.DataFrame(history, columns=HISTORY))
    last = history[-1]
    write_json(
        context.output("metrics"),
        {
            "budget": budget,
            "macs": macs,
            "macs_fraction": round(macs / dense_macs, 6),
            "params": sum(p.numel() for p in model.parameters()),
            "val_top1_masked": last["val_top1"],
            "val_top1_sliced": sliced_top1,
            "train_steps": last["steps"],
            "train_images": last["images"],
            "seconds": context.seconds(),
        },
    )
    finish(context.out)


def main(argv: list[str] | None = None) -> int:
    return stage_main("ofb", __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    run_as_program(main)
