"""The `flora flops` command."""

from __future__ import annotations

import json

from flora_steps.cli import main
from flora_steps.core import RankConfig
from flora_steps.runtime.artifacts import write_rank_config


def test_dense_model_as_json(capsys) -> None:
    assert main(["flops", "--model", "vit_digits", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["macs"] == result["dense_macs"] == 3_495_040 and result["params"] == 202_186
    assert result["input_size"] == [1, 8, 8]


def test_rank_config_from_a_file(tmp_path, capsys) -> None:
    path = tmp_path / "ranks.json"
    write_rank_config(path, RankConfig("vit_digits", {"blocks.0.mlp.fc1": 16, "blocks.1.attn.qkv": 8}))
    assert main(["flops", "--ranks", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    saved = 17 * (64 * 256 - 16 * 320) + 17 * (64 * 192 - 8 * 256)
    assert result["dense_macs"] - result["macs"] == saved
    assert result["dense_params"] - result["params"] == (64 * 256 - 16 * 320) + (64 * 192 - 8 * 256)
    assert main(["flops", "--ranks", str(path)]) == 0
    assert "2 factorised layers" in capsys.readouterr().out


def test_errors_are_one_line(tmp_path, capsys) -> None:
    path = tmp_path / "ranks.json"
    write_rank_config(path, RankConfig("vit_digits", {"blocks.7.mlp.fc1": 16}))
    assert main(["flops", "--ranks", str(path)]) == 2
    assert (
        capsys.readouterr().err
        == "flora flops: error: --ranks: 'blocks.7.mlp.fc1' is not a linear layer of this model\n"
    )
    assert main(["flops", "--model", "deit_tiny_patch16_224", "--ranks", str(path)]) == 2
    assert "is for model vit_digits, not deit_tiny_patch16_224" in capsys.readouterr().err
    assert main(["flops"]) == 2
    assert "give --model NAME or --ranks FILE" in capsys.readouterr().err
