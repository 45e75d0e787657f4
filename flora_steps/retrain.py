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
- `history.csv`: per epoch, train loss, lr, val top-1
- `metrics.json`: test top-1/top-5 and loss (and top-1 before fine-tuning), val
  top-1, MACs (checked against `torch.utils.flop_counter`), parameters, latency
  of this and of the dense model (CPU; GPU too when present)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from .artifacts import (
    ModelSpec,
    load_model,
    read_rank_config,
    save_checkpoint,
    save_model,
    write_csv,
    write_json,
    write_rank_config,
)
from .core import CostModel, RankConfig, count_macs, lowrank_layers, materialise, trace_costs
from .core.uniform import fit_uniform_ratio
from .data import DataSplits, build_splits, make_loader
from .errors import UserError
from .latency import measure_latency
from .models import data_config, input_shape
from .params import Params
from .progress import progress
from .stage import RESULTS, add_budget_argument, budget_name, check_budget, fingerprint, log, stage_dir, stage_main
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
)

STAGE = "retrain"
METHODS = ("flora", "uniform")
HISTORY_COLUMNS = ["epoch", "train_loss", "lr", "val_top1"]


def factorised_layers(model: nn.Module, ranks: dict[str, int]) -> dict[str, int]:
    """The layers of ``ranks`` that ``materialise`` made a factorised pair (the others became dense)."""
    return {name: rank for name, rank in ranks.items() if isinstance(model.get_submodule(name), nn.Sequential)}


def compressed_model(
    params: Params, method: str, budget: float, costs: CostModel
) -> tuple[nn.Module, dict[str, int], ModelSpec, dict]:
    """The materialised model, its rank config, its spec and how its ranks were chosen.

    ``costs`` is the base model's cost model (the uniform chooser prices ranks with it).
    """
    if method == "flora":
        source, spec = load_model(RESULTS / "supernet" / "model")
        config = read_rank_config(RESULTS / "search" / budget_name(budget) / "ranks.json")
        if config.model != spec.model:
            raise UserError(
                f"results/search/{budget_name(budget)}/ranks.json: for model {config.model}, not {spec.model}"
            )
        ranks, origin = config.ranks, {"source": "supernet weights, searched ranks"}
    else:
        source, spec = load_model(RESULTS / "decompose" / "model")
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


