"""The one training loop of the pipeline, and the pieces it and the stages share.

``fit`` owns everything a training run has in common: the data loader and its
per-epoch seeding (each image's augmentation seeded by run seed, epoch and image), AdamW with warmup + cosine, bfloat16 autocast on CUDA, the
non-finite-loss check, gradient accumulation over micro-batches up to the global
batch, gradient clipping, DDP under ``torchrun``, a checkpoint after every epoch and
resuming from it (with any number of processes), the per-epoch history and the progress bar.
A stage passes its own loss (``LossFn``) and its own evaluation (``EvaluateFn``).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Collection, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, replace
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import timm.optim
import timm.scheduler
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from ..errors import UserError, first_line
from ..params import TrainingParams
from .artifacts import load_checkpoint, save_checkpoint
from .data import OnDevice, train_loader
from .distributed import barrier, gather_lists, is_first, sum_over_processes, weights_in_sync, world
from .progress import progress

log = logging.getLogger(__name__)

#: (model, images, labels, rng) -> loss; ``rng`` is the epoch's generator for any sampling the loss does.
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, np.random.Generator], torch.Tensor]
#: model -> named numbers after an epoch (e.g. ``val_top1``); they become history columns.
EvaluateFn = Callable[[nn.Module], dict[str, float]]


class TrainingHook(Protocol):
    """What a training run that changes its model as it goes (OFB's search) plugs into ``fit``."""

    def before_step(self, progress: float) -> None:
        """Called before each optimizer step; ``progress`` is the epochs done, fractional."""

    def after_step(self, optimizer: torch.optim.Optimizer, steps: int, steps_per_epoch: int) -> bool:
        """Called after optimizer step number ``steps``; returns True when it replaced parameters."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to rebuild the model's current shapes."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Give the model the shapes of a checkpoint's ``state_dict()`` before its weights load."""


CHECKPOINT = "checkpoint.pt"
#: The history columns every training run has; a stage's evaluation adds its own after them.
HISTORY_COLUMNS = ["epoch", "train_loss", "lr", "steps", "images"]
#: One row per test image: its position in the test split, its label and the predicted class.
PREDICTION_COLUMNS = ["image", "label", "prediction"]


def checkpoint_name(seed: int | None) -> str:
    """The checkpoint file of a stage's run (of one seed's run, when a stage trains once per seed)."""
    return CHECKPOINT if seed is None else f"checkpoint-seed{seed}.pt"


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """bfloat16 autocast on CUDA when ``enabled``; a no-op elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


@dataclass(frozen=True)
class GroupOptions:
    """AdamW options of a set of parameters that differ from the model's: a multiple of the learning rate
    (timm's schedulers apply a group's ``lr_scale``), their own weight decay and betas.

    ``reference_steps``: the rate is meant for a run of that many optimizer steps; ``fit``
    multiplies ``lr_scale`` by ``reference_steps / its own steps``, so that the parameters
    can move as far in a shorter run (AdamW moves a parameter by about its rate per
    step). None: no rescaling.
    """

    lr_scale: float = 1.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    reference_steps: int | None = None

    def for_steps(self, steps: int) -> GroupOptions:
        """These options for a run of ``steps`` optimizer steps (``reference_steps`` applied)."""
        if self.reference_steps is None:
            return self
        return replace(self, lr_scale=self.lr_scale * rate_multiple(self.reference_steps, steps), reference_steps=None)


def rate_multiple(reference_steps: int | None, steps: int) -> float:
    """What a rate meant for ``reference_steps`` optimizer steps is multiplied by in a run of ``steps`` (1: None)."""
    return 1.0 if reference_steps is None else reference_steps / max(steps, 1)


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    no_decay: Collection[str] = (),
    groups: Mapping[str, GroupOptions] | None = None,
) -> torch.optim.Optimizer:
    """AdamW with no weight decay on biases, norms (every 1-d parameter), the model's ``no_weight_decay``
    tokens and ``no_decay`` (names or ``fnmatch`` patterns).

    ``groups`` maps parameter names to their own ``GroupOptions`` (one param group per
    distinct options). Frozen parameters are in the groups too, so that a run whose
    hook freezes some mid-way resumes into an optimizer of the same shape (AdamW skips
    parameters without a gradient).
    """
    skip = [*getattr(model, "no_weight_decay", set)(), *no_decay]
    options = dict(groups or {})
    decayed, undecayed, special = [], [], {option: [] for option in dict.fromkeys(options.values())}
    for name, parameter in model.named_parameters():
        if name in options:
            special[options[name]].append(parameter)
        elif parameter.ndim <= 1 or name.endswith(".bias") or any(fnmatch(name, pattern) for pattern in skip):
            undecayed.append(parameter)
        else:
            decayed.append(parameter)
    param_groups = [
        {"params": params, "weight_decay": decay}
        for params, decay in ((undecayed, 0.0), (decayed, weight_decay))
        if params
    ]
    for option, params in special.items():
        param_groups.append(
            {"params": params, "lr_scale": option.lr_scale, "weight_decay": option.weight_decay, "betas": option.betas}
        )
    return timm.optim.create_optimizer_v2(param_groups, opt="adamw", lr=lr, weight_decay=weight_decay)


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


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of one epoch's randomness, so that a resumed run equals an uninterrupted one."""
    return seed * 100_003 + epoch


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float, hard_weight: float
) -> torch.Tensor:
    """Soft-target cross entropy on the teacher's probabilities (scaled by T²), plus weighted hard-label CE."""
    soft_targets = (teacher / temperature).softmax(dim=1)
    soft = -(soft_targets * (student / temperature).log_softmax(dim=1)).sum(dim=1).mean() * temperature**2
    if hard_weight == 0:
        return soft
    return (1 - hard_weight) * soft + hard_weight * F.cross_entropy(student, labels)


