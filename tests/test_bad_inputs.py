"""A table of bad inputs, by family (params, data, artifacts).

Each case runs a stage command and checks what a user sees: exit status 2, exactly
one error line that names the key or the file, no traceback (an unexpected
exception fails the test), and no new files in the working directory.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import set_key, write_params
from PIL import Image

from flora_steps.cli import main
from flora_steps.pipeline.catalogue import stage_for


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def run_rejected(command: list[str], folder: Path, capsys, expected: str) -> None:
    before = files_under(folder)
    capsys.readouterr()
    assert main(command) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and expected in errors[0], errors
    assert files_under(folder) == before


class Exploit:
    """A pickle that would run a shell command if it were ever unpickled."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


# ---------------------------------------------------------------- params
PARAMS_CASES: list[tuple[str, object, str]] = [
    ("seed", -1, "seed: input should be greater than or equal to 0"),
    ("seed", 2**40, "seed: input should be less than 4294967296"),
    ("seed", True, "seed: a boolean is not accepted here"),
    ("seed", "zero", "seed: input should be a valid integer"),
    ("data.split_seed", -1, "data.split_seed: input should be greater than or equal to 0"),
    ("data.val_fraction", 0.0, "data.val_fraction: input should be greater than 0"),
    ("data.val_fraction", 1.0, "data.val_fraction: input should be less than 1"),
    ("data.val_fraction", 0.001, "data.val_fraction: 0.001 cannot split 1437 images of 10 classes"),
    ("data.test_fraction", 0.003, "data.test_fraction: 0.003 cannot split 1797 images of 10 classes"),
    ("data.dataset", "mnist", "data.dataset: input should be 'digits', 'imagenet' or 'cifar10'"),
    ("data.eval_batch_size", 0, "data.eval_batch_size: input should be greater than or equal to 1"),
    ("data.skip_unreadable", "sometimes", "data.skip_unreadable: input should be a valid boolean"),
    ("model.num_classes", 5, "model.num_classes: 5, but data.dataset digits has 10 classes"),
    ("model.name", "vit_nonexistent", "model.name: unknown timm model 'vit_nonexistent'"),
    ("model.kwargs", {"embed_dim": 63}, "model.kwargs: {'embed_dim': 63} not accepted by vit_digits"),
    ("model.kwargs", {"no_such_argument": 1}, "unexpected keyword argument 'no_such_argument'"),
    ("model.checkpoint", "missing.pth", "model.checkpoint: file not found: missing.pth"),
    ("model.kwargs", {"checkpoint_path": "evil.pth"}, "model.kwargs: {'checkpoint_path': 'evil.pth'} not accepted"),
    ("pretrain.epochs", True, "pretrain.epochs: a boolean is not accepted here"),
    ("pretrain.epochs", -1, "pretrain.epochs: input should be greater than or equal to 0"),
    ("pretrain.lr", 0, "pretrain.lr: input should be greater than 0"),
    ("pretrain.lrr", 0.1, "pretrain.lrr: unknown key (did you mean 'lr'?)"),
    ("pretrain.label_smoothing", 1.0, "pretrain.label_smoothing: input should be less than 1"),
    ("filter.ratios", [0.5, True], "filter.ratios: a boolean is not accepted here"),
    ("filter.ratios", [], "filter.ratios: list should have at least 1 item"),
    ("supernet.sampling", "greedy", "supernet.sampling: input should be 'lowrank' or 'uniform'"),
    ("supernet.epochs", 0, "supernet.epochs: input should be greater than or equal to 1"),
    ("budgets.search", [0.5, 1.2], "budgets.search.1: input should be less than or equal to 1"),
    ("budgets.uniform", [0.5, 0.8, 1], "budgets.uniform.2: write 1 as 1.0"),
    ("budgets.uniform", [0.8], "budgets: uniform must include every search budget (missing [0.5])"),
    (
        "search.band",
        0.5,
        "search.band: 0.5 must be below every budget of budgets.search, ofb, slim_flora and ofb_flora",
    ),
    ("budgets.slim_flora", [0.6], "budgets: slim_flora: [0.6] not below slim_base 0.5"),
    ("budgets.uniform", [0.49, 0.5, 0.8], "budgets.uniform: the lowest budget (0.49) must lie at or below"),
    ("slim.attention_weight", -1, "slim.attention_weight: input should be greater than or equal to 0"),
    ("slim.epochs", 0, "slim.epochs: input should be greater than or equal to 1"),
    ("budgets.slim", [0.5, 0.5], "budgets: slim lists a budget twice"),
    ("budgets.latency", [0.9, 1.5], "budgets: latency: 1.5 is above 1: with latency_unit fraction a budget is a share"),
    ("budgets.latency", [0.0], "budgets.latency.0: input should be greater than 0"),
    ("budgets.latency_unit", "seconds", "budgets.latency_unit: input should be 'fraction' or 'ms'"),
    ("retrain.table_repeats", 0, "retrain.table_repeats: input should be greater than or equal to 1"),
    ("search.top_k", 20, "search: top_k (20) must not exceed population"),
    ("retrain.latency_repeats", 0, "retrain.latency_repeats: input should be greater than or equal to 1"),
    ("retrain.seeds", [], "retrain.seeds: list should have at least 1 item after validation"),
    ("retrain.seeds", [0, 1, 0], "retrain.seeds: lists a seed twice: [0, 1, 0]"),
    ("retrain.seeds", [0, -1], "retrain.seeds.1: input should be greater than or equal to 0"),
    ("retrain.uniform_epochs", -1, "retrain.uniform_epochs: input should be greater than or equal to 0"),
    ("compute.device", "tpu", "compute.device: input should be 'auto', 'cpu' or 'cuda'"),
    ("extra_section", {}, "extra_section: unknown key"),
]


