"""Data sets: digits splits, ImageFolder (ImageNet layout) and CIFAR-10 python batches."""

from __future__ import annotations

import os
import pickle
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch
from PIL import Image

from flora_steps.errors import UserError
from flora_steps.params import DataParams
from flora_steps.runtime.data import (
    SeededSampler,
    build_splits,
    load_digits,
    make_loader,
    random_shift,
    stratified_split,
    train_loader,
)
from flora_steps.runtime.distributed import shard
from flora_steps.runtime.transforms import posterize, training_transform

DATA_CONFIG = {
    "input_size": (3, 32, 32),
    "interpolation": "bilinear",
    "mean": (0.5,) * 3,
    "std": (0.25,) * 3,
    "crop_pct": 0.875,
}
DIGITS_CONFIG = {"input_size": (1, 8, 8), "mean": (0.3,), "std": (0.4,)}


def data_params(**changes) -> DataParams:
    values = dict(
        dataset="digits",
        root=None,
        val_fraction=0.1,
        test_fraction=0.2,
        split_seed=0,
        eval_batch_size=64,
        crop_pct=None,
        shift=1,
        train_transform={},
        skip_unreadable=False,
    )
    return DataParams(**{**values, **changes})


def labels_of(dataset) -> list[int]:
    return [int(label) for _, label in dataset]


def test_digits_splits_are_fixed_stratified_and_disjoint() -> None:
    splits = build_splits(data_params(shift=0), DIGITS_CONFIG, 10)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1293, 144, 360)
    again = build_splits(data_params(shift=0), DIGITS_CONFIG, 10)
    assert torch.equal(splits.test.images, again.test.images)
    other = build_splits(data_params(shift=0, split_seed=1), DIGITS_CONFIG, 10)
    assert not torch.equal(splits.test.images, other.test.images)
    for split in (splits.train, splits.val, splits.test):
        counts = Counter(labels_of(split))
        assert len(counts) == 10 and max(counts.values()) - min(counts.values()) <= 0.05 * len(split) + 2
    rows = {tuple(image.flatten().tolist()) for s in (splits.train, splits.val, splits.test) for image in s.images}
    assert len(rows) >= 1797 - 20  # disjoint up to the few duplicate images digits contains


def test_the_digits_and_their_splits_are_scikit_learns() -> None:
    """Read and split here without importing scikit-learn (a second per stage job): the same images and labels,
    and the same stratified splits as ``train_test_split``, for balanced and unbalanced classes, ties included."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    pixels, target = load_digits()
    reference = sklearn_digits()
    assert np.array_equal(pixels, reference.images) and np.array_equal(target, reference.target)
    rng = np.random.default_rng(0)
    unbalanced = rng.choice(7, size=203, p=[0.4, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05])
    for labels in (target, target[:400], unbalanced, np.repeat(np.arange(3), 5)):
        for fraction in (0.1, 0.2, 0.25, 0.33, 0.5, 0.8):
            for seed in (0, 1, 7):
                try:
                    expected = train_test_split(
                        np.arange(len(labels)), test_size=fraction, stratify=labels, random_state=seed
                    )
                except ValueError:  # too few images for a part to hold every class: refused here too
                    with pytest.raises(UserError, match=f"data.val_fraction: {fraction} cannot split"):
                        stratified_split(labels, fraction, seed)
                    continue
                kept, held_out = stratified_split(labels, fraction, seed)
                assert np.array_equal(kept, np.sort(expected[0])) and np.array_equal(held_out, np.sort(expected[1]))


def test_digits_are_normalised_with_the_model_statistics() -> None:
    splits = build_splits(data_params(shift=0), DIGITS_CONFIG, 10)
    pixels = splits.train.images * 0.4 + 0.3
    assert pixels.min().item() == pytest.approx(0.0, abs=1e-6) and pixels.max().item() == pytest.approx(1.0, abs=1e-6)


def test_random_shift_moves_each_image_within_the_padding() -> None:
    torch.manual_seed(0)
    images = torch.rand(64, 1, 8, 8)
    shifted = random_shift(images, 1, -9.0, torch.randint(0, 3, (2, 64)))
    assert shifted.shape == images.shape
    for original, moved in zip(images, shifted, strict=True):
        matches = [
            (dy, dx)
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if torch.equal(
                moved[0, max(dy, 0) : 8 + min(dy, 0), max(dx, 0) : 8 + min(dx, 0)],
                original[0, max(-dy, 0) : 8 + min(-dy, 0), max(-dx, 0) : 8 + min(-dx, 0)],
            )
        ]
        assert matches
    assert (shifted == -9.0).any()


CPU = torch.device("cpu")


def epoch_images(loader, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image and label one epoch of a training loader gives, concatenated."""
    loader.sampler.set_epoch(epoch)
    images, labels = zip(*loader, strict=True)
    return torch.cat(images), torch.cat(labels)