class CachedTeacher(nn.Module):
    """A frozen teacher that remembers its logits per distinct input image, up to ``capacity`` images.

    A hit is an image whose bytes equal one the teacher has seen, so the logits are the
    teacher's own for that image (computed in another batch: equal up to rounding).
    Worth it where augmentation repeats inputs: the digits' ±1-pixel shifts give each
    training image at most 9 forms, so after a few epochs the teacher's forward pass,
    about a third of a distillation step on the toy, is mostly skipped. Images on
    another device than the CPU go to the teacher uncached (their bytes cost a copy).
    """

    def __init__(self, teacher: nn.Module, capacity: int) -> None:
        super().__init__()
        self.teacher, self.capacity = teacher, capacity
        self.logits: dict[bytes, torch.Tensor] = {}

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.device.type != "cpu":
            return self.teacher(images).float()
        keys = [image.tobytes() for image in images.numpy()]
        missing = list({key: index for index, key in enumerate(keys) if key not in self.logits}.values())
        computed = dict(zip((keys[i] for i in missing), self.teacher(images[missing]).float())) if missing else {}
        for key, row in computed.items():
            if len(self.logits) >= self.capacity:
                break
            self.logits[key] = row
        return torch.stack([self.logits.get(key, computed.get(key)) for key in keys])


def frozen_teacher(teacher: nn.Module, device: torch.device, cache: int) -> nn.Module:
    """``teacher`` on ``device``, in eval mode, without gradients, behind a ``CachedTeacher`` of ``cache`` images
    (``compute.teacher_cache``; 0: none)."""
    teacher = teacher.to(device).eval().requires_grad_(False)
    return CachedTeacher(teacher, cache) if cache else teacher


def distillation(teacher: nn.Module, temperature: float, hard_weight: float) -> LossFn:
    """The loss of a student distilled from ``teacher`` (frozen, in eval mode)."""

    def loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        with torch.no_grad():
            targets = teacher(images).float()
        return distillation_loss(model(images).float(), targets, labels, temperature, hard_weight)

    return loss


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    amp: bool = False,
    desc: str = "eval",
    keep_predictions: bool = False,
) -> dict[str, Any]:
    """Top-1, top-5 (as fractions) and mean cross-entropy of ``model`` over ``batches``.

    With ``keep_predictions``, also ``labels`` and ``predictions``: every image's label and
    predicted class, in the loader's order. Under ``torchrun`` every process calls it with
    its share of the images (``make_loader`` shards them) and all get the numbers of the whole split.
    """
    was_training = model.training
    model.eval()
    correct1 = correct5 = loss_sum = count = 0.0
    labels_seen: list[int] = []
    predictions: list[int] = []
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
        if keep_predictions:
            labels_seen += labels.tolist()
            predictions += top[:, 0].tolist()
    model.train(was_training)
    correct1, correct5, loss_sum, count = sum_over_processes([correct1, correct5, loss_sum, count], device)
    if count == 0:
        raise UserError("evaluation split is empty")
    result: dict[str, Any] = {"top1": correct1 / count, "top5": correct5 / count, "loss": loss_sum / count}
    if keep_predictions:
        result |= {"labels": gather_lists(labels_seen), "predictions": gather_lists(predictions)}
    return result