@pytest.mark.parametrize(("key", "value", "message"), PARAMS_CASES, ids=[f"{k}={v!r}" for k, v, _ in PARAMS_CASES])
def test_bad_params(workdir: Path, smoke_params: dict, capsys, key: str, value, message: str) -> None:
    if key == "pretrain.lrr":
        smoke_params["pretrain"].pop("lr")
    if key == "model.checkpoint":
        smoke_params["pretrain"]["epochs"] = 0
    (workdir / "evil.pth").write_bytes(pickle.dumps(Exploit()))  # refused, never run
    path = write_params(workdir / "params.yaml", set_key(smoke_params, key, value))
    run_rejected(["pretrain", "--params", str(path)], workdir, capsys, message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable GPU")
def test_a_gpu_profile_without_a_gpu_is_one_clear_line(workdir: Path, smoke_params: dict, capsys) -> None:
    path = write_params(workdir / "params.yaml", set_key(smoke_params, "compute.device", "cuda"))
    run_rejected(["pretrain", "--params", str(path)], workdir, capsys, "compute.device: cuda requested, but PyTorch")


def test_a_stage_that_is_not_distributed_refuses_several_processes(
    workdir: Path, smoke_params: dict, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    path = write_params(workdir / "params.yaml", smoke_params)
    message = (
        "decompose runs as one process, but torchrun started 2 (WORLD_SIZE=2); "
        "only filter, supernet, search, slim, ofb, base, retrain run under torchrun"
    )
    run_rejected(["decompose", "--params", str(path)], workdir, capsys, message)


def test_a_baseline_on_another_base_is_one_clear_line(workdir: Path, smoke_params: dict, capsys) -> None:
    path = write_params(workdir / "params.yaml", smoke_params)
    command = ["retrain", "--method", "control", "--base", "slim", "--budget", "0.4", "--params", str(path)]
    run_rejected(command, workdir, capsys, "--base slim: retrain --method control runs on the dense model only")


def test_bad_params_files(workdir: Path, capsys) -> None:
    (workdir / "binary.yaml").write_bytes(bytes(range(256)))
    (workdir / "list.yaml").write_text("- seed\n")
    (workdir / "broken.yaml").write_text("seed: [0\n")
    for path, message in (
        (workdir, "is a directory, expected a params YAML file"),
        (workdir / "binary.yaml", "not UTF-8 text, expected a params YAML file"),
        (workdir / "list.yaml", "expected a mapping of sections, got list"),
        (workdir / "broken.yaml", "not valid YAML"),
        (workdir / "missing.yaml", "params file not found"),
    ):
        run_rejected(["pretrain", "--params", str(path)], workdir, capsys, f"{path}: {message}")


# ---------------------------------------------------------------- data
def image_folder(root: Path, classes: int = 3, train: int = 10, val: int = 2) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for label in range(classes):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for index in range(count):
                Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"{index}.jpg")


def cifar(root: Path, data: Callable[[int], np.ndarray] | None = None, labels: list[int] | None = None) -> None:
    root.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"labels": labels if labels is not None else [i % 10 for i in range(20)],
            b"data": data(20) if data else np.zeros((20, 3072), dtype=np.uint8),
        }
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))


def cut(path: Path, drop: int) -> None:
    """Lose the last ``drop`` bytes, as a download cut short."""
    path.write_bytes(path.read_bytes()[:-drop])


