"""Train the low-rank supernet: one sampled subnet per step, distilled from the dense model.

The student is the factorised model of `decompose` (weight inheritance: one factor
pair per layer, nested rank slicing). Each step draws one rank tuple per block from
the filtered space of `filter` — with probability proportional to
1 / prod(rank / full rank) (`supernet.sampling: lowrank`, the paper's rule) or
uniformly — and trains that subnet against the dense base model's soft targets.
AdamW (no decay on biases, norms, tokens), warmup + cosine, gradient clipping,
bfloat16 autocast on CUDA. Runs on several processes with `torchrun` (DDP; gloo
on CPU, NCCL on GPU). Checkpoints every epoch and resumes after a kill. Writes
`results/supernet/`:

- `model.safetensors` + `model.json`: the trained supernet
- `history.csv`: per epoch, loss, lr, val top-1 of the smallest and the largest subnet
- `metrics.json`: val top-1 of the smallest and largest subnet, by plain SVD
  truncation (before training) and with the trained supernet's weights
"""

from __future__ import annotations

import os
import time

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from .artifacts import load_model, read_space, save_checkpoint, save_model, write_csv, write_json
from .core import CostModel, set_ranks, trace_costs
from .core.space import Choice, SearchSpace, SubnetSampler
from .data import build_splits, make_loader
from .errors import UserError
from .models import data_config, input_shape
from .params import Params
from .progress import progress
from .stage import RESULTS, fingerprint, log, stage_dir, stage_main
from .training import (
    autocast,
    build_optimizer,
    build_scheduler,
    distillation_loss,
    epoch_seed,
    evaluate,
    optimizer_step,
    resolve_device,
    resume,
    seed_everything,
    weights_in_sync,
)

STAGE = "supernet"
HISTORY_COLUMNS = ["epoch", "loss", "lr", "val_top1_smallest", "val_top1_largest"]


def extreme_subnets(space: SearchSpace, costs: CostModel) -> dict[str, list[Choice]]:
    """The subnet with the fewest MACs (each block's cheapest tuple) and the largest (dense)."""
    smallest = [min(b.choices, key=lambda c, b=b: costs.macs(b.ranks(c))) for b in space.blocks]
    return {"smallest": smallest, "largest": [b.dense for b in space.blocks]}


def evaluate_subnets(
    model: nn.Module, space: SearchSpace, subnets: dict[str, list[Choice]], loader: DataLoader, params: Params
) -> dict[str, float]:
    """Val top-1 of each named subnet; only the first process evaluates (the others get NaN)."""
    if os.environ.get("RANK", "0") != "0":
        return {name: float("nan") for name in subnets}
    device = next(model.parameters()).device
    scores = {}
    for name, subnet in subnets.items():
        set_ranks(model, space.ranks(subnet))
        scores[name] = evaluate(model, loader, device, params.compute.amp, desc=f"val {name}")["top1"]
    set_ranks(model, {})
    return scores