def prediction_table(result: dict[str, Any]) -> pd.DataFrame:
    """The ``labels`` and ``predictions`` of ``evaluate(..., keep_predictions=True)`` as one row per image."""
    labels = result["labels"]
    return pd.DataFrame({"image": range(len(labels)), "label": labels, "prediction": result["predictions"]})


def accumulation(batch_size: int, micro_batch: int | None, processes: int, section: str) -> tuple[int, int]:
    """(micro-batch per process, micro-batches per optimizer step) that make up a global ``batch_size``."""
    micro = micro_batch or batch_size // processes
    if batch_size % (processes * micro):
        raise UserError(
            f"{section}.batch_size: {batch_size} does not split into {processes} processes x micro-batches of "
            f"{micro} ({section}.micro_batch); choose values whose product divides it"
        )
    return micro, batch_size // (processes * micro)


def own_checkpoint(checkpoint: os.PathLike, identity: str) -> dict[str, Any] | None:
    """The state saved at ``checkpoint`` by a run with this ``identity``; None to start fresh (saying why in the log)."""
    try:
        state = load_checkpoint(checkpoint)
    except ValueError as error:
        log.warning("cannot resume from %s (%s): starting fresh", checkpoint, error)
        return None
    if state is not None and state.get("identity") != identity:
        log.info(
            "not resuming from %s: its params or upstream artifacts differ from this run's; starting fresh", checkpoint
        )
        return None
    return state


def _unresumable(checkpoint: os.PathLike, error: Exception) -> str:
    """The error when a run's own checkpoint fails to load after the model took its saved shapes."""
    return (
        f"{checkpoint}: does not load ({first_line(error)}) after the model took its saved shapes; "
        "delete it to start afresh"
    )


def resume(
    checkpoint: os.PathLike,
    state: dict[str, Any] | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    reshaped: bool = False,
) -> tuple[int, list[dict]]:
    """Restore ``model`` and ``optimizer`` from the ``state`` read from ``checkpoint`` (``own_checkpoint``).

    Returns (epochs already done, history so far); (0, []) to start fresh, saying why in the log.
    ``reshaped``: the model already has the checkpoint's shapes (``TrainingHook``), so a
    fresh start is impossible and a state that does not load is a ``UserError``.
    """
    if state is None:
        return 0, []
    try:  # check everything before changing anything, so that a failed resume really starts fresh
        saved, current = state["model"], model.state_dict()
        if set(saved) != set(current) or any(saved[k].shape != v.shape for k, v in current.items()):
            raise ValueError("its weights do not fit the model")
        epoch, history = int(state["epoch"]), list(state["history"])
        optimizer.load_state_dict(state["optimizer"])
        model.load_state_dict(saved)
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as error:
        if reshaped:
            raise UserError(_unresumable(checkpoint, error)) from error
        log.warning("cannot resume from %s (%s): starting fresh", checkpoint, first_line(error))
        return 0, []
    log.info("resuming from %s after epoch %d", checkpoint, epoch)
    return epoch, history