def test_training_order_and_augmentation_depend_only_on_seed_and_epoch() -> None:
    """Each image's shift comes from its own seed: the batch size, the workers and a resume change nothing."""
    splits = build_splits(data_params(), DIGITS_CONFIG, 10)
    reference = epoch_images(train_loader(splits.train, 100, 3, CPU, 0, None), 1)
    for micro_batch, workers in ((20, 0), (100, 2)):
        loader = train_loader(splits.train, micro_batch, 3, CPU, workers, None)
        epoch_images(loader, 0)  # persistent workers carry no state from one epoch into the next
        images, labels = epoch_images(loader, 1)
        n = len(reference[1])  # full micro-batches only: 20-image batches keep a few more of the last images
        assert torch.equal(labels[:n], reference[1]) and torch.equal(images[:n], reference[0])
    other_epoch, other_seed = (
        epoch_images(train_loader(splits.train, 100, s, CPU, 0, None), e) for s, e in ((3, 2), (4, 1))
    )
    assert not torch.equal(other_epoch[1], reference[1]) and not torch.equal(other_seed[1], reference[1])
    plain = build_splits(data_params(shift=0), DIGITS_CONFIG, 10)
    assert not torch.equal(epoch_images(train_loader(plain.train, 100, 3, CPU, 0, None), 1)[0], reference[0])


def test_seeded_sampler_splits_each_epoch_over_processes() -> None:
    whole = list(SeededSampler(10, seed=1))
    shares = [list(SeededSampler(10, seed=1, rank=rank, world_size=3)) for rank in range(3)]
    assert all(len(share) == 3 for share in shares)
    assert sorted(pair for share in shares for pair in share) == sorted(whole[:9])


def test_evaluation_shards_are_contiguous_and_cover_the_split_in_order(monkeypatch) -> None:
    dataset = list(range(10))
    parts = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        parts.append(list(shard(dataset)))
    assert [len(part) for part in parts] == [3, 3, 4] and [i for part in parts for i in part] == dataset


def make_image_folder(root: Path, classes: int = 3, per_class: int = 10) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 2)):
        for label in range(classes):
            folder = root / split / f"n0{label:07d}"
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")


def test_imagenet_folder_through_the_real_loader(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    splits = build_splits(data_params(dataset="imagenet", root=tmp_path, val_fraction=0.2), DATA_CONFIG, 3)
    assert splits.num_classes == 3
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 6, 6)
    assert Counter(labels_of(splits.val)) == {0: 2, 1: 2, 2: 2}
    images, labels = next(iter(train_loader(splits.train, 8, 0, CPU, 0, splits.on_device)))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    test_image, _ = splits.test[0]
    assert test_image.shape == (3, 32, 32) and test_image.dtype == torch.uint8  # what crosses to the device


def test_real_images_travel_as_uint8_and_are_normalised_on_the_device(tmp_path: Path) -> None:
    """The loader's batches equal timm's float transform (normalisation on the host) image for image."""
    make_image_folder(tmp_path)
    splits = build_splits(data_params(dataset="imagenet", root=tmp_path, val_fraction=0.2), DATA_CONFIG, 3)
    on_host = timm.data.create_transform(**DATA_CONFIG, is_training=False)
    images, _ = next(iter(make_loader(splits.test, 6, CPU, 0, splits.on_device)))
    expected = torch.stack([on_host(splits.test.dataset[i][0]) for i in range(6)])
    assert torch.allclose(images, expected, atol=1e-5)


