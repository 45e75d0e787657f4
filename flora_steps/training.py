"""Pieces shared by the training stages: device, seeding, optimizer, schedule, evaluation."""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import timm.optim
import timm.scheduler
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .artifacts import load_checkpoint
from .errors import UserError
from .params import ComputeParams
from .progress import progress
from .stage import log


def resolve_device(compute: ComputeParams) -> torch.device:
    """The torch device ``compute.device`` asks for; also applies ``compute.threads``."""
    if compute.threads:
        torch.set_num_threads(compute.threads)
    if compute.device == "cuda" and not torch.cuda.is_available():
        raise UserError("compute.device: cuda requested but no CUDA device is available")
    if compute.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(compute.device)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """bfloat16 autocast on CUDA when ``enabled``; a no-op elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with no weight decay on biases, norms and the model's ``no_weight_decay`` tokens."""
    return timm.optim.create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr: float
) -> timm.scheduler.CosineLRScheduler:
    """Per-step cosine decay to ``min_lr`` after a linear warmup; call ``step_update(step)``."""
    return timm.scheduler.CosineLRScheduler(
        optimizer,
        t_initial=max(total_steps, 1),
        lr_min=min_lr,
        warmup_t=warmup_steps,
        warmup_lr_init=min_lr,
        warmup_prefix=False,
        t_in_epochs=False,
    )


def resume(checkpoint: Path, run_id: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, list[dict]]:
    """Restore ``model`` and ``optimizer`` from ``checkpoint`` if it belongs to ``run_id``.

    Returns (epochs already done, per-epoch history so far); (0, []) to start fresh.
    """
    state = load_checkpoint(checkpoint)
    if state is None:
        return 0, []
    if state.get("run_id") != run_id:
        log.info("ignoring %s: it belongs to other params", checkpoint)
        return 0, []
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    log.info("resuming from %s after epoch %d", checkpoint, state["epoch"])
    return state["epoch"], state["history"]


def optimizer_step(
    loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float | None, lr_key: str
) -> None:
    """Backward pass, optional gradient-norm clipping and one optimizer step.

    A non-finite loss stops training with a one-line error naming ``lr_key``.
    """
    if not torch.isfinite(loss):
        raise UserError(f"{lr_key}: training diverged (loss {loss.item()}); lower the learning rate")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float, hard_weight: float
) -> torch.Tensor:
    """Soft-target cross entropy on the teacher's probabilities (scaled by T²), plus weighted hard-label CE."""
    soft_targets = (teacher / temperature).softmax(dim=1)
    soft = -(soft_targets * (student / temperature).log_softmax(dim=1)).sum(dim=1).mean() * temperature**2
    if hard_weight == 0:
        return soft
    return (1 - hard_weight) * soft + hard_weight * F.cross_entropy(student, labels)


def weights_in_sync(model: nn.Module) -> bool:
    """True when every process of the running process group holds exactly the same parameters."""
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    same = torch.tensor([float(torch.equal(flat, reference))], device=flat.device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item())


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of one epoch's randomness, so that a resumed run equals an uninterrupted one."""
    return seed * 100_003 + epoch


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    amp: bool = False,
    desc: str = "eval",
) -> dict[str, float]:
    """Top-1, top-5 (as fractions) and mean cross-entropy of ``model`` over ``batches``."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = loss_sum = count = 0.0
    for images, labels in progress(batches, desc=desc, inner=True):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(labels[:, None])
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        count += len(labels)
    model.train(was_training)
    if count == 0:
        raise UserError("evaluation split is empty")
    return {"top1": correct1 / count, "top5": correct5 / count, "loss": loss_sum / count}