def fit(
    model: nn.Module,
    dataset: Dataset,
    loss_fn: LossFn,
    evaluate_fn: EvaluateFn,
    cfg: TrainingParams,
    *,
    device: torch.device,
    seed: int,
    checkpoint: Path | None = None,
    identity: str = "",
    workers: int = 0,
    amp: bool = False,
    section: str = "training",
    epochs: int | None = None,
    no_decay: Collection[str] = (),
    on_device: OnDevice | None = None,
    hook: TrainingHook | None = None,
    groups: Mapping[str, GroupOptions] | None = None,
) -> list[dict]:
    """Train ``model`` on ``dataset`` for ``epochs`` (default ``cfg.epochs``) and return the history, one row per epoch.

    Each row is ``HISTORY_COLUMNS`` (``steps`` and ``images``: optimizer steps and
    training images so far, over all processes) and what ``evaluate_fn`` returns.
    ``seed`` seeds shuffling, augmentation and the loss's sampling; ``amp`` turns on
    bfloat16 autocast on CUDA; ``workers`` are the loader's processes. With a
    ``checkpoint`` file, the first process saves one after every epoch, and a rerun with
    the same ``identity`` (a hash of everything the results depend on) resumes from it and
    ends with the same weights as an uninterrupted run. ``section`` names the params
    section in error messages. ``no_decay`` names parameters AdamW must not weight-decay,
    ``groups`` those with their own learning-rate multiple, decay and betas (``build_optimizer``);
    ``on_device`` is the data's device-side loading (``DataSplits.on_device``); ``hook``
    (``TrainingHook``) runs around every optimizer step and keeps its state in the checkpoint.
    """
    rank, world_size = world()
    epochs = cfg.epochs if epochs is None else epochs
    micro, accumulate = accumulation(cfg.batch_size, cfg.micro_batch, world_size, section)
    loader = train_loader(dataset, micro, seed, device, workers, on_device)
    steps_per_epoch = len(loader) // accumulate
    if steps_per_epoch == 0:
        raise UserError(f"{section}.batch_size: {cfg.batch_size} is more than the {len(dataset)} training images hold")
    state = own_checkpoint(checkpoint, identity) if checkpoint is not None else None
    reshaped = hook is not None and state is not None
    if reshaped:  # the model's shapes at the checkpoint, before its weights
        try:
            hook.load_state_dict(state["hook"])
        except (KeyError, RuntimeError, ValueError, TypeError) as error:
            raise UserError(_unresumable(checkpoint, error)) from error
    groups = {name: option.for_steps(epochs * steps_per_epoch) for name, option in (groups or {}).items()}
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, no_decay, groups)
    scheduler = build_scheduler(optimizer, epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch, cfg.min_lr)
    start_epoch, history = resume(checkpoint, state, model, optimizer, reshaped)
    network = DistributedDataParallel(model) if world_size > 1 else model

    steps, images_seen = (history[-1]["steps"], history[-1]["images"]) if history else (0, 0)
    bar = progress(desc=section, total=epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch)
    for epoch in range(start_epoch, epochs):
        torch.manual_seed(epoch_seed(seed, epoch) + rank)  # dropout, erasing on the device
        random.seed(epoch_seed(seed, epoch) + rank)  # timm's random erasing draws its boxes here
        loader.sampler.set_epoch(epoch)
        rng = np.random.default_rng(epoch_seed(seed, epoch))  # the same on every process
        model.train()
        loss_sum = 0.0
        micro_batches = iter(loader)
        for step in range(steps_per_epoch):
            scheduler.step_update(epoch * steps_per_epoch + step)
            if hook is not None:
                hook.before_step(epoch + step / steps_per_epoch)
            optimizer.zero_grad(set_to_none=True)
            step_state = rng.bit_generator.state  # every micro-batch of a step samples alike (one subnet)
            step_loss = 0.0
            for index in range(accumulate):
                images, labels = next(micro_batches)
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                rng.bit_generator.state = step_state
                last = index == accumulate - 1
                with autocast(device, amp), nullcontext() if last or world_size == 1 else network.no_sync():
                    loss = loss_fn(network, images, labels, rng)
                    if not torch.isfinite(loss):
                        raise UserError(
                            f"{section}.lr: training diverged (loss {loss.item()}); lower the learning rate"
                        )
                    (loss / accumulate).backward()
                step_loss += loss.item() / accumulate
                images_seen += len(labels) * world_size
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            loss_sum += step_loss
            steps += 1
            if hook is not None and hook.after_step(optimizer, steps, steps_per_epoch) and world_size > 1:
                network = DistributedDataParallel(model)  # DDP holds the parameters it was built with
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{step_loss:.3f}", refresh=False)
        row = {"epoch": epoch + 1, "train_loss": loss_sum / steps_per_epoch, "lr": optimizer.param_groups[0]["lr"]}
        row |= {"steps": steps, "images": images_seen}
        history.append(row | evaluate_fn(model))
        log.info(
            "epoch %d/%d  %s",
            epoch + 1,
            epochs,
            "  ".join(
                f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                for key, value in history[-1].items()
                if key not in ("epoch", "images")
            ),
        )
        if checkpoint is not None and is_first():
            state = {"identity": identity, "epoch": epoch + 1, "history": history}
            state |= {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
            save_checkpoint(checkpoint, state | ({"hook": hook.state_dict()} if hook is not None else {}))
        barrier()
    bar.close()
    if world_size > 1:
        if not weights_in_sync(model):
            raise RuntimeError("DDP processes ended with different weights")
        log.info("weights identical on all %d processes", world_size)
    return history


def validation(loader: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device, amp: bool) -> EvaluateFn:
    """The ``evaluate_fn`` of a plain training run: val top-1 and loss on ``loader``."""

    def validate(network: nn.Module) -> dict[str, float]:
        val = evaluate(network, loader, device, amp, "val")
        return {"val_top1": val["top1"], "val_loss": val["loss"]}

    return validate


def finish(folder: Path) -> None:
    """Remove a run's checkpoints (one per seed where it trains per seed) from ``folder`` once its results
    are written. Only the first process does (the one that wrote them)."""
    if not is_first():
        return
    for path in folder.glob("checkpoint*.pt"):
        path.unlink()