def test_real_training_augmentation_is_reproducible_across_workers_and_resumes(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    params = data_params(dataset="imagenet", root=tmp_path, val_fraction=0.2, train_transform=PAPER_AUGMENTATION)
    splits = build_splits(params, DATA_CONFIG, 3)
    assert splits.on_device.erasing == {"re_prob": 0.25}  # done on the device, after normalisation
    reference = epoch_images(train_loader(splits.train, 8, 5, CPU, 0, None), 1)[0]
    loader = train_loader(splits.train, 4, 5, CPU, 2, None)
    epoch_images(loader, 0)
    assert torch.equal(epoch_images(loader, 1)[0], reference)


def test_eval_crop_follows_data_crop_pct(tmp_path: Path) -> None:
    """The paper evaluates at resize 248, centre crop 224: crop_pct 0.9."""
    make_image_folder(tmp_path)
    config = DATA_CONFIG | {"input_size": (3, 224, 224)}
    splits = build_splits(data_params(dataset="imagenet", root=tmp_path, val_fraction=0.2, crop_pct=0.9), config, 3)
    resize = splits.test.transform.transforms[0]
    assert resize.size in (248, [248], (248, 248)) and splits.test[0][0].shape == (3, 224, 224)


def test_imagenet_folder_whose_splits_disagree_on_classes_is_refused(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    (tmp_path / "val" / "n00000002").rename(tmp_path / "val" / "n00000009")
    with pytest.raises(
        UserError,
        match=r"must hold the same classes \(only in val/: \['n00000009'\]; missing from val/: \['n00000002'\]\)",
    ):
        build_splits(data_params(dataset="imagenet", root=tmp_path, val_fraction=0.2), DATA_CONFIG, 3)


def test_class_count_must_match_the_model(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    with pytest.raises(UserError, match="model.num_classes: the model has 2 classes, the imagenet data at .* 3"):
        build_splits(data_params(dataset="imagenet", root=tmp_path, val_fraction=0.2), DATA_CONFIG, 2)


@pytest.mark.parametrize(("key", "fraction"), [("val_fraction", 0.001), ("test_fraction", 0.003)])
def test_a_fraction_that_leaves_a_class_out_of_a_split_is_refused(key: str, fraction: float) -> None:
    with pytest.raises(UserError, match=f"data.{key}: {fraction} "):
        build_splits(data_params(**{key: fraction}), DIGITS_CONFIG, 10)


def test_unreadable_images_stop_the_stage_or_are_skipped_and_counted(tmp_path: Path, caplog) -> None:
    make_image_folder(tmp_path)
    truncated = tmp_path / "train/n00000001/3.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:-50])  # a download cut short: header intact, end marker lost
    (tmp_path / "train/n00000002/notes.jpg").write_text("not an image")
    params = data_params(dataset="imagenet", root=tmp_path, val_fraction=0.2)
    with pytest.raises(UserError, match=r"data.root: .*n00000001/3.jpg: JPEG file cut short .*2 unreadable images"):
        build_splits(params, DATA_CONFIG, 3)
    splits = build_splits(data_params(**{**params.model_dump(), "skip_unreadable": True}), DATA_CONFIG, 3)
    assert len(splits.train) + len(splits.val) == 30  # the two bad files left out
    assert "left out 2 unreadable images" in caplog.text


def write_cifar(folder: Path, per_batch: int = 20) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [i % 10 for i in range(per_batch)],
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"{i}.png".encode() for i in range(per_batch)],
        }
        with (folder / name).open("wb") as file:
            pickle.dump(batch, file, protocol=2)


def test_cifar10_python_batches_through_the_real_loader(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar-10-batches-py")
    splits = build_splits(data_params(dataset="cifar10", root=tmp_path), DATA_CONFIG, 10)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (90, 10, 20)
    assert sorted(labels_of(splits.val)) == list(range(10))
    image, label = splits.test[3]
    assert image.shape == (3, 32, 32) and label == 3


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_batch_with_pickled_code_is_refused(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    with (tmp_path / "data_batch_3").open("wb") as file:
        pickle.dump({b"data": _Exploit(), b"labels": []}, file)
    with pytest.raises(UserError, match=r"data_batch_3 is not a CIFAR-10 python batch \(refusing to load posix.system"):
        build_splits(data_params(dataset="cifar10", root=tmp_path), DATA_CONFIG, 10)


@pytest.mark.parametrize("dataset", ["imagenet", "cifar10"])
def test_missing_data_directory_is_a_clear_error(tmp_path: Path, dataset: str) -> None:
    with pytest.raises(UserError, match="data.root: .*not found"):
        build_splits(data_params(dataset=dataset, root=tmp_path / "nowhere"), DATA_CONFIG, 10)


PAPER_AUGMENTATION = {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "interpolation": "bicubic"}


def run_transform(transform, images: int, size: int) -> int:
    """Apply ``transform`` to ``images`` random images (seeded) cropped to ``size`` px; the number of errors."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    pixels = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    errors = 0
    for _ in range(images):
        try:
            out = transform(Image.fromarray(pixels))
        except ValueError:
            errors += 1
        else:
            assert out.shape == (3, size, size) and torch.isfinite(out).all()
    return errors


def test_the_papers_train_transform_runs_on_thousands_of_images() -> None:
    """RandAugment m9-mstd0.5-inc1 asks posterize for 0 bits now and then, which the pinned Pillow rejects.

    Which operations and magnitudes RandAugment draws does not depend on the image size, so the
    images are cropped to 32 px rather than 224: the same draws at a fraction of the cost.
    """
    config = {"input_size": (3, 32, 32), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    assert run_transform(timm.data.create_transform(**config, is_training=True, **PAPER_AUGMENTATION), 3000, 32) > 0
    assert run_transform(training_transform(config, PAPER_AUGMENTATION), 3000, 32) == 0


def test_posterize_to_zero_bits_is_a_black_image_as_before_pillow_13() -> None:
    image = Image.fromarray(np.full((4, 4, 3), 200, dtype=np.uint8))
    assert np.asarray(posterize(image, 0)).max() == 0
    assert np.array_equal(np.asarray(posterize(image, 1)), np.full((4, 4, 3), 128))
    assert posterize(image, 8) is image
