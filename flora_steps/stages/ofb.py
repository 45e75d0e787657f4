"""Search OFB's model at one MACs or latency budget: unit scores, width distributions and weights trained together.

    python -m flora_steps.stages.ofb --params params.yaml --budget 0.3
    python -m flora_steps.stages.ofb --params params.yaml --budget 0.85 --stage ofb_latency

OFB (Once for Both, Ye et al., CVPR 2024; `flora_steps.pruning.ofb`) gives every
attention (a joint grid of head counts x channels per head), MLP and the shared
embedding width of the base model a bi-mask `λ·σ(S) + (1 − λ)·V(α)` and trains it with
the weights in one stage, as the released code does: distillation from the base model
on images whose patch tokens are partly masked, plus the PMIM reconstruction loss
(scaled to the task loss's value, times `ofb.reconstruction_weight`), the MACs loss
`ofb.macs_weight · ((E[MACs] − budget) / dense MACs)²`, and per undecided module the
adaptive one-hot loss (`ofb.onehot_weight`) and L1 on σ(S) (`ofb.attention_weight`,
`mlp_weight`, `embed_weight`). λ (`ofb.score_weight`) and the masked share of tokens
(`ofb.mask_ratio`) move linearly over `ofb.ramp_epochs`. `ofb.prunes_per_epoch` times
an epoch, progressive pruning kills the width candidates at probability
`≤ ofb.prune_threshold / K` and slices away the units no live candidate keeps, their
AdamW state with them; a module left with one candidate has decided (its λ frozen).

Once every module has decided (the release's `finish_search`), PMIM masking stops, the
decoder and mask token freeze and the search losses go: the weights and the per-unit
gains train on the task loss alone, and the epoch with the best val top-1 from then on
is the model (the release's `best.pth`). The model lands at the MACs progressive
pruning converged to, steered only by the MACs loss; nothing moves a width afterwards.
If some module has not decided by the last epoch, the last epoch's most probable
widths are sliced and the log and `metrics.json` say how many were undecided.

Not in the release: with `ofb.cut_to_budget`, a model that decides above its budget is
narrowed at that moment, module by module, removing the units of the smallest mask
values (λ·σ(S) + (1 − λ)), until it lies in `[budget − search.band, budget]`
(`OFBSearch.cut_to_budget`); the rest of the search trains the cut model and its best
val epoch is kept, so the sliced model is the one that was validated. On the embedded
default the released dynamics decide every module within a few epochs, led by the
one-hot loss, and land near half the dense MACs whatever the budget; the cut is what
gives OFB models at lower budgets (docs/methods.md measures what it costs).

Under latency budgets (`ofb_latency`, `budgets.ofb_latency`, not in the release) the cost
is the latency OFB's table predicts (`latency_table_ofb`; `OFBLatency`): the loss is
`ofb.macs_weight · ((E[ms] − budget) / dense ms)²` with E[ms] summed over every
candidate's probability, and the cut (`ofb.cut_to_budget`) prices by the table too.

Optimisers as released: the weights and the scores S in one AdamW (S at `ofb.score_lr`,
undecayed), the width logits α in their own group (`ofb.arch_lr`, betas
`ofb.arch_betas`, decay `ofb.arch_weight_decay`), all on lr's schedule. The released
rates are for a search of `ofb.released_steps` optimizer steps; a shorter search
multiplies both by `released_steps / its steps` (null: no rescaling), as ViT-Slim's
`slim.mask_lr` is. Under `torchrun` (DDP) every process takes the same pruning
decisions (the logits stay in sync). PMIM's token masks are drawn per micro-batch, so
`ofb.micro_batch` changes which tokens are masked. Checkpoints every epoch (with the
pruned shapes and the best epoch's weights) and resumes after a kill. The `retrain`
stage's `ofb` method fine-tunes the model. Writes `results/ofb/<budget>/`:

- `model.safetensors` + `model.json`: the sliced model (plain timm, embedding width and block sizes)
- `structure.json`: the embedding width, each block's heads, channels per head and MLP
  units, and its MACs (checked against `torch.utils.flop_counter`)
- `history.csv`: per epoch, train loss, lr, steps, images, val top-1 of the masked
  model, its expected cost (MACs, or predicted ms) as a fraction of dense, the live
  width candidates, the undecided modules, λ and the mask ratio
- `metrics.json`: the MACs the search decided at and the model's (after a cut), under
  latency budgets the predicted ms likewise, parameters,
  the epoch every module had decided and the epoch kept, val top-1 masked (that epoch)
  and sliced, the rates' rescaling, optimizer steps and training images
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
from ..pruning.ofb import (
    ATTENTION,
    EMBED,
    MLP,
    OFBCosts,
    OFBGrids,
    OFBLatency,
    OFBPrice,
    OFBSearch,
    module_kind,
    ramp,
)
from ..runtime.artifacts import load_model, save_model, write_csv, write_json
from ..runtime.context import StageContext, run_as_program, stage_main
from ..runtime.data import build_splits, make_loader
from ..runtime.distributed import is_first
from ..runtime.latency import ofb_latency_budget
from ..runtime.models import data_config, input_shape
from ..runtime.training import (
    HISTORY_COLUMNS,
    GroupOptions,
    distillation_loss,
    evaluate,
    finish,
    fit,
    frozen_teacher,
    rate_multiple,
)

log = logging.getLogger(__name__)
HISTORY = [
    *HISTORY_COLUMNS,
    "val_top1",
    "expected_fraction",
    "live_candidates",
    "undecided",
    "score_weight",
    "mask_ratio",
]


class Schedule:
    """OFB's schedule around each optimizer step (``training.TrainingHook``): λ and the mask ratio move with
    the epochs, progressive pruning runs ``prunes_per_epoch`` times an epoch, and once every module has
    decided PMIM stops and the decoder freezes. Keeps the best val epoch after that (``keep_if_best``).

    ``band`` (low, high, priced by ``price``; ``ofb.cut_to_budget``): a model that decides above ``high`` is cut
    by importance into the band at that moment, so the rest of the search trains the structure that is kept."""

    def __init__(
        self,
        search: OFBSearch,
        cfg: OFBParams,
        costs: OFBCosts,
        price: OFBPrice,
        band: tuple[float, float] | None = None,
    ) -> None:
        self.search, self.cfg, self.costs, self.price, self.band = search, cfg, costs, price, band
        self.mask_ratio = cfg.mask_ratio[0]
        self.epoch = 0  # the epoch being trained, from 1
        self.decided_epoch: int | None = None
        self.decided_macs: int | None = None  # the MACs progressive pruning converged to
        self.decided_cost: float | None = None  # and their cost (MACs or predicted ms)
        self.best: dict[str, Any] | None = None  # epoch, val_top1 and weights of the best epoch once decided

    @property
    def decided(self) -> bool:
        return self.decided_epoch is not None

    def before_step(self, progress: float) -> None:
        self.epoch = int(progress) + 1
        self.search.weight = ramp(progress, self.cfg.ramp_epochs, *self.cfg.score_weight)
        self.mask_ratio = 0.0 if self.decided else ramp(progress, self.cfg.ramp_epochs, *self.cfg.mask_ratio)

    def after_step(self, optimizer: torch.optim.Optimizer, steps: int, steps_per_epoch: int) -> bool:
        if self.decided or steps % max(1, steps_per_epoch // self.cfg.prunes_per_epoch):
            return False
        replaced = self.search.prune(self.cfg.prune_threshold, optimizer)
        if not self.search.decided:
            return replaced
        self.decided_epoch = self.epoch
        self.decided_macs = structure_cost(self.search, self.costs)
        self.decided_cost = structure_cost(self.search, self.price)
        self._freeze_decoder()
        log.info("every module has decided in epoch %d: PMIM off, decoder frozen", self.decided_epoch)
        if self.band is not None and self.decided_cost > self.band[1]:
            self.search.narrow(cut(self.search, self.price, self.band), optimizer)
            log.info(
                "cut by importance from %.6g to %.6g %s (ofb.cut_to_budget); the search trains the cut model on",
                self.decided_cost,
                structure_cost(self.search, self.price),
                self.price.unit,
            )
        return True  # DDP must be rebuilt without the frozen parameters (and the cut ones)

    def _freeze_decoder(self) -> None:
        self.search.decoder.requires_grad_(False)
        self.search.mask_token.requires_grad_(False)
        self.mask_ratio = 0.0

    def keep_if_best(self, top1: float) -> None:
        """At an epoch's end: keep its weights if every module has decided and its val top-1 is the best since."""
        if self.decided and (self.best is None or top1 >= self.best["val_top1"]):
            weights = {name: value.detach().clone() for name, value in self.search.state_dict().items()}
            self.best = {"epoch": self.epoch, "val_top1": top1, "weights": weights}

    def state_dict(self) -> dict[str, Any]:
        return {
            "shapes": self.search.shapes(),
            "decided_epoch": self.decided_epoch,
            "decided_macs": self.decided_macs,
            "decided_cost": self.decided_cost,
            "best": self.best,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.search.restore_shapes(state["shapes"])
        self.decided_epoch, self.decided_macs, self.best = state["decided_epoch"], state["decided_macs"], state["best"]
        self.decided_cost = state.get("decided_cost", self.decided_macs)
        if self.decided:
            self._freeze_decoder()


def structure_cost(search: OFBSearch, price: OFBPrice) -> float:
    """Cost (MACs, or predicted ms) of the search's chosen widths (``OFBSearch.choice``)."""
    return price.price(*search.structure(search.choice()))


def cut(search: OFBSearch, price: OFBPrice, band: tuple[float, float]) -> dict[str, tuple[int, ...]]:
    """``OFBSearch.cut_to_budget`` into ``band``, its failure as one line naming the budgets key."""
    try:
        return search.cut_to_budget(price, *band)
    except ValueError as error:
        key = "budgets.ofb" if isinstance(price, OFBCosts) else "budgets.ofb_latency"
        raise UserError(f"{key}: {error}; raise the budget or search.band") from None


def search_terms(search: OFBSearch, price: OFBPrice, target: float, dense: float, cfg: OFBParams) -> torch.Tensor:
    """The cost loss (MACs or predicted ms) and, per module still choosing its width, the adaptive one-hot loss and
    L1 on σ(S)."""
    total = cfg.macs_weight * ((price.expected(search) - target) / dense) ** 2
    sparsity = {EMBED: cfg.embed_weight, ATTENTION: cfg.attention_weight, MLP: cfg.mlp_weight}
    for key, mask in search.masks.items():
        if not mask.finished:
            total = (
                total
                + cfg.onehot_weight * mask.onehot_loss()
                + sparsity[module_kind(key)] * mask.scores.sigmoid().sum()
            )
    return total


def optimizer_groups(search: OFBSearch, cfg: OFBParams) -> dict[str, GroupOptions]:
    """The released optimisers as param groups: the scores S with the weights (their own rate, undecayed),
    the width logits α with their own rate, betas and decay; both rates rescaled to the search's steps."""
    scores = GroupOptions(lr_scale=cfg.score_lr / cfg.lr, reference_steps=cfg.released_steps)
    logits = GroupOptions(
        lr_scale=cfg.arch_lr / cfg.lr,
        weight_decay=cfg.arch_weight_decay,
        betas=tuple(cfg.arch_betas),
        reference_steps=cfg.released_steps,
    )
    groups = {}
    for name, _ in search.named_parameters():
        if name.startswith("masks.") and name.endswith(".scores"):
            groups[name] = scores
        elif name.startswith("masks.") and name.endswith(".logits"):
            groups[name] = logits
    return groups


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
    if context.stage.cost == "macs":
        price, dense, target = costs, dense_macs, budget * dense_macs
        low = (budget - params.search.band) * dense_macs
    else:  # the latency OFB's table predicts on the device the search runs on
        limit = ofb_latency_budget(context.input("table"), device, params)
        price, dense, (low, target) = (
            OFBLatency(limit.table, search),
            limit.table.dense_ms,
            limit.band(budget, params.search.band),
        )
    smallest = search.smallest_cost(price)
    if smallest > target:
        raise UserError(
            f"budgets.{context.stage.foreach}: {budget} is below the smallest structure the candidate widths allow "
            f"({smallest / dense:.3f} of the dense model's {price.unit}); raise it, or lower the smallest of "
            "ofb.embed_ratios, head_ratios, head_dim_ratios, mlp_ratios"
        )
    search.to(device)
    teacher = frozen_teacher(teacher, device, params.compute.teacher_cache)
    log.info(
        "OFB at budget %s: %d candidate widths over %d modules, %d score units",
        context.budget_name,
        sum(mask.logits.numel() for mask in search.masks.values()),
        len(search.masks),
        sum(mask.scores.numel() for mask in search.masks.values()),
    )

    splits = build_splits(params.data, data_config(base), base.num_classes)
    val_loader = make_loader(splits.val, params.data.eval_batch_size, device, context.workers, splits.on_device)
    band = (low, target) if cfg.cut_to_budget else None
    schedule = Schedule(search, cfg, costs, price, band)
    tokens = base.patch_embed.num_patches

    def loss(network: nn.Module, images: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator):
        with torch.no_grad():
            targets = teacher(images).float()
        if schedule.decided:  # the weights and gains alone, on the task
            logits = network(images)
            return distillation_loss(logits.float(), targets, labels, cfg.temperature, cfg.hard_label_weight)
        masked = token_masks(rng, len(images), tokens, schedule.mask_ratio).to(images.device)
        logits, reconstruction = network(images, masked)
        task = distillation_loss(logits.float(), targets, labels, cfg.temperature, cfg.hard_label_weight)
        total = task + search_terms(search, price, target, dense, cfg)
        if cfg.reconstruction_weight:
            balance = task.detach() / reconstruction.detach().clamp_min(1e-8)  # PMIM as large as the task loss
            total = total + cfg.reconstruction_weight * balance * reconstruction
        return total

    def validate(network: nn.Module) -> dict[str, float]:
        top1 = evaluate(network, val_loader, device, params.compute.amp, "val")["top1"]
        schedule.keep_if_best(top1)
        with torch.no_grad():
            expected = float(price.expected(search)) / dense
        return {
            "val_top1": top1,
            "expected_fraction": expected,
            "live_candidates": search.live_candidates(),
            "undecided": search.undecided(),
            "score_weight": search.weight,
            "mask_ratio": schedule.mask_ratio,
        }

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
        groups=optimizer_groups(search, cfg),
        **context.fit_arguments(),
    )
    if schedule.best is not None:
        search.load_state_dict(schedule.best["weights"])
        kept, masked_top1 = schedule.best["epoch"], schedule.best["val_top1"]
        log.info("every module decided in epoch %d; keeping epoch %d (best val top-1)", schedule.decided_epoch, kept)
    else:
        kept, masked_top1 = len(history), history[-1]["val_top1"]
        log.warning(
            "%d of %d modules still undecided after %d epochs: slicing the last epoch's most probable widths "
            "(more ofb.epochs or a larger ofb.onehot_weight let the search finish)",
            search.undecided(),
            len(search.masks),
            len(history),
        )
    undecided = search.undecided()
    searched_macs = schedule.decided_macs or structure_cost(search, costs)
    searched_cost = schedule.decided_cost or structure_cost(search, price)
    cells = search.choice()
    if band is not None and structure_cost(search, price) > target:  # undecided to the end: cut untrained
        cells = cut(search, price, band)
        log.warning("the undecided search's widths are above the budget: cut by importance with no training after")
    model, embed_dim, structure = search.finalise(cells)
    macs, cost = costs.structure_macs(embed_dim, structure), price.price(embed_dim, structure)
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
            "searched_macs_fraction": round(searched_macs / dense_macs, 6),
            **(
                {}
                if price is costs
                else {
                    "predicted_ms": round(cost, 5),
                    "predicted_fraction": round(cost / dense, 6),
                    "searched_predicted_fraction": round(searched_cost / dense, 6),
                }
            ),
            "cut": cost != searched_cost,
            "decided_epoch": schedule.decided_epoch,
            "undecided_modules": undecided,
            "kept_epoch": kept,
            "val_top1_masked": masked_top1,
            "val_top1_sliced": sliced_top1,
            "rate_multiple": rate_multiple(cfg.released_steps, last["steps"]),
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
