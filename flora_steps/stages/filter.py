"""Score every rank tuple of every block and keep the efficient ones (the search space).

Each target layer gets a rank grid (`filter.ratios` of its full rank; ranks not
cheaper than dense are dropped). For each block, with all other blocks dense, every
tuple of its layers' ranks is scored on a fixed subset of the training images
(`filter.images`, eval transform): top-1, KL divergence of its logits from the
dense model's, and the MACs it saves. In each of `filter.bins` equal-width MACs
bins of the block, the best `filter.keep_ratio` of its tuples by KL per MAC saved
are kept, plus the dense and the cheapest tuple (see `flora_steps.core.filter`).
With `filter.local.epochs` above 0, each block's tuples are scored instead with
the weights of a block-local supernet, as the released code's search-space search
does: a copy of the decomposed model trained for that many epochs on
`filter.local.share` of the train split (AdamW by `filter.local`), distilled from the
model at full rank, each step at a tuple of this block drawn uniformly (every other
block dense). 0 scores the SVD weights zero-shot. Writes `results/filter/`:

- `space.json`: per block, its layers, full ranks and the kept rank tuples
- `sensitivity.csv`: every scored tuple (ranks, MACs, top-1, KL, score, kept)
- `sensitivity.png`: KL of each layer alone at each rank ratio (heatmap)
- `metrics.json`: tuples scored and kept, search-space size

Scoring keeps `checkpoint.pt` after every block (the scores so far); a killed run
resumes after the last scored block, and the file is removed once the stage has
finished. At real scale (Swin-B: hours of scoring) a time limit then costs one block.
Under `torchrun` (`compute.processes`) every process scores each tuple on its share
of the images.
"""

from __future__ import annotations

import copy
import logging
import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..core import lowrank_layers, set_ranks, trace_costs
from ..core.filter import efficiency, keep_efficient
from ..core.space import BlockSpace, SearchSpace, full_space, sampling_probabilities
from ..report.layer_figures import plot_sensitivity, single_layer_kl
from ..runtime.artifacts import load_model, save_checkpoint, save_figure, write_csv, write_json, write_text
from ..runtime.context import StageContext, run_as_program, stage_main
from ..runtime.data import build_splits, fixed_subset, make_loader
from ..runtime.distributed import is_first, sum_over_processes
from ..runtime.models import data_config, input_shape
from ..runtime.progress import progress
from ..runtime.training import CHECKPOINT, autocast, distillation, finish, fit, own_checkpoint

log = logging.getLogger(__name__)


@torch.no_grad()
def score_block(
    model: torch.nn.Module,
    block: BlockSpace,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    dense_logits: list[torch.Tensor],
    amp: bool,
    device: torch.device,
) -> list[tuple[float, float]]:
    """(top-1, KL from dense) of every choice of ``block``, all other blocks dense.

    Under ``torchrun`` each process holds its share of the images; the scores combine all shares.
    """
    scores = []
    for choice in progress(block.choices, desc=block.name, inner=True):
        set_ranks(model, block.ranks(choice))
        correct, kl, count = 0, 0.0, 0
        for (images, labels), reference in zip(batches, dense_logits, strict=True):
            with autocast(device, amp):
                logits = model(images).float()
            correct += (logits.argmax(1) == labels).sum().item()
            kl += F.kl_div(logits.log_softmax(1), reference.log_softmax(1), log_target=True, reduction="sum").item()
            count += len(labels)
        correct, kl, count = sum_over_processes([correct, kl, count], device)
        scores.append((correct / count, kl / count))
    set_ranks(model, {})
    return scores


def train_local_supernet(
    context: StageContext, model: torch.nn.Module, block: BlockSpace, train: Dataset, on_device
) -> torch.nn.Module:
    """A copy of ``model`` trained as ``block``'s local supernet (the released code's block-local training):
    distilled from ``model`` at full rank, each step at one of ``block``'s tuples drawn uniformly, the other
    blocks dense."""
    params = context.params
    teacher = model  # at full rank the decomposed model is the dense one
    local = copy.deepcopy(model).train()
    probabilities = sampling_probabilities(block, "uniform")
    distil = distillation(teacher, temperature=1.0, hard_weight=0.0)

    def loss(network: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator):
        set_ranks(local, block.ranks(block.choices[rng.choice(len(block.choices), p=probabilities)]))
        return distil(network, images, labels, rng)

    arguments = context.fit_arguments() | {"checkpoint": None}  # a killed run scores this block again
    fit(local, train, loss, lambda _: {}, params.filter.local, section="filter.local", on_device=on_device, **arguments)
    set_ranks(local, {})
    return local.eval()


