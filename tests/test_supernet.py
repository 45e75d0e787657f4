"""Supernet training: distillation loss, the stage on the smoke profile, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import kill_after_first_epoch, run_as_two_processes, write_params

from flora_steps.cli import main
from flora_steps.core import LowRankLinear
from flora_steps.runtime.artifacts import load_model
from flora_steps.runtime.training import CachedTeacher, build_optimizer, distillation_loss
from flora_steps.stages.supernet import factor_names


def test_distillation_loss_is_soft_target_cross_entropy() -> None:
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    expected = F.cross_entropy(student, teacher.softmax(1))
    assert distillation_loss(student, teacher, labels, 1.0, 0.0) == pytest.approx(expected.item(), rel=1e-6)
    hot = distillation_loss(student, teacher, labels, 2.0, 0.0)
    assert hot == pytest.approx(4 * F.cross_entropy(student / 2, (teacher / 2).softmax(1)).item(), rel=1e-6)
    mixed = distillation_loss(student, teacher, labels, 1.0, 0.25)
    assert mixed == pytest.approx(0.75 * expected.item() + 0.25 * F.cross_entropy(student, labels).item(), rel=1e-6)
    # The loss is smallest when the student matches the teacher.
    assert distillation_loss(teacher, teacher, labels, 1.0, 0.0) < distillation_loss(student, teacher, labels, 1.0, 0.0)


def test_the_cached_teacher_answers_repeated_images_from_memory_with_the_teachers_logits() -> None:
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    seen: list[int] = []
    teacher.register_forward_hook(lambda module, inputs, output: seen.append(len(inputs[0])))
    cache = CachedTeacher(teacher, capacity=6)
    first, second = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    expected = teacher(torch.cat([first, second])).detach()
    seen.clear()
    assert torch.allclose(cache(first), expected[:4], atol=1e-6) and seen == [4]
    mixed = torch.cat([first[:2], second, first[:1]])  # two known, four new, one known twice
    assert torch.allclose(cache(mixed), torch.cat([expected[:2], expected[4:], expected[:1]]), atol=1e-6)
    assert seen == [4, 4] and len(cache.logits) == 6  # the teacher saw only the new ones; the cache is full
    third = torch.randn(3, 1, 8, 8)
    assert torch.allclose(cache(third), teacher(third), atol=1e-6) and len(cache.logits) == 6  # past capacity


@pytest.fixture
def upstream(smoke_results: Path) -> Path:
    return smoke_results


def prepare(workdir: Path, upstream: Path, smoke_params: dict) -> Path:
    (workdir / "results").mkdir()
    for stage in ("pretrain", "decompose", "filter"):
        (workdir / "results" / stage).symlink_to(upstream / stage)
    return write_params(workdir / "params.yaml", smoke_params)


def test_supernet_stage_trains_and_reports_extreme_subnets(workdir: Path, upstream: Path, smoke_params: dict) -> None:
    smoke_params["supernet"]["epochs"] = 2  # the history of more than one epoch
    params = prepare(workdir, upstream, smoke_params)
    assert main(["supernet", "--params", str(params)]) == 0
    out = workdir / "results/supernet"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["smallest"]["macs"] < metrics["largest"]["macs"] == 3_495_040
    for name in ("smallest", "largest"):
        assert 0 <= metrics[name]["val_top1_truncation"] <= 1 and 0 <= metrics[name]["val_top1"] <= 1
    history = pd.read_csv(out / "history.csv")
    assert list(history.columns) == [
        "epoch",
        "train_loss",
        "lr",
        "steps",
        "images",
        "val_top1_smallest",
        "val_top1_largest",
    ]
    assert list(history["epoch"]) == [1, 2] and (history["train_loss"] > 0).all()
    steps_per_epoch = history["steps"].iloc[0]
    assert list(history["steps"]) == [steps_per_epoch, 2 * steps_per_epoch]
    assert (history["images"] == history["steps"] * smoke_params["supernet"]["batch_size"]).all()  # full batches
    assert (metrics["train_steps"], metrics["train_images"]) == (2 * steps_per_epoch, history["images"].iloc[-1])
    model, spec = load_model(out / "model")
    assert spec.lowrank["blocks.0.attn.qkv"] == 64
    decomposed, _ = load_model(upstream / "decompose/model")
    assert not torch.equal(
        model.state_dict()["blocks.0.attn.qkv.first"], decomposed.state_dict()["blocks.0.attn.qkv.first"]
    )
    assert not (out / "checkpoint.pt").exists()


def test_a_killed_supernet_resumes_and_matches_an_uninterrupted_run(
    workdir: Path, upstream: Path, smoke_params: dict, monkeypatch
) -> None:
    smoke_params["supernet"]["epochs"] = 3
    params = prepare(workdir, upstream, smoke_params)
    assert main(["supernet", "--params", str(params)]) == 0
    uninterrupted = (workdir / "results/supernet/model.safetensors").read_bytes()
    (workdir / "results/supernet").rename(workdir / "first")

    kill_after_first_epoch(monkeypatch)
    assert main(["supernet", "--params", str(params)]) == 130
    checkpoint = torch.load(workdir / "results/supernet/checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 1 and "optimizer" in checkpoint
    assert main(["supernet", "--params", str(params)]) == 0
    assert "resuming from" in (workdir / "results/supernet/log.txt").read_text()
    assert (workdir / "results/supernet/model.safetensors").read_bytes() == uninterrupted


@pytest.mark.parametrize(
    ("change", "resumes"),
    [
        ("upstream artifact", False),  # the filter kept one tuple fewer
        ("tracked param", False),  # supernet.lr
        ("evaluation-only param", True),  # data.eval_batch_size
    ],
)
def test_a_checkpoint_is_resumed_only_with_the_same_inputs(
    workdir: Path, upstream: Path, smoke_params: dict, monkeypatch, change: str, resumes: bool
) -> None:
    (workdir / "results").mkdir()
    for stage in ("pretrain", "decompose", "filter"):
        shutil.copytree(upstream / stage, workdir / "results" / stage)
    smoke_params["supernet"]["epochs"] = 2  # killed after the first
    params = write_params(workdir / "params.yaml", smoke_params)
    saves = kill_after_first_epoch(monkeypatch)
    assert main(["supernet", "--params", str(params)]) == 130

    if change == "upstream artifact":
        space_file = workdir / "results/filter/space.json"
        space = json.loads(space_file.read_text())
        space["blocks"][0]["choices"].pop(1)
        space_file.write_text(json.dumps(space))
    else:
        section, key, value = ("supernet", "lr", 0.002) if change == "tracked param" else ("data", "eval_batch_size", 7)
        smoke_params[section][key] = value
        write_params(params, smoke_params)
    assert main(["supernet", "--params", str(params)]) == 0
    log = (workdir / "results/supernet/log.txt").read_text()
    if resumes:
        assert saves == [1, 2] and "resuming from" in log
    else:
        assert saves == [1, 1, 2] and "params or upstream artifacts differ from this run's; starting fresh" in log
    resumed = (workdir / "results/supernet/model.safetensors").read_bytes()
    shutil.rmtree(workdir / "results/supernet")
    assert main(["supernet", "--params", str(params)]) == 0
    assert (workdir / "results/supernet/model.safetensors").read_bytes() == resumed  # as a clean run


def test_an_unreadable_checkpoint_is_reported_and_training_starts_fresh(
    workdir: Path, upstream: Path, smoke_params: dict
) -> None:
    params = prepare(workdir, upstream, smoke_params)
    (workdir / "results/supernet").mkdir()
    (workdir / "results/supernet/checkpoint.pt").write_bytes(b"cut short")
    assert main(["supernet", "--params", str(params)]) == 0
    assert "cannot resume from results/supernet/checkpoint.pt" in (workdir / "results/supernet/log.txt").read_text()


def test_missing_search_space_is_one_clear_line(workdir: Path, upstream: Path, smoke_params: dict, capsys) -> None:
    (workdir / "results").mkdir()
    for stage in ("pretrain", "decompose"):
        (workdir / "results" / stage).symlink_to(upstream / stage)
    assert main(["supernet", "--params", str(write_params(workdir / "params.yaml", smoke_params))]) == 2
    assert (
        "results/filter/space.json: search space not found (run the stage that writes it first)"
        in capsys.readouterr().err
    )


def test_two_process_gloo_ddp_run_keeps_weights_identical(workdir: Path, upstream: Path, smoke_params: dict) -> None:
    smoke_params["supernet"]["epochs"] = 1
    smoke_params["compute"]["device"] = "cpu"
    params = prepare(workdir, upstream, smoke_params)
    run_as_two_processes(["supernet", "--params", str(params)])
    log = (workdir / "results/supernet/log.txt").read_text()
    assert "weights identical on all 2 processes" in log
    metrics = json.loads((workdir / "results/supernet/metrics.json").read_text())
    assert metrics["processes"] == 2
    history = pd.read_csv(workdir / "results/supernet/history.csv")
    assert list(history["epoch"]) == [1]


def test_micro_batches_accumulate_to_the_same_training_as_whole_batches(
    workdir: Path, upstream: Path, smoke_params: dict
) -> None:
    """Global batch 64 as 4 micro-batches of 16: the same subnet per step, the same weights up to float rounding.

    (Without augmentation: the digits shift draws its offsets per fetched batch, so other batch sizes draw others.)
    """
    smoke_params["supernet"]["epochs"] = 1
    smoke_params["data"]["shift"] = 0
    params = prepare(workdir, upstream, smoke_params)
    assert main(["supernet", "--params", str(params)]) == 0
    whole, _ = load_model(workdir / "results/supernet/model")
    whole_history = pd.read_csv(workdir / "results/supernet/history.csv")
    shutil.rmtree(workdir / "results/supernet")
    smoke_params["supernet"]["micro_batch"] = 16
    params = write_params(workdir / "params.yaml", smoke_params)
    assert main(["supernet", "--params", str(params)]) == 0
    micro, _ = load_model(workdir / "results/supernet/model")
    history = pd.read_csv(workdir / "results/supernet/history.csv")
    assert list(history["steps"]) == list(whole_history["steps"]) and list(history["images"]) == list(
        whole_history["images"]
    )
    assert history["train_loss"].iloc[0] == pytest.approx(whole_history["train_loss"].iloc[0], rel=1e-4)
    for name, weight in whole.state_dict().items():
        torch.testing.assert_close(micro.state_dict()[name], weight, rtol=0, atol=2e-4)  # Adam amplifies rounding


def test_micro_batches_that_do_not_make_up_the_batch_are_one_clear_line(
    workdir: Path, upstream: Path, smoke_params: dict, capsys
) -> None:
    smoke_params["supernet"]["micro_batch"] = 24
    params = prepare(workdir, upstream, smoke_params)
    assert main(["supernet", "--params", str(params)]) == 2
    assert "supernet.batch_size: 64 does not split into 1 processes x micro-batches of 24" in capsys.readouterr().err


def test_a_one_process_run_resumes_under_torchrun_with_two(
    workdir: Path, upstream: Path, smoke_params: dict, monkeypatch
) -> None:
    """The global batch and schedule do not depend on the process count, so a checkpoint carries over."""
    smoke_params["supernet"] |= {"epochs": 2, "micro_batch": 32}
    smoke_params["compute"]["device"] = "cpu"
    params = prepare(workdir, upstream, smoke_params)
    kill_after_first_epoch(monkeypatch)
    assert main(["supernet", "--params", str(params)]) == 130  # one process, 2 micro-batches per step
    run_as_two_processes(["supernet", "--params", str(params)])
    log = (workdir / "results/supernet/log.txt").read_text()
    assert "resuming from results/supernet/checkpoint.pt after epoch 1" in log
    assert "weights identical on all 2 processes" in log
    history = pd.read_csv(workdir / "results/supernet/history.csv")
    assert list(history["epoch"]) == [1, 2] and history["images"].iloc[1] == 2 * history["images"].iloc[0]


def test_the_supernet_starts_its_own_torchrun_processes(workdir: Path, upstream: Path, smoke_params: dict) -> None:
    """compute.processes: 2 runs the stage's own command as two gloo processes: the rules need no torchrun."""
    smoke_params["supernet"]["epochs"] = 1
    smoke_params["compute"] |= {"device": "cpu", "processes": 2}
    params = prepare(workdir, upstream, smoke_params)
    assert main(["supernet", "--params", str(params)]) == 0
    assert "weights identical on all 2 processes" in (workdir / "results/supernet/log.txt").read_text()
    assert json.loads((workdir / "results/supernet/metrics.json").read_text())["processes"] == 2


@pytest.mark.parametrize("decay_factors", [False, True])
def test_a_component_no_step_uses_keeps_its_svd_value(decay_factors: bool) -> None:
    """Rank 3 of 6 trained for 30 AdamW steps with strong decay: components 4-6 stay exactly as the SVD made them."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(LowRankLinear.from_linear(torch.nn.Linear(8, 6)))
    layer = model[0]
    first, second = layer.first.detach().clone(), layer.second.detach().clone()
    layer.rank = 3
    no_decay = [] if decay_factors else factor_names(model)
    optimizer = build_optimizer(model, lr=0.05, weight_decay=0.5, no_decay=no_decay)
    for _ in range(30):
        loss = model(torch.randn(16, 8)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unused_kept = torch.equal(layer.first[3:], first[3:]) and torch.equal(layer.second[:, 3:], second[:, 3:])
    assert unused_kept is not decay_factors  # with decay on the factors, unused components shrink
    assert not torch.equal(layer.first[:3], first[:3])  # the used components did train
    assert factor_names(model) == ["0.first", "0.second"]
