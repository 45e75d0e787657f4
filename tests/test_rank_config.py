"""Rank-config JSON: round trip and clear errors."""

from __future__ import annotations

import json

import pytest

from flora_steps.core import RankConfig
from flora_steps.errors import UserError
from flora_steps.runtime.artifacts import read_rank_config, write_rank_config


def test_round_trip_through_a_file(tmp_path) -> None:
    config = RankConfig("deit_small_patch16_224", {"blocks.0.attn.qkv": 96, "blocks.0.mlp.fc1": 128})
    path = tmp_path / "ranks.json"
    write_rank_config(path, config)
    assert json.loads(path.read_text()) == {"model": config.model, "ranks": config.ranks}
    assert read_rank_config(path) == config


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"ranks": {}}', 'exactly the keys "model" and "ranks"'),
        ('{"model": "", "ranks": {}}', '"model" must be a non-empty string'),
        ('{"model": "m", "ranks": [1]}', '"ranks" must map layer names'),
        ('{"model": "m", "ranks": {"a": 0}}', 'rank of "a" must be a positive integer, got 0'),
        ('{"model": "m", "ranks": {"a": 2.5}}', 'rank of "a" must be a positive integer'),
        ('{"model": "m", "ranks": {"a": true}}', 'rank of "a" must be a positive integer'),
    ],
)
def test_bad_rank_configs_name_the_problem_and_the_file(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "ranks.json"
    path.write_text(text)
    with pytest.raises(UserError) as error:
        read_rank_config(path)
    assert str(path) in str(error.value) and message in str(error.value)
