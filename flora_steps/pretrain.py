"""Train (or import) the dense base model and evaluate it.

Builds `model.name` with weights from `model.checkpoint`, timm's hub, or random
initialisation, trains it for `pretrain.epochs` (0: import only), evaluates it and
writes `results/pretrain/`:

- `model.safetensors` + `model.json`: the base model artifact
- `metrics.json`: val and test top-1/top-5, MACs and parameters
- `history.csv`: per-epoch train loss, learning rate and val top-1
- `log.txt`

Training keeps `checkpoint.pt` after every epoch and resumes from it after a kill;
the file is removed once the stage has finished.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from .artifacts import ModelSpec, save_checkpoint, save_model, write_csv, write_json
from .core import trace_costs
from .data import DataSplits, build_splits, make_loader
from .models import create_base_model, data_config, input_shape
from .params import Params
from .progress import progress
from .stage import fingerprint, log, stage_dir, stage_main
from .training import (
    autocast,
    build_optimizer,
    build_scheduler,
    epoch_seed,
    evaluate,
    optimizer_step,
    resolve_device,
    resume,
    seed_everything,
)

STAGE = "pretrain"


def train(model: nn.Module, splits: DataSplits, params: Params, device: torch.device, checkpoint: Path) -> list[dict]:
    """Supervised training with AdamW, warmup + cosine, label smoothing; resumes from ``checkpoint``."""
    cfg = params.pretrain
    amp = params.compute.amp
    train_loader = make_loader(splits.train, cfg.batch_size, shuffle=True, workers=params.compute.workers)
    val_loader = make_loader(splits.val, params.data.eval_batch_size, shuffle=False, workers=params.compute.workers)
    steps_per_epoch = len(train_loader)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = build_scheduler(
        optimizer, cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch, cfg.min_lr
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    run_id = fingerprint(params.model, params.data, params.pretrain, params.seed)

    start_epoch, history = resume(checkpoint, run_id, model, optimizer)

    bar = progress(desc="pretrain", total=cfg.epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch)
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(epoch_seed(params.seed, epoch))
        train_loader.generator.manual_seed(epoch_seed(params.seed, epoch))
        model.train()
        loss_sum = 0.0
        for step, (images, labels) in enumerate(train_loader):
            scheduler.step_update(epoch * steps_per_epoch + step)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast(device, amp):
                loss = criterion(model(images), labels)
            optimizer_step(loss, model, optimizer, cfg.grad_clip, "pretrain.lr")
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
                "val_loss": val["loss"],
            }
        )
        log.info(
            "epoch %d/%d  train loss %.4f  val top-1 %.2f%%",
            epoch + 1,
            cfg.epochs,
            history[-1]["train_loss"],
            100 * val["top1"],
        )
        save_checkpoint(
            checkpoint,
            {
                "run_id": run_id,
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "history": history,
            },
        )
    bar.close()
    return history


def run(params: Params) -> None:
    out = stage_dir(STAGE)
    started = time.perf_counter()
    device = resolve_device(params.compute)
    seed_everything(params.seed)
    source = params.model.checkpoint or ("timm hub" if params.model.hub else "random initialisation")
    log.info("model %s, weights from %s", params.model.name, source)
    model = create_base_model(
        params.model.name, params.model.num_classes, params.model.checkpoint, params.model.hub, params.model.kwargs
    )
    costs = trace_costs(model, input_shape(model))
    model.to(device)

    has_data = params.data.dataset == "digits" or (params.data.root is not None and params.data.root.is_dir())
    history: list[dict] = []
    metrics: dict = {"top1": None, "top5": None, "val_top1": None}
    if params.pretrain.epochs > 0 or has_data:
        splits = build_splits(params.data, data_config(model))
        log.info(
            "data %s: %d train, %d val, %d test images",
            params.data.dataset,
            *map(len, (splits.train, splits.val, splits.test)),
        )
        if params.pretrain.epochs > 0:
            history = train(model, splits, params, device, out / "checkpoint.pt")
        workers, batch = params.compute.workers, params.data.eval_batch_size
        val = evaluate(model, make_loader(splits.val, batch, False, workers), device, params.compute.amp, "val")
        test = evaluate(model, make_loader(splits.test, batch, False, workers), device, params.compute.amp, "test")
        metrics = {"top1": test["top1"], "top5": test["top5"], "val_top1": val["top1"]}
        log.info("test top-1 %.2f%%, val top-1 %.2f%%", 100 * test["top1"], 100 * val["top1"])
    else:
        log.warning("data.root %s not found: imported the weights without evaluating them", params.data.root)

    metrics.update(macs=costs.dense_macs, params=costs.dense_params, seconds=round(time.perf_counter() - started, 2))
    spec = ModelSpec(
        model=params.model.name, model_kwargs={**params.model.kwargs, "num_classes": params.model.num_classes}
    )
    save_model(out / "model", model.cpu(), spec)
    write_csv(out / "history.csv", pd.DataFrame(history, columns=["epoch", "train_loss", "lr", "val_top1", "val_loss"]))
    write_json(out / "metrics.json", metrics)
    (out / "checkpoint.pt").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
