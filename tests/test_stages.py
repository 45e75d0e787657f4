"""The pretrain and decompose stages on the smoke profile, run in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import safetensors.torch
import timm
import torch
from conftest import kill_after_first_epoch, write_params

from flora_steps.cli import main
from flora_steps.core import LowRankLinear
from flora_steps.runtime.artifacts import load_model


def run_stage(stage: str, params: Path) -> int:
    return main([stage, "--params", str(params)])


def test_pretrain_writes_its_artifacts(smoke_results: Path) -> None:
    out = smoke_results / "pretrain"
    assert {"model.safetensors", "model.json", "metrics.json", "history.csv", "log.txt"} <= {
        p.name for p in out.iterdir()
    }
    assert not (out / "checkpoint.pt").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["macs"] == 3_495_040 and metrics["params"] == 202_186
    assert 0.1 < metrics["top1"] <= 1 and 0 < metrics["val_top1"] <= 1 and metrics["top5"] >= metrics["top1"]
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    log = (out / "log.txt").read_text()
    assert "epoch 2/2" in log
    assert "INFO device: cuda" in log if torch.cuda.is_available() else "INFO device: cpu" in log
    model, spec = load_model(out / "model")
    assert spec.model == "vit_digits" and spec.lowrank == {}


def test_decompose_writes_a_full_rank_factorised_model(smoke_results: Path) -> None:
    out = smoke_results / "decompose"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["layers"] == 12 and metrics["max_abs_logit_error"] < 1e-4
    model, spec = load_model(out / "model")
    assert spec.lowrank["blocks.0.attn.qkv"] == 64 and spec.lowrank["blocks.3.mlp.fc2"] == 64
    assert isinstance(model.get_submodule("blocks.2.mlp.fc1"), LowRankLinear)
    dense, _ = load_model(smoke_results / "pretrain" / "model")
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert (model.eval()(x) - dense.eval()(x)).abs().max() < 1e-4
    spectra = pd.read_csv(out / "spectra.csv")
    assert len(spectra) == 12 * 64
    assert (spectra.groupby("layer")["singular_value"].apply(lambda s: s.is_monotonic_decreasing)).all()
    assert spectra.groupby("layer")["energy"].max().round(6).eq(1).all()
    layers = pd.read_csv(out / "layers.csv")
    assert layers.set_index("layer").loc["blocks.0.mlp.fc1", "break_even_rank"] == 52  # 64*256/(64+256) = 51.2
    assert (out / "spectra.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_killed_pretrain_resumes_and_matches_an_uninterrupted_run(
    workdir: Path, smoke_params: dict, monkeypatch
) -> None:
    smoke_params["pretrain"]["epochs"] = 3
    params = write_params(workdir / "params.yaml", smoke_params)
    assert run_stage("pretrain", params) == 0
    uninterrupted = (workdir / "results/pretrain/model.safetensors").read_bytes()
    history = pd.read_csv(workdir / "results/pretrain/history.csv")

    saves = kill_after_first_epoch(monkeypatch)
    (workdir / "results").rename(workdir / "first")
    assert run_stage("pretrain", params) == 130
    assert (workdir / "results/pretrain/checkpoint.pt").exists()
    assert not (workdir / "results/pretrain/model.safetensors").exists()
    assert run_stage("pretrain", params) == 0
    assert saves == [1, 2, 3]  # the rerun started at epoch 2
    assert "resuming from" in (workdir / "results/pretrain/log.txt").read_text()
    assert (workdir / "results/pretrain/model.safetensors").read_bytes() == uninterrupted
    pd.testing.assert_frame_equal(pd.read_csv(workdir / "results/pretrain/history.csv"), history)


def test_a_checkpoint_of_other_params_is_not_resumed(workdir: Path, smoke_params: dict) -> None:
    params = write_params(workdir / "params.yaml", smoke_params)
    (workdir / "results/pretrain").mkdir(parents=True)
    torch.save({"identity": "someone-else", "epoch": 1}, workdir / "results/pretrain/checkpoint.pt")
    assert run_stage("pretrain", params) == 0
    assert "not resuming from" in (workdir / "results/pretrain/log.txt").read_text()


def test_pretrain_imports_a_checkpoint_without_training(workdir: Path, smoke_params: dict) -> None:
    source = timm.create_model("vit_digits")
    safetensors.torch.save_file(source.state_dict(), workdir / "base.safetensors")
    smoke_params["model"]["checkpoint"] = "base.safetensors"
    smoke_params["pretrain"]["epochs"] = 0
    assert run_stage("pretrain", write_params(workdir / "params.yaml", smoke_params)) == 0
    model, _ = load_model(workdir / "results/pretrain/model")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())
    metrics = json.loads((workdir / "results/pretrain/metrics.json").read_text())
    assert metrics["top1"] is not None and pd.read_csv(workdir / "results/pretrain/history.csv").empty


def test_decompose_with_a_corrupt_base_model_is_one_clear_line(
    smoke_results: Path, workdir: Path, smoke_params: dict, capsys
) -> None:
    (workdir / "results/pretrain").mkdir(parents=True)
    for name in ("model.json", "model.safetensors"):
        (workdir / "results/pretrain" / name).write_bytes((smoke_results / "pretrain" / name).read_bytes())
    weights = workdir / "results/pretrain/model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert run_stage("decompose", write_params(workdir / "params.yaml", smoke_params)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "model.safetensors: corrupt or mismatched model weights" in errors[0]
    assert not (workdir / "results/decompose/model.safetensors").exists()


def test_decompose_target_pattern_that_matches_nothing(
    smoke_results: Path, workdir: Path, smoke_params: dict, capsys
) -> None:
    (workdir / "results").mkdir()
    (workdir / "results/pretrain").symlink_to(smoke_results / "pretrain")
    smoke_params["decompose"]["targets"] = ["*.attn.qkv", "*.mlp.fc3"]
    assert run_stage("decompose", write_params(workdir / "params.yaml", smoke_params)) == 2
    assert "decompose.targets: pattern(s) ['*.mlp.fc3'] match no linear layer of vit_digits" in capsys.readouterr().err


def test_import_without_data_keeps_the_weights_and_skips_evaluation(workdir: Path, smoke_params: dict) -> None:
    safetensors.torch.save_file(timm.create_model("vit_digits").state_dict(), workdir / "base.safetensors")
    smoke_params["model"]["checkpoint"] = "base.safetensors"
    smoke_params["pretrain"]["epochs"] = 0
    smoke_params["data"].update(dataset="imagenet", root="imagenet-not-here")
    assert run_stage("pretrain", write_params(workdir / "params.yaml", smoke_params)) == 0
    metrics = json.loads((workdir / "results/pretrain/metrics.json").read_text())
    assert metrics["top1"] is None and metrics["macs"] == 3_495_040
    assert "imported the weights without evaluating them" in (workdir / "results/pretrain/log.txt").read_text()


def test_temporary_files_of_a_killed_run_are_removed_by_the_next_run(
    smoke_results: Path, workdir: Path, smoke_params: dict
) -> None:
    (workdir / "results").mkdir()
    (workdir / "results/pretrain").symlink_to(smoke_results / "pretrain")
    stale = workdir / "results/decompose/.model.safetensors.k1ll3d.tmp"
    stale.parent.mkdir()
    stale.write_bytes(b"half written")
    assert run_stage("decompose", write_params(workdir / "params.yaml", smoke_params)) == 0
    assert not stale.exists()
    assert (
        f"removed {stale.relative_to(workdir)}, left by a killed run"
        in (workdir / "results/decompose/log.txt").read_text()
    )
    assert not list((workdir / "results/decompose").glob(".*"))


def test_the_training_loop_runs_without_a_stage(tmp_path: Path, monkeypatch) -> None:
    """``training.fit`` takes everything as arguments (as bench/training_loop.py calls it): without a checkpoint
    file it writes nothing; with one, a second call of the same identity resumes instead of training again."""
    from torch.utils.data import TensorDataset

    from flora_steps.params import TrainingParams
    from flora_steps.runtime.data import Transformed
    from flora_steps.runtime.training import fit

    monkeypatch.chdir(tmp_path)
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(32, 1, 8, 8, generator=generator), torch.randint(0, 10, (32,), generator=generator)
    data = Transformed(TensorDataset(images, labels), lambda image: image)  # keys carry augmentation seeds
    cfg = TrainingParams(
        epochs=2, batch_size=8, lr=1e-3, min_lr=1e-5, weight_decay=0.0, warmup_epochs=0, grad_clip=None, micro_batch=4
    )

    def train(checkpoint=None, identity=""):
        torch.manual_seed(0)
        model = timm.create_model("vit_digits", num_classes=10)
        loss = lambda model, x, y, rng: torch.nn.functional.cross_entropy(model(x), y)  # noqa: E731
        arguments = {"device": torch.device("cpu"), "seed": 3, "checkpoint": checkpoint, "identity": identity}
        return model, fit(model, data, loss, lambda model: {}, cfg, **arguments)

    model, history = train()
    assert [row["steps"] for row in history] == [4, 8] and [row["images"] for row in history] == [32, 64]
    assert list(tmp_path.iterdir()) == []
    again, _ = train(tmp_path / "checkpoint.pt", "run")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    resumed, history = train(tmp_path / "checkpoint.pt", "run")  # both epochs saved: nothing left to train
    assert len(history) == 2
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), resumed.state_dict().values()))