def run(params: Params) -> None:
    cfg = params.supernet
    out = stage_dir(STAGE)
    started = time.perf_counter()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(params.compute)
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    seed_everything(params.seed)

    student, spec = load_model(RESULTS / "decompose" / "model")
    teacher, _ = load_model(RESULTS / "pretrain" / "model")
    space = read_space(RESULTS / "filter" / "space.json")
    costs = trace_costs(student, input_shape(student))
    subnets = extreme_subnets(space, costs)
    sampler = SubnetSampler(space, cfg.sampling)
    student.to(device)
    teacher.to(device).eval().requires_grad_(False)

    splits = build_splits(params.data, data_config(student))
    workers = params.compute.workers
    val_loader = make_loader(splits.val, params.data.eval_batch_size, shuffle=False, workers=workers)
    if cfg.batch_size % world_size:
        raise UserError(f"supernet.batch_size: {cfg.batch_size} does not split evenly over {world_size} processes")
    per_process = cfg.batch_size // world_size
    if world_size > 1:
        train_sampler = DistributedSampler(splits.train, shuffle=True, seed=params.seed, drop_last=True)
        train_loader = DataLoader(splits.train, per_process, sampler=train_sampler, num_workers=workers, drop_last=True)
    else:
        train_loader = make_loader(splits.train, cfg.batch_size, shuffle=True, workers=workers)
    steps_per_epoch = len(train_loader)
    optimizer = build_optimizer(student, cfg.lr, cfg.weight_decay)
    scheduler = build_scheduler(
        optimizer, cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch, cfg.min_lr
    )
    truncation = evaluate_subnets(student, space, subnets, val_loader, params)
    log.info(
        "plain SVD truncation, val top-1: smallest %.2f%%, largest %.2f%%",
        100 * truncation["smallest"],
        100 * truncation["largest"],
    )

    checkpoint = out / "checkpoint.pt"
    run_id = fingerprint(params.data, params.filter, params.supernet, params.seed, world_size)
    start_epoch, history = resume(checkpoint, run_id, student, optimizer)
    model = DistributedDataParallel(student) if world_size > 1 else student

    bar = progress(desc="supernet", total=cfg.epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch)
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(epoch_seed(params.seed, epoch) + rank)
        if world_size > 1:
            train_sampler.set_epoch(epoch)
        else:
            train_loader.generator.manual_seed(epoch_seed(params.seed, epoch))
        subnet_rng = np.random.default_rng(epoch_seed(params.seed, epoch))  # same subnets on every process
        model.train()
        loss_sum = 0.0
        for step, (images, labels) in enumerate(train_loader):
            scheduler.step_update(epoch * steps_per_epoch + step)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            set_ranks(student, space.ranks(sampler.sample(subnet_rng)))
            with autocast(device, params.compute.amp):
                with torch.no_grad():
                    targets = teacher(images).float()
                loss = distillation_loss(model(images).float(), targets, labels, cfg.temperature, cfg.hard_label_weight)
            optimizer_step(loss, student, optimizer, cfg.grad_clip, "supernet.lr")
            loss_sum += loss.item()
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", refresh=False)
        set_ranks(student, {})
        val = evaluate_subnets(student, space, subnets, val_loader, params)
        history.append(
            {
                "epoch": epoch + 1,
                "loss": loss_sum / steps_per_epoch,
                "lr": optimizer.param_groups[0]["lr"],
                "val_top1_smallest": val["smallest"],
                "val_top1_largest": val["largest"],
            }
        )
        log.info(
            "epoch %d/%d  loss %.4f  val top-1 smallest %.2f%%  largest %.2f%%",
            epoch + 1,
            cfg.epochs,
            history[-1]["loss"],
            100 * val["smallest"],
            100 * val["largest"],
        )
        if rank == 0:
            state = {"run_id": run_id, "epoch": epoch + 1, "history": history}
            save_checkpoint(checkpoint, state | {"model": student.state_dict(), "optimizer": optimizer.state_dict()})
        if world_size > 1:
            dist.barrier()
    bar.close()
    if world_size > 1:
        if not weights_in_sync(student):
            raise RuntimeError("DDP processes ended with different weights")
        log.info("weights identical on all %d processes", world_size)

    if rank == 0:
        save_model(out / "model", student.cpu(), spec)
        write_csv(out / "history.csv", pd.DataFrame(history, columns=HISTORY_COLUMNS))
        write_json(
            out / "metrics.json",
            {
                name: {
                    "macs": costs.macs(space.ranks(subnets[name])),
                    "val_top1_truncation": truncation[name],
                    "val_top1": history[-1][f"val_top1_{name}"],  # after the last epoch
                }
                for name in subnets
            }
            | {"processes": world_size, "seconds": round(time.perf_counter() - started, 2)},
        )
        checkpoint.unlink(missing_ok=True)
    if world_size > 1:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