DATA_CASES: dict[str, tuple[Callable[[Path], None], dict, str]] = {
    "val class missing": (
        lambda r: (image_folder(r), shutil.rmtree(r / "val/class2")),
        {},
        "must hold the same classes (only in val/: []; missing from val/: ['class2'])",
    ),
    "extra val class": (
        lambda r: (image_folder(r), shutil.copytree(r / "val/class0", r / "val/class9")),
        {},
        "must hold the same classes (only in val/: ['class9']",
    ),
    "truncated jpeg": (
        lambda r: (image_folder(r), cut(r / "train/class1/3.jpg", 50)),
        {},
        "class1/3.jpg: JPEG file cut short",
    ),
    "text named .jpg": (
        lambda r: (image_folder(r), (r / "val/class0/0.jpg").write_text("hello")),
        {},
        "class0/0.jpg: not an image PIL can identify",
    ),
    "class count vs model": (image_folder, {"num_classes": 4}, "model.num_classes: the model has 4 classes"),
    "no train folder": (lambda r: r.mkdir(), {}, "data.root: directory not found"),
    "empty class folders": (
        lambda r: [(r / s / "class0").mkdir(parents=True) for s in ("train", "val")],
        {},
        "is not an ImageFolder tree",
    ),
    "cifar wrong data length": (
        lambda r: cifar(r, data=lambda n: np.zeros((n, 3000), dtype=np.uint8)),
        {"dataset": "cifar10"},
        "data_batch_1 is not a CIFAR-10 python batch (data of shape (20, 3000)",
    ),
    "cifar label out of range": (
        lambda r: cifar(r, labels=[12] * 20),
        {"dataset": "cifar10"},
        "is not a CIFAR-10 python batch (labels outside 0..9)",
    ),
    "cifar batch missing": (
        lambda r: (cifar(r), (r / "test_batch").unlink()),
        {"dataset": "cifar10"},
        "CIFAR-10 batch file not found",
    ),
    "cifar not a pickle": (
        lambda r: (cifar(r), (r / "data_batch_2").write_text("plain text")),
        {"dataset": "cifar10"},
        "data_batch_2 is not a CIFAR-10 python batch",
    ),
    "cifar pickled code": (
        lambda r: (cifar(r), (r / "data_batch_4").write_bytes(pickle.dumps({b"data": print, b"labels": []}))),
        {"dataset": "cifar10"},
        "data_batch_4 is not a CIFAR-10 python batch (refusing to load builtins.print)",
    ),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data(tmp_path: Path, smoke_params: dict, capsys, monkeypatch, case: str) -> None:
    make, changes, message = DATA_CASES[case]
    data = tmp_path / "data"
    make(data)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    smoke_params["data"].update(dataset=changes.get("dataset", "imagenet"), root=str(data))
    smoke_params["model"]["num_classes"] = changes.get("num_classes", 3 if "dataset" not in changes else 10)
    smoke_params["pretrain"]["epochs"] = 0
    path = write_params(tmp_path / "params.yaml", smoke_params)
    run_rejected(["pretrain", "--params", str(path)], work, capsys, message)


# ---------------------------------------------------------------- artifacts
def edit_csv(path: Path, change: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    change(pd.read_csv(path)).to_csv(path, index=False)


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def space_rank_above_full(space: dict) -> None:
    space["blocks"][0]["choices"][1][0] = 65


def pickle_in_kwargs(spec: dict, folder: Path) -> None:
    (folder / "evil.pth").write_bytes(pickle.dumps(Exploit()))
    spec["model_kwargs"]["checkpoint_path"] = str(folder / "evil.pth")


ARTIFACT_CASES: dict[str, tuple[str, Callable[[Path], None], list[str], str]] = {
    "model.json not JSON": (
        "pretrain/model.json",
        lambda p: p.write_text("{"),
        ["decompose"],
        "pretrain/model.json: corrupt model description, not valid JSON",
    ),
    "model.json unknown model": (
        "pretrain/model.json",
        lambda p: edit_json(p, lambda d: d.update(model="vit_nowhere")),
        ["decompose"],
        "pretrain/model.json: cannot build model 'vit_nowhere' from it",
    ),
    "model.json rejected kwargs": (
        "pretrain/model.json",
        lambda p: edit_json(p, lambda d: d["model_kwargs"].update(embed_dim=63)),
        ["decompose"],
        "pretrain/model.json: cannot build model 'vit_digits' from it (dim should be divisible by num_heads)",
    ),
    "model.json checkpoint_path to a pickle": (
        "pretrain/model.json",
        lambda p: edit_json(p, lambda d: pickle_in_kwargs(d, p.parent)),
        ["decompose"],
        "pretrain/model.json: cannot build model 'vit_digits' from it",
    ),
    "model.json old format": (
        "pretrain/model.json",
        lambda p: edit_json(p, lambda d: d.update(format="flora-model/1")),
        ["decompose"],
        "unsupported model format 'flora-model/1'",
    ),
    "model.json unknown layer": (
        "decompose/model.json",
        lambda p: edit_json(p, lambda d: d["lowrank"].update({"blocks.9.attn.qkv": 64})),
        ["filter"],
        "decompose/model.json: cannot build model 'vit_digits' from it",
    ),
    "weights truncated": (
        "pretrain/model.safetensors",
        lambda p: cut(p, p.stat().st_size // 2),
        ["decompose"],
        "pretrain/model.safetensors: corrupt or mismatched model weights",
    ),
    "weights missing": (
        "pretrain/model.safetensors",
        lambda p: p.unlink(),
        ["decompose"],
        "pretrain/model.safetensors: model weights not found",
    ),
    "space rank above full rank": (
        "filter/space.json",
        lambda p: edit_json(p, space_rank_above_full),
        ["supernet"],
        "filter/space.json: corrupt search space (block blocks.0: rank tuple [65,",
    ),
    "space without the dense tuple": (
        "filter/space.json",
        lambda p: edit_json(p, lambda d: d["blocks"][1].update(choices=d["blocks"][1]["choices"][:1])),
        ["supernet"],
        "corrupt search space (block blocks.1: the dense tuple [64, 64, 64] is missing)",
    ),
    "space layer not in the model": (
        "filter/space.json",
        lambda p: edit_json(p, lambda d: d["blocks"][0]["layers"].__setitem__(0, "blocks.0.attn.proj")),
        ["supernet"],
        "layer blocks.0.attn.proj: full rank 64 in the space, model: not a low-rank layer of the model",
    ),
    "space not JSON": (
        "filter/space.json",
        lambda p: p.write_bytes(b"\x00\x01"),
        ["search", "--budget", "0.5"],
        "filter/space.json: corrupt search space, not valid JSON",
    ),
    "space missing": (
        "filter/space.json",
        lambda p: p.unlink(),
        ["supernet"],
        "filter/space.json: search space not found",
    ),
    "scores without kl": (
        "filter/sensitivity.csv",
        lambda p: edit_csv(p, lambda table: table.drop(columns="kl")),
        ["filter_latency"],
        "filter/sensitivity.csv: no column 'kl'; expected the filter's scores (rerun the filter stage)",
    ),
    "scores not numbers": (
        "filter/sensitivity.csv",
        lambda p: edit_csv(p, lambda table: table.assign(kl="high")),
        ["filter_latency"],
        "filter/sensitivity.csv: column 'kl' holds values that are not numbers",
    ),
    "scores without a block's dense tuple": (
        "filter/sensitivity.csv",
        lambda p: edit_csv(p, lambda table: table[table["block"] != "blocks.2"]),
        ["filter_latency"],
        "filter/sensitivity.csv: block 'blocks.2' has no score of its dense tuple",
    ),
    "OFB's table from another thread count": (
        "latency_table_ofb/table.csv",
        lambda p: edit_csv(p, lambda table: table.assign(threads=table["threads"] + 7)),
        ["ofb", "--method", "latency", "--budget", "0.98"],
        "latency_table_ofb/table.csv: measured with threads",
    ),
    "ranks not JSON": (
        "search/0.5/ranks.json",
        lambda p: p.write_text("ranks"),
        ["retrain", "--method", "flora", "--budget", "0.5"],
        "search/0.5/ranks.json: bad rank config: not valid JSON",
    ),
    "ranks zero": (
        "search/0.5/ranks.json",
        lambda p: edit_json(p, lambda d: d["ranks"].update({"blocks.0.mlp.fc1": 0})),
        ["retrain", "--method", "flora", "--budget", "0.5"],
        'rank of "blocks.0.mlp.fc1" must be a positive integer, got 0',
    ),
    "ranks unknown layer": (
        "search/0.5/ranks.json",
        lambda p: edit_json(p, lambda d: d["ranks"].update({"blocks.7.mlp.fc1": 8})),
        ["retrain", "--method", "flora", "--budget", "0.5"],
        "not low-rank layers of this model: blocks.7.mlp.fc1",
    ),
    "ranks for another model": (
        "search/0.5/ranks.json",
        lambda p: edit_json(p, lambda d: d.update(model="deit_small_patch16_224")),
        ["retrain", "--method", "flora", "--budget", "0.5"],
        "search/0.5/ranks.json: for model deit_small_patch16_224, not vit_digits",
    ),
}


@pytest.mark.parametrize("case", list(ARTIFACT_CASES))
def test_bad_artifacts(smoke_pipeline: Path, tmp_path: Path, capsys, monkeypatch, case: str) -> None:
    artifact, spoil, command, message = ARTIFACT_CASES[case]
    shutil.copytree(smoke_pipeline / "results", tmp_path / "results", symlinks=False)
    options = dict(zip(command[1::2], command[2::2], strict=True))
    shutil.rmtree(tmp_path / stage_for(command[0], options.get("--method")).directory(options.get("--budget")))
    spoil(tmp_path / "results" / artifact)
    shutil.copy(smoke_pipeline / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    run_rejected([*command, "--params", "params.yaml"], tmp_path, capsys, message)
