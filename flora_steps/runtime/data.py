"""Data sets and their fixed, stratified train / val / test splits.

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images), split
  into test, val and train by stratified sampling with ``split_seed``.
- ``imagenet``: an ImageFolder tree ``root/train/<class>/*`` and ``root/val/<class>/*``;
  test is ``val/``, and val is a stratified hold-out of ``train/``. Both must hold the
  same classes (one class-to-index mapping), and every image is checked before use.
- ``cifar10``: the standard python batches (``data_batch_1..5``, ``test_batch``) in
  ``root`` or ``root/cifar-10-batches-py``; val is a stratified hold-out of train.
  The batches are read with an unpickler that only admits plain containers and
  NumPy arrays, so a tampered file cannot run code.

Real data uses timm's train and eval transforms for the model's input config, made
to end in uint8 tensors: a loader moves uint8 batches (a quarter of float32's bytes)
and normalises them on the device, where it also does the training split's random
erasing (timm's ``PrefetchLoader``). Workers stay alive across epochs.

Training loaders draw ``(index, augmentation seed)`` pairs (``SeededSampler``): each
image's augmentation is a function of the run's seed, the epoch and the image, not
of which worker loads it, how many workers or processes there are, or whether the
run was resumed.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import pickle
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm.data
import torch
from PIL import Image
from timm.data.loader import PrefetchLoader
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision import datasets

from ..errors import UserError
from ..params import DataParams
from .distributed import shard, world
from .image_check import unreadable_images
from .transforms import training_transform

log = logging.getLogger(__name__)


#: A dataset key: an image's index, or (index, augmentation seed) from ``SeededSampler``.
Key = int | tuple[int, int]


@dataclass(frozen=True)
class OnDevice:
    """The last steps of loading done on the device: uint8 to normalised float, and the training split's erasing."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    erasing: dict[str, Any] = field(default_factory=dict)  # PrefetchLoader's re_prob, re_mode, re_count


