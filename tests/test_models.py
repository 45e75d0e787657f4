"""Models by name and base weights from local checkpoints."""

from __future__ import annotations

import pytest
import safetensors.torch
import timm
import torch

from flora_steps.errors import UserError
from flora_steps.runtime.models import create_base_model, input_shape


def test_embedded_model_is_created_by_name_like_any_timm_model() -> None:
    model = timm.create_model("vit_digits")
    assert "vit_digits" in timm.list_models("vit_digits")
    assert input_shape(model) == (1, 8, 8)
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (64, 4, 2)
    assert 0.19e6 < sum(p.numel() for p in model.parameters()) < 0.21e6
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_is_loaded_through_timm(tmp_path, suffix: str) -> None:
    source = timm.create_model("vit_digits")
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save({"model": source.state_dict(), "epoch": 3}, path)  # a training checkpoint layout
    else:
        safetensors.torch.save_file(source.state_dict(), path)
    loaded = create_base_model("vit_digits", 10, checkpoint=path)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_checkpoint_that_does_not_fit_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "other.pth"
    torch.save(timm.create_model("vit_digits", embed_dim=32).state_dict(), path)
    with pytest.raises(UserError, match=r"model.checkpoint: .*other.pth does not fit model vit_digits: size mismatch"):
        create_base_model("vit_digits", 10, checkpoint=path)


def test_wrong_class_count_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "ten.pth"
    torch.save(timm.create_model("vit_digits").state_dict(), path)
    with pytest.raises(UserError, match="does not fit model vit_digits: size mismatch for head.weight"):
        create_base_model("vit_digits", 5, checkpoint=path)


def test_unreadable_and_missing_checkpoints_are_clear_errors(tmp_path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(UserError, match="is not a readable weights file"):
        create_base_model("vit_digits", 10, checkpoint=garbage)
    with pytest.raises(UserError, match="model.checkpoint: file not found"):
        create_base_model("vit_digits", 10, checkpoint=tmp_path / "missing.pth")


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": timm.create_model("vit_digits").state_dict(), "hook": print}, path)
    with pytest.raises(UserError, match="is not a readable weights file"):
        create_base_model("vit_digits", 10, checkpoint=path)


def test_unknown_model_name() -> None:
    with pytest.raises(UserError, match="model.name: unknown timm model 'vit_nonexistent'"):
        create_base_model("vit_nonexistent", 10)
