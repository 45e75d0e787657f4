"""Candidate filtering: the keep rule and the filter stage on the smoke profile."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import SMOKE, write_params

from flora_steps.cli import main
from flora_steps.core.filter import efficiency, keep_efficient, macs_bins
from flora_steps.core.space import SearchSpace, rank_grid


def test_efficiency_is_damage_per_mac_saved() -> None:
    scores = efficiency(np.array([1.0, 2.0, 0.5]), np.array([10.0, 10.0, 0.0]))
    assert scores[0] == pytest.approx(0.1) and scores[1] == pytest.approx(0.2) and scores[2] == np.inf


def test_keep_rule_keeps_the_best_share_of_every_bin_and_both_ends() -> None:
    rng = np.random.default_rng(0)
    macs = np.concatenate([rng.uniform(10, 20, 40), rng.uniform(80, 100, 59), [100.0]])  # last one: dense
    saved = 100.0 - macs
    damage = np.concatenate([rng.uniform(5, 9, 40), rng.uniform(0, 1, 59), [0.0]])  # small models hurt more
    kept = keep_efficient(macs, saved, damage, keep_ratio=0.2, bins=5, dense_index=99)
    assert kept[99] and kept[np.argmin(macs)]  # the dense and the cheapest choice span the block's MACs range
    bins = macs_bins(macs, 5)
    score = efficiency(damage, saved)
    for b in np.unique(bins):
        members = np.flatnonzero(bins == b)
        best = members[np.argsort(score[members])][: math.ceil(0.2 * len(members))]
        assert kept[best].all()  # the best fifth of every occupied bin
    # The small-model bin keeps its share although none of its choices would rank in the overall top 20%.
    assert kept[:40].sum() >= 8
    assert kept.sum() <= sum(math.ceil(0.2 * (bins == b).sum()) for b in np.unique(bins)) + 2


@pytest.fixture
def filtered(smoke_results: Path) -> Path:
    return smoke_results / "filter"


def test_filter_stage_writes_a_space_inside_the_grid(filtered: Path) -> None:
    space = SearchSpace.from_dict(json.loads((filtered / "space.json").read_text()))
    assert [b.name for b in space.blocks] == [f"blocks.{i}" for i in range(4)]
    grid = {64: rank_grid(64, 192, [0.25, 0.5, 1.0]), 256: rank_grid(64, 256, [0.25, 0.5, 1.0])}
    for block in space.blocks:
        assert block.dense == (64, 64, 64) and block.dense in block.choices
        for qkv, fc1, fc2 in block.choices:
            assert qkv in grid[64] and fc1 in grid[256] and fc2 in grid[256]
    table = pd.read_csv(filtered / "sensitivity.csv")
    assert len(table) == 4 * 27 and {"attn.qkv", "mlp.fc1", "mlp.fc2", "kl", "top1", "kept"} <= set(table.columns)
    for block in space.blocks:
        rows = table[table["block"] == block.name]
        assert rows["kept"].sum() == len(block.choices) >= math.ceil(0.3 * 27)
        dense = rows[(rows["attn.qkv"] == 64) & (rows["mlp.fc1"] == 64) & (rows["mlp.fc2"] == 64)]
        assert dense["saved_macs"].item() == 0
        # the smoke profile scores on block-local supernets (filter.local.epochs: 1): trained weights, not the
        # SVD's, so even the dense tuple's logits move off the dense model's
        assert dense["kl"].item() > 0
    smallest = table[(table["attn.qkv"] == 16) & (table["mlp.fc1"] == 16) & (table["mlp.fc2"] == 16)]
    assert (smallest["kl"] > 0).all() and smallest["kept"].all()  # the cheapest tuple always survives
    metrics = json.loads((filtered / "metrics.json").read_text())
    assert metrics["scored"] == 108 and metrics["kept"] == int(table["kept"].sum())
    assert (filtered / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    assert "block-local supernets: 1 epochs on " in (filtered / "log.txt").read_text()


def test_a_killed_filter_resumes_after_its_last_scored_block(smoke_results: Path, tmp_path: Path, monkeypatch):
    import flora_steps.stages.filter as stage

    (tmp_path / "results").mkdir()
    for name in ("pretrain", "decompose"):
        (tmp_path / "results" / name).symlink_to(smoke_results / name)
    params = write_params(tmp_path / "params.yaml", yaml.safe_load(SMOKE.read_text()))
    monkeypatch.chdir(tmp_path)
    real_save, saves = stage.save_checkpoint, []

    def save_then_die(path, state):
        real_save(path, state)
        saves.append(len(state["scores"]))
        if saves == [1, 2]:
            raise KeyboardInterrupt

    monkeypatch.setattr(stage, "save_checkpoint", save_then_die)
    assert main(["filter", "--params", str(params)]) == 130  # killed after two of four blocks
    assert (tmp_path / "results/filter/checkpoint.pt").is_file()
    assert main(["filter", "--params", str(params)]) == 0
    assert saves == [1, 2, 3, 4]  # the rerun scored only the last two blocks
    out = tmp_path / "results/filter"
    assert "resuming from results/filter/checkpoint.pt: 2 blocks already scored" in (out / "log.txt").read_text()
    for name in ("space.json", "sensitivity.csv"):
        assert (out / name).read_bytes() == (smoke_results / "filter" / name).read_bytes(), name
    assert not (out / "checkpoint.pt").exists()