def scored_so_far(context: StageContext, identity: str) -> dict[str, list[tuple[float, float]]]:
    """The block scores a killed run of this identity saved (``{}`` to start fresh, saying why in the log)."""
    path = context.out / CHECKPOINT
    state = own_checkpoint(path, identity)
    if state is None:
        return {}
    scores = {name: [(float(top1), float(kl)) for top1, kl in block] for name, block in state["scores"].items()}
    log.info("resuming from %s: %d blocks already scored", path, len(scores))
    return scores


def run(context: StageContext) -> None:
    params, device = context.params, context.device
    cfg = params.filter
    model, _ = load_model(context.input("model"))
    shape = input_shape(model)
    costs = trace_costs(model, shape)
    layers = lowrank_layers(model)
    space = full_space({name: (m.in_features, m.out_features) for name, m in layers.items()}, cfg.ratios)
    model.to(device).eval()

    splits = build_splits(params.data, data_config(model), model.num_classes)
    subset = fixed_subset(splits.train_plain, cfg.images, params.seed)
    loader = make_loader(subset, params.data.eval_batch_size, device, context.workers, splits.on_device)
    batches = [(images.to(device), labels.to(device)) for images, labels in loader]
    with torch.no_grad(), autocast(device, params.compute.amp):
        dense_logits = [model(images).float() for images, _ in batches]
    log.info(
        "scoring %d tuples in %d blocks on %d images",
        sum(len(b.choices) for b in space.blocks),
        len(space.blocks),
        len(subset),
    )

    identity = context.identity()
    done = scored_so_far(context, identity)
    rows, kept_blocks = [], []
    local_train = None
    if cfg.local.epochs:
        local_train = fixed_subset(splits.train, round(cfg.local.share * len(splits.train)), params.seed)
        log.info("block-local supernets: %d epochs on %d training images each", cfg.local.epochs, len(local_train))
    for block in progress(space.blocks, desc="filter"):
        scorer = model
        if block.name not in done and local_train is not None:
            scorer = train_local_supernet(context, model, block, local_train, splits.on_device)
        scores = done.get(block.name) or score_block(scorer, block, batches, dense_logits, params.compute.amp, device)
        if block.name not in done:
            done[block.name] = scores
            if is_first():
                save_checkpoint(context.out / CHECKPOINT, {"identity": identity, "scores": done})
        macs = np.array([costs.macs(block.ranks(c)) for c in block.choices])
        saved = costs.dense_macs - macs
        damage = np.array([kl for _, kl in scores])
        kept = keep_efficient(macs, saved, damage, cfg.keep_ratio, cfg.bins, block.choices.index(block.dense))
        survivors = tuple(choice for choice, keep in zip(block.choices, kept, strict=True) if keep)
        kept_blocks.append(BlockSpace(block.name, block.layers, block.full_ranks, survivors))
        for choice, (top1, kl), m, s, score, k in zip(
            block.choices, scores, macs, saved, efficiency(damage, saved), kept, strict=True
        ):
            ranks = {block.role(layer): rank for layer, rank in zip(block.layers, choice, strict=True)}
            rows.append(
                {"block": block.name, **ranks, "macs": int(m), "saved_macs": int(s), "top1": top1, "kl": kl}
                | {"score": score, "kept": bool(k)}
            )
        log.info("%s: kept %d of %d tuples", block.name, kept.sum(), len(block.choices))

    if not is_first():
        return
    filtered = SearchSpace(tuple(kept_blocks))
    table = pd.DataFrame(rows)
    write_text(context.output("space"), filtered.to_json())
    write_csv(context.output("sensitivity"), table)
    save_figure(context.output("plot"), plot_sensitivity(single_layer_kl(table, space)))
    write_json(
        context.output("metrics"),
        {
            "scored": len(table),
            "kept": int(table["kept"].sum()),
            "space_size_log10": round(sum(math.log10(len(b.choices)) for b in filtered.blocks), 3),
            "full_space_size_log10": round(sum(math.log10(len(b.choices)) for b in space.blocks), 3),
            "seconds": context.seconds(),
        },
    )
    finish(context.out)


def main(argv: list[str] | None = None) -> int:
    return stage_main("filter", __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    run_as_program(main)