def finetune(
    model: nn.Module,
    teacher: nn.Module,
    splits: DataSplits,
    params: Params,
    device: torch.device,
    run_id: str,
    checkpoint: Path,
) -> list[dict]:
    """Distillation fine-tuning for ``retrain.epochs``; resumes from ``checkpoint``."""
    cfg, amp, workers = params.retrain, params.compute.amp, params.compute.workers
    train_loader = make_loader(splits.train, cfg.batch_size, shuffle=True, workers=workers)
    val_loader = make_loader(splits.val, params.data.eval_batch_size, shuffle=False, workers=workers)
    steps_per_epoch = len(train_loader)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = build_scheduler(
        optimizer, cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch, cfg.min_lr
    )
    start_epoch, history = resume(checkpoint, run_id, model, optimizer)

    bar = progress(desc="retrain", total=cfg.epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch)
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(epoch_seed(params.seed, epoch))
        train_loader.generator.manual_seed(epoch_seed(params.seed, epoch))
        model.train()
        loss_sum = 0.0
        for step, (images, labels) in enumerate(train_loader):
            scheduler.step_update(epoch * steps_per_epoch + step)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast(device, amp):
                with torch.no_grad():
                    targets = teacher(images).float()
                loss = distillation_loss(model(images).float(), targets, labels, cfg.temperature, cfg.hard_label_weight)
            optimizer_step(loss, model, optimizer, cfg.grad_clip, "retrain.lr")
            loss_sum += loss.item()
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", refresh=False)
        val = evaluate(model, val_loader, device, amp, desc="val")
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": loss_sum / steps_per_epoch,
                "lr": optimizer.param_groups[0]["lr"],
                "val_top1": val["top1"],
            }
        )
        log.info(
            "epoch %d/%d  loss %.4f  val top-1 %.2f%%",
            epoch + 1,
            cfg.epochs,
            history[-1]["train_loss"],
            100 * val["top1"],
        )
        save_checkpoint(
            checkpoint,
            {"run_id": run_id, "epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict()}
            | {"history": history},
        )
    bar.close()
    return history


def latencies(model: nn.Module, dense: nn.Module, shape: tuple[int, ...], params: Params) -> dict[str, float]:
    """Median forward-pass milliseconds of ``model`` and of the ``dense`` base model, side by side.

    At ``retrain.latency_batch`` images, on the CPU and also on CUDA when present.
    """
    batch, repeats = params.retrain.latency_batch, params.retrain.latency_repeats
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    timings = {}
    for device in devices:
        for name, network in (("latency_ms", model), ("dense_latency_ms", dense)):
            network.to(device)
            timings[f"{name}_{device.type}"] = round(measure_latency(network, shape, batch, device, repeats), 3)
            network.cpu()
    return timings


def run(params: Params, method: str, budget: float) -> None:
    check_budget(budget, params.budgets.search if method == "flora" else params.budgets.uniform, f"budgets.{method}")
    out = stage_dir(f"{STAGE}/{method}/{budget_name(budget)}")
    started = time.perf_counter()
    device = resolve_device(params.compute)
    seed_everything(params.seed)

    teacher, _ = load_model(RESULTS / "pretrain" / "model")
    shape = input_shape(teacher)
    costs = trace_costs(teacher, shape)
    model, ranks, spec, origin = compressed_model(params, method, budget, costs)
    macs = costs.macs(ranks)
    counted = count_macs(model, shape)
    if counted != macs:
        raise RuntimeError(f"MACs mismatch: the cost model says {macs}, flop_counter counts {counted}")
    log.info(
        "%s at budget %s: %d factorised layers, %.3f of dense MACs (%d), %d parameters",
        method,
        budget_name(budget),
        len(spec.factorised),
        macs / costs.dense_macs,
        macs,
        sum(p.numel() for p in model.parameters()),
    )

    splits = build_splits(params.data, data_config(teacher))
    model.to(device)
    teacher.to(device).eval().requires_grad_(False)
    workers, batch, amp = params.compute.workers, params.data.eval_batch_size, params.compute.amp
    test_loader = make_loader(splits.test, batch, False, workers)
    before = evaluate(model, test_loader, device, amp, "test")
    log.info("test top-1 before fine-tuning %.2f%%", 100 * before["top1"])
    run_id = fingerprint(params.data, params.retrain, params.seed, method, budget_name(budget))
    history = finetune(model, teacher, splits, params, device, run_id, out / "checkpoint.pt")

    test = evaluate(model, test_loader, device, amp, "test")
    if history:  # the last epoch already evaluated the final weights on the val split
        val_top1 = history[-1]["val_top1"]
    else:
        val_top1 = evaluate(model, make_loader(splits.val, batch, False, workers), device, amp, "val")["top1"]
    model.cpu()
    teacher.cpu()
    metrics = {
        "method": method,
        "budget": budget,
        "top1": test["top1"],
        "top5": test["top5"],
        "test_loss": test["loss"],
        "top1_before_finetune": before["top1"],
        "val_top1": val_top1,
        "macs": macs,
        "macs_fraction": round(macs / costs.dense_macs, 6),
        "params": sum(p.numel() for p in model.parameters()),
        "latency_batch": params.retrain.latency_batch,
        **latencies(model, teacher, shape, params),
        **origin,
        "seconds": round(time.perf_counter() - started, 2),
    }
    save_model(out / "model", model, spec)
    write_rank_config(out / "ranks.json", RankConfig(model=spec.model, ranks=ranks))
    write_csv(out / "history.csv", pd.DataFrame(history, columns=HISTORY_COLUMNS))
    write_json(out / "metrics.json", metrics)
    (out / "checkpoint.pt").unlink(missing_ok=True)
    log.info("test top-1 %.2f%%, val top-1 %.2f%%", 100 * test["top1"], 100 * val_top1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=METHODS, required=True, help="flora (the searched subnet) or uniform")
    add_budget_argument(parser)


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, __doc__.splitlines()[0], run, argv, add_arguments)


if __name__ == "__main__":
    raise SystemExit(main())
