"""Train the low-rank supernet: one sampled subnet per step, distilled from the dense model.

The student is the factorised model of `decompose` (weight inheritance: one factor
pair per layer, nested rank slicing; `supernet.init: random` draws the factors at random
instead, the ablation without weight inheritance). Each step draws one rank tuple per block from
the filtered space of `filter` — with probability proportional to
1 / prod(rank / full rank) (`supernet.sampling: lowrank`, the paper's rule) or
uniformly — and trains that subnet against the dense base model's soft targets.
AdamW (no decay on biases, norms, tokens, nor on the low-rank factors, whose
components a step mostly does not use), warmup + cosine, gradient clipping,
bfloat16 autocast on CUDA (the teacher too). Runs on several processes with `torchrun` (DDP; gloo
on CPU, NCCL on GPU), each evaluating its share of the val images. Checkpoints every epoch and resumes after a kill. Writes
`results/supernet/`:

- `model.safetensors` + `model.json`: the trained supernet
- `history.csv`: per epoch, train loss, lr, optimizer steps and images so far, val
  top-1 of the smallest and the largest subnet
- `metrics.json`: val top-1 of the smallest and largest subnet, by plain SVD
  truncation (before training) and with the trained supernet's weights; optimizer
  steps and training images (the share every model taken from the supernet inherits)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import pandas as pd
from torch import nn

from ..core import CostModel, lowrank_layers, randomise_factors, set_ranks, trace_costs
from ..core.space import Choice, SearchSpace, SubnetSampler
from ..params import Params
from ..runtime.artifacts import load_model, read_space, save_model, write_csv, write_json
from ..runtime.context import StageContext, run_as_program, stage_main
from ..runtime.data import build_splits, make_loader
from ..runtime.distributed import is_first, world
from ..runtime.models import data_config, input_shape
from ..runtime.training import HISTORY_COLUMNS, distillation, evaluate, finish, fit, frozen_teacher

log = logging.getLogger(__name__)
HISTORY = [*HISTORY_COLUMNS, "val_top1_smallest", "val_top1_largest"]


def extreme_subnets(space: SearchSpace, costs: CostModel) -> dict[str, list[Choice]]:
    """The subnet with the fewest MACs (each block's cheapest tuple) and the largest (dense)."""
    smallest = [min(b.choices, key=lambda c, b=b: costs.macs(b.ranks(c))) for b in space.blocks]
    return {"smallest": smallest, "largest": [b.dense for b in space.blocks]}


def evaluate_subnets(
    model: nn.Module, space: SearchSpace, subnets: dict[str, list[Choice]], loader: Iterable, params: Params
) -> dict[str, float]:
    """Val top-1 of each named subnet (under ``torchrun``, each process scores its share of ``loader``)."""
    device = next(model.parameters()).device
    scores = {}
    for name, subnet in subnets.items():
        set_ranks(model, space.ranks(subnet))
        scores[name] = evaluate(model, loader, device, params.compute.amp, desc=f"val {name}")["top1"]
    set_ranks(model, {})
    return scores


def factor_names(model: nn.Module) -> list[str]:
    """The parameter names of every low-rank factor, which the supernet never weight-decays.

    A step trains only the leading ``r`` components of each factor pair, but AdamW's
    decay would shrink every component at every step: a component that small ranks
    never use would fade from its SVD value before any subnet used it.
    """
    return [f"{name}.{factor}" for name in lowrank_layers(model) for factor in ("first", "second")]


def run(context: StageContext) -> None:
    params, cfg, device = context.params, context.params.supernet, context.device

    student, spec = load_model(context.input("model"))
    if cfg.init == "random":
        randomise_factors(student, params.seed)
        log.info("supernet.init random: every factor drawn at random, not from the SVD (no weight inheritance)")
    teacher, _ = load_model(context.input("teacher"))
    space = read_space(context.input("space"), {n: layer.max_rank for n, layer in lowrank_layers(student).items()})
    costs = trace_costs(student, input_shape(student))
    subnets = extreme_subnets(space, costs)
    sampler = SubnetSampler(space, cfg.sampling)
    student.to(device)
    teacher = frozen_teacher(teacher, device, params.compute.teacher_cache)

    splits = build_splits(params.data, data_config(student), student.num_classes)
    val_loader = make_loader(splits.val, params.data.eval_batch_size, device, context.workers, splits.on_device)
    truncation = evaluate_subnets(student, space, subnets, val_loader, params)
    log.info(
        "before training (%s), val top-1: smallest %.2f%%, largest %.2f%%",
        "plain SVD truncation" if cfg.init == "svd" else "random factors",
        100 * truncation["smallest"],
        100 * truncation["largest"],
    )

    distil = distillation(teacher, cfg.temperature, cfg.hard_label_weight)

    def loss(network, images, labels, rng):
        """One subnet per step, the same on every process (``rng`` is seeded per epoch)."""
        set_ranks(student, space.ranks(sampler.sample(rng)))
        return distil(network, images, labels, rng)

    def validate(network) -> dict[str, float]:
        scores = evaluate_subnets(student, space, subnets, val_loader, params)
        return {f"val_top1_{name}": score for name, score in scores.items()}

    history = fit(
        student,
        splits.train,
        loss,
        validate,
        cfg,
        section="supernet",
        no_decay=factor_names(student),
        on_device=splits.on_device,
        **context.fit_arguments(),
    )
    set_ranks(student, {})

    if is_first():
        save_model(context.output("model"), student.cpu(), spec)
        write_csv(context.output("history"), pd.DataFrame(history, columns=HISTORY))
        write_json(
            context.output("metrics"),
            {
                name: {
                    "macs": costs.macs(space.ranks(subnets[name])),
                    "val_top1_truncation": truncation[name],
                    "val_top1": history[-1][f"val_top1_{name}"],  # after the last epoch
                }
                for name in subnets
            }
            | {
                "train_steps": history[-1]["steps"],
                "train_images": history[-1]["images"],
                "processes": world()[1],
                "seconds": context.seconds(),
            },
        )
        finish(context.out)


def main(argv: list[str] | None = None) -> int:
    return stage_main("supernet", __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    run_as_program(main)