@dataclass(frozen=True)
class DataSplits:
    """The three splits of one data set, plus the train split without augmentation."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    train_plain: Dataset  # the train images with the eval transform (for scoring, not training)
    on_device: OnDevice | None = None  # None: the splits already give normalised float tensors


def _approximate_mode(counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """How many of ``draws`` to take from each class of ``counts``: the floor of its share, and one more for the
    largest remainders, ties broken by ``rng`` (scikit-learn's ``_approximate_mode``)."""
    continuous = counts / counts.sum() * draws
    taken = np.floor(continuous)
    missing = int(draws - taken.sum())
    remainder = continuous - taken
    for value in np.sort(np.unique(remainder))[::-1]:
        if missing <= 0:
            break
        (tied,) = np.where(remainder == value)
        chosen = rng.choice(tied, size=min(len(tied), missing), replace=False)
        taken[chosen] += 1
        missing -= len(chosen)
    return taken.astype(int)


def _stratified_indices(labels: np.ndarray, held: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (kept, held-out) indices that scikit-learn's ``train_test_split(stratify=labels, random_state=seed)``
    returns for ``held`` held-out images, the same draws in the same order (``StratifiedShuffleSplit``)."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    by_class = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    kept_counts = _approximate_mode(counts, len(labels) - held, rng)
    held_counts = _approximate_mode(counts - kept_counts, held, rng)
    kept, held_out = [], []
    for members, keep, hold in zip(by_class, kept_counts, held_counts, strict=True):
        shuffled = members.take(rng.permutation(len(members)), mode="clip")
        kept.extend(shuffled[:keep])
        held_out.extend(shuffled[keep : keep + hold])
    return np.asarray(kept, dtype=int), np.asarray(held_out, dtype=int)


def stratified_split(
    labels: Sequence[int], fraction: float, seed: int, key: str = "data.val_fraction"
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out), holding out ``fraction`` of every class, deterministic per seed: scikit-learn's
    stratified ``train_test_split``, computed here (importing scikit-learn costs each stage job about a second).

    Both parts must hold every class; otherwise a ``UserError`` names ``key``, the params key of ``fraction``.
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    held = math.ceil(fraction * len(labels))
    smaller = min(held, len(labels) - held)
    if counts.min() < 2 or smaller < len(classes):
        reason = f"a class has {counts.min()} image" if counts.min() < 2 else f"{smaller} images for one part"
        raise UserError(
            f"{key}: {fraction} cannot split {len(labels)} images of {len(classes)} classes ({reason}; each part "
            "needs one image of every class)"
        )
    kept, held_out = _stratified_indices(labels, held, seed)
    for part, name in ((held_out, "held-out"), (kept, "remaining")):
        missing = np.setdiff1d(classes, labels[part])
        if missing.size:
            raise UserError(
                f"{key}: {fraction} leaves the {name} part without any image of class {missing[0]}; "
                "every split needs each class"
            )
    return np.sort(kept), np.sort(held_out)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Python's, NumPy's and torch's CPU generators (what timm's and torchvision's transforms draw from:
    RandAugment picks its ops with NumPy) seeded inside.

    All three are restored afterwards, so loading in the main process leaves the
    training loop's own random streams alone.
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class SeededSampler(Sampler[tuple[int, int]]):
    """One process's shuffled ``(index, augmentation seed)`` pairs for an epoch, full global batches only.

    The order and every image's seed depend only on ``seed`` and the epoch
    (``set_epoch``); process ``rank`` of ``world_size`` takes every ``world_size``-th
    pair, like ``DistributedSampler``.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.seed, self.rank, self.world_size, self.epoch = size, seed, rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.size)[: len(self) * self.world_size]
        seeds = rng.integers(0, 2**62, size=self.size)
        mine = order[self.rank :: self.world_size]
        return iter(zip(mine.tolist(), seeds[mine].tolist(), strict=True))


class Transformed(Dataset):
    """A view of ``dataset`` with ``transform`` applied to each image (seeded by the key's seed, if any)."""

    def __init__(self, dataset: Dataset, transform: Callable) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Key) -> tuple[Any, Any]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, label = self.dataset[index]
        if seed is None:
            return self.transform(image), label
        with seeded(seed):
            return self.transform(image), label


def _split(dataset: Dataset, indices: np.ndarray, transform: Callable) -> Transformed:
    return Transformed(Subset(dataset, indices.tolist()), transform)


class ShiftedImages(Dataset):
    """In-memory images (N, C, H, W) with an optional random shift of up to ``shift`` pixels.

    The shift pads with ``fill`` and crops back, like ``RandomCrop(size, padding)``,
    but a whole batch at a time (DataLoader's ``__getitems__``): per-image transforms
    would cost more than the tiny model's training step. Each image's offset comes
    from its key's augmentation seed (``SeededSampler``); keys without one are not shifted.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, shift: int = 0, fill: float = 0.0) -> None:
        self.images, self.labels, self.shift, self.fill = images, labels, shift, fill

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, int]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[Key]) -> list[tuple[torch.Tensor, int]]:
        seeded_keys = bool(keys) and isinstance(keys[0], tuple)
        indices = [key[0] for key in keys] if seeded_keys else keys
        images = self.images[indices]
        if self.shift and seeded_keys:
            span = 2 * self.shift + 1  # a seed is uniform over [0, 2**62): its digits in base span are the offset
            seeds = torch.tensor([key[1] for key in keys])
            images = random_shift(images, self.shift, self.fill, torch.stack([seeds % span, seeds // span % span]))
        return list(zip(images.unbind(0), self.labels[indices].tolist(), strict=True))


def random_shift(images: torch.Tensor, shift: int, fill: float, offsets: torch.Tensor) -> torch.Tensor:
    """Shift each image of a batch by its offset; ``offsets`` (2, batch) holds (top, left) in [0, 2·shift]."""
    batch, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (shift,) * 4, value=fill)
    top, left = offsets[:, :, None]
    rows = (top + torch.arange(height))[:, :, None]
    cols = (left + torch.arange(width))[:, None, :]
    return padded[torch.arange(batch)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled handwritten digits: 1,797 images of 8 x 8 pixels in 0 ... 16, and their labels, as
    ``sklearn.datasets.load_digits`` reads them, from its data file (importing scikit-learn costs about a second)."""
    package = importlib.util.find_spec("sklearn")
    path = Path(package.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if package else None
    if path is None or not path.is_file():
        raise UserError("data.dataset: digits needs scikit-learn's bundled digits.csv.gz; install scikit-learn")
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def digits_splits(params: DataParams, data_config: dict[str, Any]) -> DataSplits:
    """Digits scaled to [0, 1] and normalised with the model's mean/std; random shift on train."""
    pixels, target = load_digits()
    mean, std = data_config["mean"][0], data_config["std"][0]
    images = (torch.tensor(pixels / 16.0, dtype=torch.float32).unsqueeze(1) - mean) / std
    labels = torch.tensor(target)
    rest, test = stratified_split(target, params.test_fraction, params.split_seed, "data.test_fraction")
    train, val = (rest[i] for i in stratified_split(target[rest], params.val_fraction, params.split_seed))
    background = -mean / std
    return DataSplits(
        train=ShiftedImages(images[train], labels[train], params.shift, background),
        val=ShiftedImages(images[val], labels[val]),
        test=ShiftedImages(images[test], labels[test]),
        num_classes=10,
        train_plain=ShiftedImages(images[train], labels[train]),
    )


class Cifar10Batches(Dataset):
    """CIFAR-10 from its python batches, read without executing pickled code."""

    TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
    TEST_FILES = ("test_batch",)

    def __init__(self, root: Path, train: bool) -> None:
        folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
        images, labels = [], []
        for name in self.TRAIN_FILES if train else self.TEST_FILES:
            batch = _read_batch(folder / name)
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(int(label) for label in batch[b"labels"])
        self.images = np.concatenate(images).transpose(0, 2, 3, 1)  # N, H, W, C
        self.targets = labels

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), self.targets[index]


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickler that admits NumPy array reconstruction (and bytes decoding) and nothing else."""

    ALLOWED = {
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_batch(path: Path) -> dict[bytes, Any]:
    if not path.is_file():
        raise UserError(f"data.root: CIFAR-10 batch file not found: {path}")
    try:
        with path.open("rb") as file:
            batch = _ArraysOnlyUnpickler(file, encoding="bytes").load()
        if not isinstance(batch, dict) or not {b"data", b"labels"} <= set(batch):
            raise ValueError("missing data or labels")
        data = np.asarray(batch[b"data"])
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(batch[b"labels"]):
            raise ValueError(f"data of shape {data.shape} for {len(batch[b'labels'])} labels, expected (labels, 3072)")
        if any(not 0 <= int(label) < 10 for label in batch[b"labels"]):
            raise ValueError("labels outside 0..9")
    except Exception as error:  # noqa: BLE001 - any failure means the file is not a CIFAR batch
        raise UserError(f"data.root: {path} is not a CIFAR-10 python batch ({error})") from None
    return batch


def _image_folder(path: Path, skip_unreadable: bool) -> datasets.ImageFolder:
    """An ImageFolder tree whose every image was checked (``image_check``) before use.

    Unreadable files stop the stage with one line naming the first, or with
    ``skip_unreadable`` are left out and counted in the log.
    """
    if not path.is_dir():
        raise UserError(f"data.root: directory not found: {path}")
    try:
        folder = datasets.ImageFolder(str(path))
    except FileNotFoundError as error:
        raise UserError(f"data.root: {path} is not an ImageFolder tree ({error})") from None
    bad = unreadable_images([file for file, _ in folder.samples])
    if bad and not skip_unreadable:
        first = min(bad)
        raise UserError(
            f"data.root: {first}: {bad[first]} ({len(bad)} unreadable image{'s' if len(bad) > 1 else ''} "
            f"in {path}; data.skip_unreadable: true leaves them out)"
        )
    if bad:
        log.warning("data.skip_unreadable: left out %d unreadable images of %s, e.g. %s", len(bad), path, min(bad))
        folder.samples = [sample for sample in folder.samples if sample[0] not in bad]
        folder.imgs = folder.samples
        folder.targets = [target for _, target in folder.samples]
    return folder


def build_splits(params: DataParams, data_config: dict[str, Any], num_classes: int) -> DataSplits:
    """The data set of ``params`` as train / val / test, for a model with ``num_classes`` outputs.

    ``data_config`` is timm's resolved input config of the model (input_size, mean,
    std, interpolation, crop_pct); val images get the eval transform. Every split uses
    the training split's class-to-index mapping, and the data's class count must
    equal ``num_classes``.
    """
    splits = _build_splits(params, data_config)
    if splits.num_classes != num_classes:
        where = "" if params.root is None else f" at {params.root}"
        raise UserError(
            f"model.num_classes: the model has {num_classes} classes, the {params.dataset} data{where} "
            f"{splits.num_classes}"
        )
    return splits


def _build_splits(params: DataParams, data_config: dict[str, Any]) -> DataSplits:
    if params.dataset == "digits":
        return digits_splits(params, data_config)
    root = params.root
    if root is None or not root.is_dir():
        raise UserError(f"data.root: directory not found: {root}")
    if params.crop_pct is not None:
        data_config = data_config | {"crop_pct": params.crop_pct}
    options = dict(params.train_transform)
    erasing = {key: options.pop(key) for key in ("re_prob", "re_mode", "re_count") if key in options}
    train_transform = training_transform(data_config, options | {"use_prefetcher": True})
    eval_transform = timm.data.create_transform(**data_config, is_training=False, use_prefetcher=True)
    if params.dataset == "imagenet":
        full_train = _image_folder(root / "train", params.skip_unreadable)
        test = _image_folder(root / "val", params.skip_unreadable)
        if test.classes != full_train.classes:  # ImageFolder maps sorted class names to indices
            extra = sorted(set(test.classes) - set(full_train.classes))
            missing = sorted(set(full_train.classes) - set(test.classes))
            raise UserError(
                f"data.root: {root / 'val'} and {root / 'train'} must hold the same classes "
                f"(only in val/: {extra[:5]}; missing from val/: {missing[:5]})"
            )
        num_classes = len(full_train.classes)
    else:
        full_train, test = Cifar10Batches(root, train=True), Cifar10Batches(root, train=False)
        num_classes = 10
    train, val = stratified_split(full_train.targets, params.val_fraction, params.split_seed)
    return DataSplits(
        train=_split(full_train, train, train_transform),
        val=_split(full_train, val, eval_transform),
        test=Transformed(test, eval_transform),
        num_classes=num_classes,
        train_plain=_split(full_train, train, eval_transform),
        on_device=OnDevice(tuple(data_config["mean"]), tuple(data_config["std"]), erasing),
    )


class KeyedSubset(Dataset):
    """``Subset`` for any ``Key``: the index maps into ``indices``, an augmentation seed passes through."""

    def __init__(self, dataset: Dataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def _key(self, key: Key) -> Key:
        return (self.indices[key[0]], key[1]) if isinstance(key, tuple) else self.indices[key]

    def __getitem__(self, key: Key) -> tuple[Any, Any]:
        return self.dataset[self._key(key)]

    def __getitems__(self, keys: list[Key]) -> list[tuple[Any, Any]]:
        mapped = [self._key(key) for key in keys]
        if hasattr(self.dataset, "__getitems__"):
            return self.dataset.__getitems__(mapped)
        return [self.dataset[key] for key in mapped]


def fixed_subset(dataset: Dataset, size: int, seed: int) -> Dataset:
    """``size`` images of ``dataset`` drawn once with ``seed`` (all of it when smaller); a training split's
    subset keeps its per-image augmentation seeds."""
    if size >= len(dataset):
        return dataset
    indices = np.sort(np.random.default_rng(seed).choice(len(dataset), size, replace=False))
    return KeyedSubset(dataset, indices.tolist())


def partition(dataset: Dataset, size: int, seed: int) -> tuple[Dataset, Dataset]:
    """``size`` images of ``dataset`` drawn once with ``seed`` (all of it when smaller), and the others."""
    order = np.random.default_rng(seed).permutation(len(dataset))
    return tuple(KeyedSubset(dataset, np.sort(part).tolist()) for part in (order[:size], order[size:]))


def default_workers() -> int:
    """Loader workers per process when ``compute.workers`` is null: the CPUs this job was given, shared
    by the processes ``torchrun`` started on this node, less one each for the training loop."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(len(os.sched_getaffinity(0)) // processes - 1, 0)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    workers: int,
    on_device: OnDevice | None = None,
    sampler: SeededSampler | None = None,
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``dataset`` on ``device``: for training, in ``sampler``'s order and full micro-batches only;
    otherwise in order, and under ``torchrun`` only this process's share (``distributed.shard``).

    Workers (``workers``, 0: the main process) live as long as the loader; host
    memory is pinned for a CUDA device. With ``on_device`` (real data), batches
    travel as uint8 and become normalised floats on ``device`` (plus random erasing
    when training), as timm's training script does.
    """
    training = sampler is not None
    loader = DataLoader(
        dataset if training else shard(dataset),
        batch_size=batch_size,
        sampler=sampler,
        drop_last=training,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
    )
    if on_device is None:
        return loader
    erasing = on_device.erasing if training else {}
    return PrefetchLoader(loader, on_device.mean, on_device.std, len(on_device.mean), device, **erasing)


def train_loader(
    dataset: Dataset, micro_batch: int, seed: int, device: torch.device, workers: int, on_device: OnDevice | None
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled micro-batches of ``dataset`` with per-image augmentation seeds; under ``torchrun`` each
    process draws its share of every epoch. Call ``loader.sampler.set_epoch(epoch)`` before each epoch."""
    rank, world_size = world()
    sampler = SeededSampler(len(dataset), seed, rank, world_size)
    return make_loader(dataset, micro_batch, device, workers, on_device, sampler)
