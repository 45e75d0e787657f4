"""Latency tables: their measurement and bookkeeping, predictions from them, and the stages that keep them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import run_command, write_params
from torch import nn

from flora_steps.cli import main
from flora_steps.core import CostModel, LinearCost
from flora_steps.core.latency import (
    ATTENTION,
    FIXED,
    LAYER,
    MLP,
    MODEL,
    PRUNED_FIXED,
    LatencyTable,
    PartOptions,
    StructureTable,
    WidthTable,
    measure_table,
    misalignment,
    misalignment_window,
    precision_of,
    time_rounds,
)
from flora_steps.core.search import CostTable
from flora_steps.core.space import BlockSpace, SearchSpace
from flora_steps.core.uniform import fit_uniform_ratio
from flora_steps.errors import UserError
from flora_steps.pipeline.machine import host_fingerprint
from flora_steps.pipeline.methods import METHODS
from flora_steps.pruning.structure import block_heads, part_widths
from flora_steps.runtime import allocator
from flora_steps.runtime.allocator import allocator_in_use, glibc, use_allocator
from flora_steps.runtime.artifacts import ModelSpec, load_model, read_space
from flora_steps.runtime.latency import device_table
from flora_steps.runtime.machine import KEY, key_difference, table_key

QKV, FC1 = LinearCost(8, 24, 5), LinearCost(8, 32, 5)


def handmade_frame() -> pd.DataFrame:
    """Two layers: a (8 -> 24) one timed at ranks 2 and 4 (break-even 6), a (8 -> 32) one timed dense only."""
    rows = [
        (LAYER, "blocks.0.qkv", QKV, None, 3.0),
        (LAYER, "blocks.0.qkv", QKV, 2, 1.0),
        (LAYER, "blocks.0.qkv", QKV, 4, 2.0),
        (LAYER, "blocks.0.fc1", FC1, None, 5.0),
    ]
    return pd.DataFrame(
        [
            {"part": part, "layer": layer, "in_features": shape.in_features, "out_features": shape.out_features}
            | {"tokens": shape.tokens, "rank": rank, "median_ms": ms}
            for part, layer, shape, rank, ms in rows
        ]
        + [{"part": FIXED, "median_ms": 10.0}, {"part": MODEL, "median_ms": 18.5}]
    )


def handmade_table() -> LatencyTable:
    """``handmade_frame``'s table."""
    return LatencyTable.from_frame(handmade_frame())


def test_a_prediction_is_the_fixed_part_plus_each_layer_at_its_rank() -> None:
    table = handmade_table()
    assert table.dense_ms == 10 + 3 + 5
    assert table.predict_ms({"blocks.0.qkv": 2}) == 10 + 1 + 5
    assert table.predict_ms({"blocks.0.qkv": 3}) == 10 + 1.5 + 5  # between the timed ranks 2 and 4
    assert table.layer_ms("blocks.0.qkv", 5) == pytest.approx(2.5)  # between rank 4 and the dense layer at break-even
    assert table.layer_ms("blocks.0.qkv", 6) == table.layer_ms("blocks.0.qkv", 8) == 3  # materialised dense
    assert table.layer_ms("blocks.0.qkv", 1) == 1  # below the smallest timed rank: its time
    with pytest.raises(ValueError, match="'blocks.9.qkv' is not a target layer"):
        table.predict_ms({"blocks.9.qkv": 2})


def test_the_fastest_form_of_a_layer_is_its_rank_a_faster_timed_rank_above_it_or_dense() -> None:
    table = handmade_table()  # qkv: rank 2 1 ms, rank 4 2 ms, dense 3 ms (break-even 6)
    assert table.fastest_width("blocks.0.qkv", 2) == 2
    assert table.fastest_width("blocks.0.qkv", 1) == 1  # as fast as rank 2: the rank itself wins the tie
    assert table.fastest_width("blocks.0.qkv", 5) == 5  # 2.5 ms between rank 4 and dense
    assert table.fastest_width("blocks.0.qkv", 6) is None  # at break-even: dense by MACs already
    quirky = LatencyTable(10.0, table.layers, {**table.options, "blocks.0.qkv": {None: 3.0, 2: 2.2, 4: 1.5}})
    assert quirky.fastest_width("blocks.0.qkv", 2) == 4  # the device runs rank 4 faster than rank 2: padded
    assert quirky.fastest_width("blocks.0.qkv", 3) == 4
    slow = LatencyTable(10.0, table.layers, {**table.options, "blocks.0.qkv": {None: 0.5, 2: 1.0, 4: 2.0}})
    assert slow.fastest_widths({"blocks.0.qkv": 2, "blocks.0.fc1": 3}) == {"blocks.0.qkv": None, "blocks.0.fc1": 3}
    # with the timings' quartiles, a form must be faster beyond both spreads to replace the rank
    options = quirky.options

    def spread(wider: tuple[float, float]) -> LatencyTable:
        quartiles = {"blocks.0.qkv": {None: (2.9, 3.1), 2: (2.0, 2.4), 4: wider}}
        return LatencyTable(10.0, table.layers, options, quartiles)

    assert spread((1.4, 2.1)).fastest_width("blocks.0.qkv", 2) == 2  # overlapping spreads: noise, not speed
    assert spread((1.4, 1.9)).fastest_width("blocks.0.qkv", 2) == 4


def test_a_window_of_ranks_between_two_multiples_lies_near_the_middle_of_the_grid_below_break_even() -> None:
    grid = [48, 96, 192, 288, 384, 576, 768]  # DeiT-B's fc2 (3,072 -> 768; break-even 615): median of the pairs 240
    assert misalignment_window(3072, 768, grid, 16) == list(range(240, 257))
    assert misalignment_window(3072, 768, [48, 96], 16) == list(range(64, 81))  # 64 and 80 as near 72: the lower
    assert misalignment_window(24, 24, [2, 9, 10, 11], 4) == [4, 5, 6, 7, 8]  # break-even 12: not 8 ... 12
    assert misalignment_window(3072, 768, grid, 0) == misalignment_window(3072, 768, grid, 1) == []
    assert misalignment_window(64, 64, [4, 8, 16, 24], 16) == []  # break-even 32: no window of 16 below it


def test_misalignment_is_what_a_remainder_adds_over_the_line_between_the_multiples() -> None:
    timed = {None: 9.0, 2: 1.0, 4: 2.5, 5: 3.5, 6: 3.5, 7: 4.0, 8: 3.0}  # window 4 ... 8: the line 2.5 + k / 8
    assert misalignment(timed, 4) == pytest.approx({0: 0.0, 1: 0.875, 2: 0.75, 3: 1.125})
    assert misalignment(timed, 0) == misalignment({None: 9.0, 2: 1.0, 4: 2.5, 8: 3.0}, 4) == {}  # no window


def test_a_rank_off_the_grid_is_interpolated_less_its_neighbours_misalignment_plus_its_own() -> None:
    layer = LinearCost(64, 64, 5)  # break-even 32
    options = {None: 10.0, 4: 1.0, 8: 2.0, 9: 3.0, 10: 2.75, 11: 3.5, 12: 2.5, 20: 4.5}  # window 8 ... 12
    table = LatencyTable(5.0, {"a": layer}, {"a": options}, multiple=4)
    assert table.misalignments["a"] == pytest.approx({0: 0.0, 1: 0.875, 2: 0.5, 3: 1.125})
    assert table.layer_ms("a", 11) == 3.5  # timed: its own time
    assert table.layer_ms("a", 16) == pytest.approx(3.5)  # a multiple: the line between 12 and 20
    assert table.layer_ms("a", 17) == pytest.approx(3.75 + 0.875)  # the line, plus remainder 1's misalignment
    assert table.layer_ms("a", 15) == pytest.approx(3.25 + 1.125)
    assert table.layer_ms("a", 26) == pytest.approx(7.25 + 0.5)  # between 20 and the dense layer at break-even
    plain = LatencyTable(5.0, {"a": layer}, {"a": options})  # measured without a multiple: interpolated plainly
    assert plain.layer_ms("a", 17) == pytest.approx(3.75) and plain.layer_ms("a", 11) == 3.5


def test_measuring_with_a_multiple_times_each_shape_on_its_window_too() -> None:
    model = nn.Sequential(nn.Linear(16, 16))  # break-even 8: windows of 2 from 2 or 4; the grid's middle is 2
    frame = measure_table(model, {"0": LinearCost(16, 16, 4)}, {"0": [2]}, torch.randn(2, 4, 16), 2, 1, multiple=2)
    assert sorted(frame.loc[frame["part"] == LAYER, "rank"].fillna(0)) == [0, 2, 3, 4]
    assert set(frame.loc[frame["part"] == LAYER, "rank_multiple"]) == {2}  # the table says what it was timed with
    table = LatencyTable.from_frame(frame)
    assert set(table.misalignments["0"]) == {0, 1} and table.timed({"0": 3})
    plain = LatencyTable.from_frame(frame.drop(columns="rank_multiple"))  # a table without it: plain interpolation
    assert plain.misalignments == {"0": {}}
    with pytest.raises(ValueError, match=r"rank multiples \[2, 8\]; expected one"):
        LatencyTable.from_frame(pd.concat([frame, frame.iloc[:1].assign(rank_multiple=8)], ignore_index=True))


def test_a_table_without_a_fixed_part_or_a_dense_timing_is_rejected() -> None:
    frame = pd.DataFrame([{"part": LAYER, "layer": "a", "in_features": 8, "out_features": 24, "tokens": 5, "rank": 2}])
    with pytest.raises(ValueError, match="one row of the fixed part"):
        LatencyTable.from_frame(frame.assign(median_ms=1.0))
    fixed = pd.DataFrame([{"part": FIXED, "median_ms": 1.0}])
    with pytest.raises(ValueError, match="no dense timing of layer 'a'"):
        LatencyTable.from_frame(pd.concat([frame.assign(median_ms=1.0), fixed]))


class TwoLayers(nn.Module):
    """A model of two target layers of the same shape and a non-target one, on (batch, tokens, 8) inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.second(self.first(x).relu()))


def test_measuring_times_each_shape_at_each_rank_once_and_keeps_the_spread() -> None:
    layers = {"first": LinearCost(8, 8, 4), "second": LinearCost(8, 8, 4)}
    ranks = {"first": [1, 3, 4], "second": [2]}  # 4 and above: break-even, the dense layer
    frame = measure_table(TwoLayers(), layers, ranks, torch.randn(2, 4, 8), repeats=3, warmup=1)
    options = frame[frame["part"] == LAYER]
    # one shape: its options (both layers' ranks) timed once, every row for both layers
    assert sorted(zip(options["layer"], options["rank"].fillna(0), strict=True)) == [
        (layer, rank) for layer in ("first", "second") for rank in (0, 1, 2, 3)
    ]
    by = options.set_index(["layer", "rank"])["median_ms"]
    assert by["first", 2] == by["second", 2]
    assert list(frame["part"].iloc[-2:]) == [FIXED, MODEL] and (frame["repeats"] == 3).all()
    assert (frame["q1_ms"] <= frame["median_ms"]).all() and (frame["median_ms"] <= frame["q3_ms"]).all()
    table = LatencyTable.from_frame(frame)
    assert table.layers["first"] == layers["first"] and set(table.options["second"]) == {None, 1, 2, 3}
    row = options[(options["layer"] == "first") & (options["rank"] == 3)].iloc[0]
    assert table.quartiles["first"][3] == (row["q1_ms"], row["q3_ms"])


def test_time_rounds_times_every_module_in_every_round() -> None:
    ones = torch.ones(2, 3)
    timed = time_rounds({"a": (nn.Identity(), ones), "b": (nn.ReLU(), ones)}, repeats=4, warmup=2)
    assert set(timed) == {"a", "b"} and all(len(values) == 4 and (values >= 0).all() for values in timed.values())


class _Recorder(nn.Module):
    """Appends its name to ``calls`` when run."""

    def __init__(self, name: str, calls: list[str]) -> None:
        super().__init__()
        self.name, self.calls = name, calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(self.name)
        return x


def test_time_rounds_keeps_the_order_given_or_shuffles_each_round_by_its_seed() -> None:
    def orders(**shuffle) -> list[list[str]]:
        calls: list[str] = []
        runs = {name: (_Recorder(name, calls), torch.ones(1)) for name in "abcde"}
        time_rounds(runs, repeats=6, warmup=0, **shuffle)
        return [calls[i : i + 5] for i in range(0, 30, 5)]

    assert orders() == [list("abcde")] * 6
    shuffled = orders(shuffle=0)
    assert all(sorted(round_) == list("abcde") for round_ in shuffled)  # each module once a round
    assert len({tuple(round_) for round_ in shuffled}) > 1 and shuffled == orders(shuffle=0)  # varied, seeded


def test_the_key_names_the_device_threads_batch_precision_and_libraries() -> None:
    key = table_key(torch.device("cpu"), 16, precision_of(torch.device("cpu"), amp=True))
    assert tuple(key) == KEY
    assert key["allocator"] == allocator_in_use()
    assert key["precision"] == "float32" and key["threads"] == torch.get_num_threads() and key["batch"] == 16
    assert key["torch"] == torch.__version__.split("+")[0] or key["torch"].startswith(torch.__version__[:4])
    assert precision_of(torch.device("cuda"), amp=True) == torch.bfloat16
    assert precision_of(torch.device("cuda"), amp=False) == torch.float32
    assert key_difference(key, dict(key)) is None
    assert key_difference({**key, "threads": key["threads"] + 1}, key) == (
        f"threads {key['threads'] + 1!r}, here {key['threads']!r}"
    )
    assert key_difference({**key, "batch": str(key["batch"])}, key) is None  # read back from a CSV


FAULTS_OF_A_FRESH_BLOCK = """
import resource, sys, torch
from flora_steps.runtime.allocator import use_allocator
assert use_allocator(sys.argv[1]) == sys.argv[1]
faults = []
for _ in range(20):  # a forward pass's pattern: a large activation made, used and freed again
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(48 << 18)  # 48 MiB: above glibc's largest mmap threshold
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[-5:]))
"""


@pytest.mark.skipif(glibc() is None, reason="mallopt is glibc's")
def test_the_heap_allocator_serves_a_large_block_again_without_page_faults() -> None:
    """Each allocator in a fresh process, the last 5 of 20 blocks: the system one maps each afresh (at least one
    fault per page, 24 per block with 2 MiB pages); the heap one hands back freed memory (glibc 2.36 reuses a
    64-byte aligned block, as torch's are, once about a dozen are free: hence the warm-up)."""
    runs = {kind: run_command([sys.executable, "-c", FAULTS_OF_A_FRESH_BLOCK, kind]) for kind in ("system", "heap")}
    assert all(run.returncode == 0 for run in runs.values()), {kind: run.stderr for kind, run in runs.items()}
    faults = {kind: int(run.stdout) for kind, run in runs.items()}
    assert faults["system"] >= 5 * 24 and faults["heap"] < min(faults["system"], 120), faults


def test_the_allocator_in_use_is_the_system_one_without_glibc(monkeypatch) -> None:
    monkeypatch.setattr(allocator, "glibc", lambda: None)
    monkeypatch.setattr(allocator, "_in_use", "system")
    assert use_allocator("heap") == "system" and allocator_in_use() == "system"


def test_a_table_measured_under_another_key_is_one_line(tmp_path: Path) -> None:
    key = table_key(torch.device("cpu"), 4, torch.float32)
    rows = handmade_table()
    frame = pd.DataFrame(
        [{**key, "part": FIXED, "median_ms": 1.0}]
        + [
            {**key, "part": LAYER, "layer": "a", "in_features": 8, "out_features": 8, "tokens": 2, "rank": None}
            | {"median_ms": 2.0}
        ]
    )
    assert device_table(frame, tmp_path / "table.csv", key).dense_ms == 3.0
    other = frame.assign(timm="0.0.1")
    with pytest.raises(UserError, match=r"table.csv: measured with timm '0.0.1', here '.+'; rerun the latency_table"):
        device_table(other, tmp_path / "table.csv", key)
    with pytest.raises(UserError, match=r"table.csv: measured with allocator 'other', here"):
        device_table(frame.assign(allocator="other"), tmp_path / "table.csv", key)
    with pytest.raises(UserError, match="no timings on cuda"):
        device_table(frame, tmp_path / "table.csv", {**key, "device": "cuda"})
    with pytest.raises(UserError, match="table.csv: expected one row of the fixed part, found 0; rerun the latency_"):
        device_table(frame[frame["part"] != FIXED], tmp_path / "table.csv", key)
    assert rows.dense_ms == 18


def test_a_pruned_prediction_is_the_pruned_fixed_part_plus_each_part_at_its_width() -> None:
    rows = [(ATTENTION, "blocks.0.attn", 8, 1.0), (ATTENTION, "blocks.0.attn", 32, 3.0)]
    rows += [(MLP, "blocks.0.mlp", 16, 2.0), (MLP, "blocks.0.mlp", 64, 4.0)]
    frame = pd.DataFrame(
        [{"part": part, "layer": layer, "width": width, "median_ms": ms} for part, layer, width, ms in rows]
        + [{"part": FIXED, "median_ms": 0.0}]
        + [{"part": PRUNED_FIXED, "share": share, "median_ms": ms} for share, ms in ((1.0, 10.0), (0.5, 8.0))]
    )
    table = WidthTable.from_frame(frame)
    assert table.dense_ms == 10 + 3 + 4  # the parts in full: share 1
    # linear between timed widths: parts 2 + 2 of 3 + 4 in full, the fixed part linear between the timed shares
    share = (2 + 2) / (3 + 4)
    fixed = 8 + (10 - 8) * (share - 0.5) / (1 - 0.5)
    assert table.predict_ms({"blocks.0.attn": 20, "blocks.0.mlp": 16}) == pytest.approx(fixed + 2 + 2)
    assert table.predict_ms({"blocks.0.attn": 8, "blocks.0.mlp": 16}) == 8 + 1 + 2  # below the timed shares: 0.5's
    assert table.part_ms("blocks.0.attn", 4) == 1  # below the narrowest timed width: its time
    with pytest.raises(ValueError, match="'blocks.1.mlp' is not a prunable part"):
        table.predict_ms({"blocks.1.mlp": 8})
    with pytest.raises(ValueError, match="times no pruned widths"):
        WidthTable.from_frame(frame[frame["part"] != PRUNED_FIXED])
    with pytest.raises(ValueError, match="times no pruned widths"):  # a table from before the shares were kept
        WidthTable.from_frame(frame.drop(columns="share"))


def test_parts_of_the_same_shape_are_timed_once_and_the_pruned_fixed_part_is_the_rest() -> None:
    """Two blocks' MLPs share one module per width; the pruned fixed part is the dense model less every part in full
    (share 1), and a uniformly pruned model less its parts at their widths (at their share of the full time)."""
    narrow, full = nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    parts = {f"blocks.{b}.mlp": PartOptions(MLP, 8, 5, {4: narrow, 8: full}) for b in range(2)}
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    pruned = [(nn.Linear(8, 8), {"blocks.0.mlp": 4, "blocks.1.mlp": 4})]
    frame = measure_table(model, {}, {}, torch.randn(2, 5, 8), repeats=3, warmup=1, parts=parts, pruned_models=pruned)
    widths = frame[frame["part"] == MLP]
    assert list(widths["width"]) == [4, 8, 4, 8]
    assert widths.iloc[:2]["median_ms"].tolist() == widths.iloc[2:]["median_ms"].tolist()  # one timing, shared
    assert list(frame["part"].iloc[-4:]) == [FIXED, PRUNED_FIXED, PRUNED_FIXED, MODEL]
    narrow_ms, full_ms = widths.iloc[:2]["median_ms"]
    shares = frame.loc[frame["part"] == PRUNED_FIXED, "share"].tolist()
    assert shares[0] == 1.0 and shares[1] == pytest.approx(narrow_ms / full_ms, rel=1e-3)


def test_the_host_fingerprint_asks_for_gpus_only_off_the_cpu(tmp_path: Path, monkeypatch) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'Fake GPU 80GB'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{__import__('os').environ['PATH']}")
    assert host_fingerprint("auto")["gpus"] == ["Fake GPU 80GB"]
    assert host_fingerprint("cpu")["gpus"] == []
    assert set(host_fingerprint("cpu")) == {"cpu", "gpus", "torch", "timm"}


def test_the_latency_table_stage_times_the_smoke_models_layers(smoke_pipeline: Path) -> None:
    out = smoke_pipeline / "results/latency_table"
    table = pd.read_csv(out / "table.csv")
    assert tuple(table.columns[: len(KEY)]) == KEY and (table["device"] == "cpu").all()
    layers = table[table["part"] == LAYER]
    assert set(layers["layer"]) == {
        f"blocks.{b}.{role}" for b in range(4) for role in ("attn.qkv", "mlp.fc1", "mlp.fc2")
    }
    assert layers["rank"].isna().sum() == 12  # each layer dense once
    assert (layers.groupby("layer").size() > 1).all()  # and at ranks of its grid
    # ViT-Slim's widths: each block's attention and MLP at each ratio of filter.ratios, and the pruned fixed part
    ratios = yaml.safe_load((smoke_pipeline / "params.yaml").read_text())["filter"]["ratios"]
    for kind, part, full in ((ATTENTION, "attn", 64), (MLP, "mlp", 256)):  # vit_digits: 2 heads of 32, 256 units
        parts = table[table["part"] == kind]
        assert set(parts["layer"]) == {f"blocks.{b}.{part}" for b in range(4)}
        narrowest = 2 if kind == ATTENTION else 1  # one channel per head, one unit
        assert sorted(set(parts["width"])) == sorted({round(r * full) for r in ratios} | {narrowest})
    shares = table.loc[table["part"] == PRUNED_FIXED, "share"]  # the dense model's, and one uniform model a ratio
    assert len(shares) == 1 + len([r for r in ratios if 0 < r < 1])
    assert shares.iloc[0] == 1.0 and ((shares.iloc[1:] > 0) & (shares.iloc[1:] < 1)).all()
    metrics = json.loads((out / "metrics.json").read_text())["cpu"]
    assert metrics["dense_ms"] > 0 and metrics["dense_predicted_ms"] == pytest.approx(metrics["dense_ms"], rel=0.5)


def test_the_latency_stage_predicts_every_model_beside_its_time(smoke_pipeline: Path) -> None:
    """Low-rank models by the ranks of the table of the model they compress (FLORA on a pruned model: that model's
    own table), ViT-Slim's by its widths, OFB's by OFB's table."""
    results = smoke_pipeline / "results"
    latency = pd.read_csv(results / "latency/latency.csv")
    assert set(latency["method"]) == set(METHODS) and latency["predicted_ms"].notna().all()
    on_slim = LatencyTable.from_frame(pd.read_csv(results / "on_slim/latency_table/table.csv"))
    spec = json.loads((results / "on_slim/retrain/flora/0.4/model.json").read_text())
    slim_flora = latency[latency["method"] == "slim_flora"].iloc[0]
    assert slim_flora["predicted_ms"] == pytest.approx(on_slim.predict_ms(spec["factorised"]), abs=1e-3)
    assert (latency["predicted_ms"] > 0).all()
    error = latency["predicted_ms"] / latency["latency_ms"] - 1
    assert np.allclose(latency["prediction_error"], error, atol=1e-3)
    dense = latency.iloc[0]
    assert dense["method"] == "dense" and dense["share_error"] == 0
    # the share of the dense model's latency: over the same table's prediction of the dense model; FLORA on a pruned
    # base: its share of that base by the base's table, times the base's share of the dense model by the width tables
    structures = StructureTable.from_frame(pd.read_csv(results / "latency_table_ofb/table.csv"))
    widths = WidthTable.from_frame(pd.read_csv(results / "latency_table/table.csv"))
    on_ofb = LatencyTable.from_frame(pd.read_csv(results / "on_ofb/latency_table/table.csv"))
    heads = block_heads(load_model(results / "pretrain/model")[0])
    slim_widths = ModelSpec.model_validate(spec).pruned
    ofb_spec = ModelSpec.model_validate_json((results / "on_ofb/retrain/flora/0.4/model.json").read_text())
    blocks = {
        name: (kept.heads or heads[name], kept.head_dim, kept.mlp_hidden) for name, kept in ofb_spec.pruned.items()
    }
    own = {
        "ofb": structures.dense_ms,
        "ofb_latency": structures.dense_ms,
        "slim": widths.dense_ms,
        "slim_latency": widths.dense_ms,
        "slim_flora": on_slim.dense_ms * widths.dense_ms / widths.predict_ms(part_widths(slim_widths, heads)),
        "ofb_flora": on_ofb.dense_ms
        * structures.dense_ms
        / structures.predict_ms(ofb_spec.embed_dim or structures.embed_dim, blocks),
    }
    own |= {"slim_flora_latency": own["slim_flora"], "ofb_flora_latency": own["ofb_flora"]}  # the same base models
    reference = latency["method"].map(lambda method: own.get(method, dense["predicted_ms"]))
    share = (latency["predicted_ms"] / reference) / (latency["latency_ms"] / dense["latency_ms"]) - 1
    assert np.allclose(latency["share_error"], share, atol=1e-3)
    metrics = json.loads((smoke_pipeline / "results/latency/metrics.json").read_text())["cpu"]
    assert metrics["predicted_models"] == len(latency)
    assert metrics["prediction_median_abs_error"] == pytest.approx(latency["prediction_error"].abs().median(), abs=1e-4)
    assert metrics["share_median_abs_error"] == pytest.approx(latency["share_error"][1:].abs().median(), abs=1e-4)


def test_the_latency_stage_refuses_a_table_of_another_machine(
    smoke_pipeline: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """The smoke pipeline's results (linked, read-only) with a table measured on another processor."""
    (tmp_path / "results").mkdir()
    for folder in (smoke_pipeline / "results").iterdir():
        if folder.name not in ("latency", "latency_table"):
            (tmp_path / "results" / folder.name).symlink_to(folder)
    (tmp_path / "results/latency_table").mkdir()
    table = pd.read_csv(smoke_pipeline / "results/latency_table/table.csv")
    table.assign(device_name="Another CPU").to_csv(tmp_path / "results/latency_table/table.csv", index=False)
    (tmp_path / "params.yaml").write_bytes((smoke_pipeline / "params.yaml").read_bytes())
    monkeypatch.chdir(tmp_path)
    assert main(["latency", "--params", "params.yaml"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1 and "table.csv: measured with device_name 'Another CPU', here" in lines[0], lines
    assert not (tmp_path / "results/latency/latency.csv").exists()


def test_a_search_and_a_uniform_fit_can_price_by_a_latency_table() -> None:
    """The search's cost table and the uniform baseline's fit take the table's prediction as their cost."""
    table = handmade_table()
    block = BlockSpace("blocks.0", ("blocks.0.qkv", "blocks.0.fc1"), (8, 8), ((2, 8), (4, 8), (8, 8)))
    space = SearchSpace((block,))
    costs = CostTable.from_space(space, table.layer_ms, table.dense_ms)
    for index, choice in enumerate(block.choices):
        assert costs.cost((index,)) == pytest.approx(table.predict_ms(space.ranks([choice])))
    assert (costs.smallest, costs.largest) == (table.predict_ms({"blocks.0.qkv": 2}), table.dense_ms)
    macs = CostModel({"blocks.0.qkv": QKV, "blocks.0.fc1": FC1}, other_macs=0, other_params=0)
    ratio, ranks = fit_uniform_ratio(macs, list(macs.layers), 17.0, cost=table.predict_ms)
    assert ratio == 0.5 and ranks == {"blocks.0.qkv": 4, "blocks.0.fc1": 4} and table.predict_ms(ranks) == 17
    assert table.predict_ms({"blocks.0.qkv": 5, "blocks.0.fc1": 5}) > 17  # the next ratio does not fit
    with pytest.raises(ValueError, match=r"budget of 15 is below the uniform model at rank ratio 0.125 \(16\)"):
        fit_uniform_ratio(macs, list(macs.layers), 15.0, cost=table.predict_ms)


def test_a_uniform_fit_under_a_latency_table_takes_only_ratios_it_timed() -> None:
    """Interpolated ranks can run slower than both timed neighbours: the fit may keep only timed ones."""
    frame = handmade_frame()
    fc1 = frame[(frame["layer"] == "blocks.0.fc1")].assign(rank=4, median_ms=3.0)
    table = LatencyTable.from_frame(pd.concat([frame, fc1], ignore_index=True))
    macs = CostModel({"blocks.0.qkv": QKV, "blocks.0.fc1": FC1}, other_macs=0, other_params=0)
    assert table.timed({"blocks.0.qkv": 4, "blocks.0.fc1": 4}) and table.timed({"blocks.0.qkv": 6})  # 6: dense
    assert not table.timed({"blocks.0.qkv": 2, "blocks.0.fc1": 2}) and not table.timed({"blocks.0.qkv": 5})
    assert fit_uniform_ratio(macs, list(macs.layers), 17.0, cost=table.predict_ms)[0] == 5 / 8  # interpolated
    ratio, ranks = fit_uniform_ratio(macs, list(macs.layers), 17.0, cost=table.predict_ms, allowed=table.timed)
    assert ratio == 0.5 and ranks == {"blocks.0.qkv": 4, "blocks.0.fc1": 4} and table.predict_ms(ranks) == 15
    with pytest.raises(ValueError, match="no uniform rank ratio is allowed"):
        fit_uniform_ratio(macs, list(macs.layers), 17.0, cost=table.predict_ms, allowed=lambda ranks: False)


UNIFORMS = ("control_latency", "uniform_latency")


def test_flora_and_the_uniform_baselines_under_latency_budgets_fit_the_predicted_latency(smoke_pipeline: Path) -> None:
    table = LatencyTable.from_frame(pd.read_csv(smoke_pipeline / "results/latency_table/table.csv"))
    params = yaml.safe_load((smoke_pipeline / "params.yaml").read_text())
    budget, band = params["budgets"]["latency"][0], params["search"]["band"]
    limit = budget * table.dense_ms
    search = json.loads((smoke_pipeline / f"results/search_latency/{budget}/metrics.json").read_text())
    assert search["limit_ms"] == pytest.approx(limit, rel=1e-4)
    assert limit - band * table.dense_ms - 1e-6 <= search["predicted_ms"] <= limit + 1e-6
    ranks = json.loads((smoke_pipeline / f"results/search_latency/{budget}/ranks.json").read_text())["ranks"]
    assert search["predicted_ms"] == pytest.approx(table.predict_ms(ranks), abs=1e-3)
    candidates = pd.read_csv(smoke_pipeline / f"results/search_latency/{budget}/candidates.csv")
    assert (candidates["predicted_ms"] <= limit + 1e-6).all()
    flora = json.loads((smoke_pipeline / f"results/retrain/flora_latency/{budget}/ranks.json").read_text())["ranks"]
    assert flora == ranks  # fine-tuned from the subnet its search chose
    control = json.loads((smoke_pipeline / f"results/retrain/control_latency/{budget}/metrics.json").read_text())
    assert control["predicted_ms"] <= limit < table.dense_ms
    # SVD uniform under the same budget: the same uniform ranks as the control, from the SVD's weights
    retrained = smoke_pipeline / "results/retrain"
    svd = json.loads((retrained / f"uniform_latency/{budget}/metrics.json").read_text())
    assert svd["predicted_ms"] == control["predicted_ms"] and svd["source"].startswith("SVD")
    uniform_ranks = [json.loads((retrained / f"{m}/{budget}/ranks.json").read_text())["ranks"] for m in UNIFORMS]
    assert uniform_ranks[0] == uniform_ranks[1]


@pytest.mark.parametrize("base", ["slim", "ofb"])
def test_flora_on_a_pruned_model_searches_shares_of_that_models_latency(smoke_pipeline: Path, base: str) -> None:
    """Priced by the pruned model's own table, its budgets are shares of that model's predicted latency; the
    subnet it chose is the one fine-tuned."""
    results = smoke_pipeline / "results"
    params = yaml.safe_load((smoke_pipeline / "params.yaml").read_text())
    budget, band = params["budgets"][f"{base}_flora_latency"][0], params["search"]["band"]
    table = LatencyTable.from_frame(pd.read_csv(results / f"on_{base}/latency_table/table.csv"))
    search = json.loads((results / f"on_{base}/search_latency/{budget}/metrics.json").read_text())
    assert search["limit_ms"] == pytest.approx(budget * table.dense_ms, rel=1e-4)
    assert (budget - band) * table.dense_ms - 1e-6 <= search["predicted_ms"] <= budget * table.dense_ms + 1e-6
    ranks = json.loads((results / f"on_{base}/search_latency/{budget}/ranks.json").read_text())["ranks"]
    assert search["predicted_ms"] == pytest.approx(table.predict_ms(ranks), abs=1e-3)
    retrained = results / f"on_{base}/retrain/flora_latency/{budget}"
    assert json.loads((retrained / "ranks.json").read_text())["ranks"] == ranks
    assert json.loads((retrained / "metrics.json").read_text())["method"] == "flora_latency"


def test_the_latency_filter_keeps_the_scored_tuples_by_predicted_latency(smoke_pipeline: Path) -> None:
    """Each block keeps the same share of the filter's scored tuples by predicted milliseconds: its dense and its
    fastest tuple among them; the latency supernet trains on that space and its search chooses from it."""
    results = smoke_pipeline / "results"
    table = LatencyTable.from_frame(pd.read_csv(results / "latency_table/table.csv"))
    scored = pd.read_csv(results / "filter_latency/sensitivity.csv")
    space = read_space(results / "filter_latency/space.json")
    assert len(scored) == len(pd.read_csv(results / "filter/sensitivity.csv"))  # the same tuples, scored once
    for block in space.blocks:
        rows = scored[scored["block"] == block.name]
        roles = [block.role(layer) for layer in block.layers]
        choices = [tuple(int(rank) for rank in ranks) for ranks in rows[roles].itertuples(index=False)]
        predicted = [
            sum(table.layer_ms(layer, rank) for layer, rank in zip(block.layers, c, strict=True)) for c in choices
        ]
        assert np.allclose(rows["predicted_ms"], predicted, atol=1e-4)
        kept = {choice for choice, keep in zip(choices, rows["kept"], strict=True) if keep}
        assert kept == set(block.choices) and block.dense in kept
        assert choices[int(np.argmin(predicted))] in kept or min(predicted) == min(
            p for c, p in zip(choices, predicted, strict=True) if c in kept
        )
    assert json.loads((results / "supernet_latency/metrics.json").read_text())["train_steps"] > 0
    ranks = json.loads((results / "search_latency/0.98/ranks.json").read_text())["ranks"]
    chosen = [
        tuple(ranks.get(layer, full) for layer, full in zip(b.layers, b.full_ranks, strict=True)) for b in space.blocks
    ]
    assert space.contains(chosen)


def test_vit_slim_under_a_latency_budget_is_sliced_where_its_predicted_widths_fit(smoke_pipeline: Path) -> None:
    frame = pd.read_csv(smoke_pipeline / "results/latency_table/table.csv")
    table = WidthTable.from_frame(frame)
    budget = yaml.safe_load((smoke_pipeline / "params.yaml").read_text())["budgets"]["latency"][0]
    retrained = smoke_pipeline / "results/retrain"
    metrics = json.loads((retrained / f"slim_latency/{budget}/metrics.json").read_text())
    spec = json.loads((retrained / f"slim_latency/{budget}/model.json").read_text())
    widths = {}
    for block, kept in spec["pruned"].items():
        widths |= {f"{block}.attn": 2 * kept["head_dim"], f"{block}.mlp": kept["mlp_hidden"]}  # 2 heads kept
    assert metrics["predicted_ms"] == pytest.approx(table.predict_ms(widths), abs=1e-3)
    assert metrics["predicted_ms"] <= budget * table.dense_ms
    assert metrics["source"] == "ViT-Slim's searched model, sliced to the latency budget"
    slim = json.loads((retrained / "slim/0.35/metrics.json").read_text())
    assert metrics["training"] == slim["training"]  # fine-tuned like ViT-Slim


def test_a_latency_budget_below_the_fastest_subnet_is_one_clear_line(
    smoke_pipeline: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """On the smoke pipeline's clock (``conftest.macs_clock``) the parts no rank or width changes take 8.5% of the
    dense model's time, and ViT-Slim's narrowest slice 1.4%: 1% is below all three."""
    params = yaml.safe_load((smoke_pipeline / "params.yaml").read_text())
    params["budgets"]["latency"] = params["budgets"]["slim_latency"] = [0.01]
    (tmp_path / "results").mkdir()
    for stage in ("pretrain", "latency_table", "filter_latency", "supernet_latency", "slim"):
        (tmp_path / "results" / stage).symlink_to(smoke_pipeline / "results" / stage)
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml", params)
    assert main(["search", "--method", "flora_latency", "--budget", "0.01", "--params", "params.yaml"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1 and "budgets.latency: 0.01 is below the cheapest subnet of the filtered space (" in lines[0]
    assert "of the dense model's)" in lines[0]
    assert main(["retrain", "--method", "control_latency", "--budget", "0.01", "--params", "params.yaml"]) == 2
    assert "budgets.latency: 0.01: budget of " in capsys.readouterr().err
    assert main(["retrain", "--method", "slim_latency", "--budget", "0.01", "--params", "params.yaml"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1 and "budgets.slim_latency: 0.01: even the smallest slim model (" in lines[0]
    assert not (tmp_path / "results/retrain").exists()  # nothing half-written


def test_latency_budgets_in_milliseconds(smoke_pipeline: Path, tmp_path: Path, monkeypatch) -> None:
    """budgets.latency_unit ms: the same search at the milliseconds of the fraction budget finds the same subnet."""
    table = LatencyTable.from_frame(pd.read_csv(smoke_pipeline / "results/latency_table/table.csv"))
    params = yaml.safe_load((smoke_pipeline / "params.yaml").read_text())
    fraction = params["budgets"]["latency"][0]
    milliseconds = round(fraction * table.dense_ms, 6)
    params["budgets"] |= {"latency": [milliseconds], "latency_unit": "ms"}
    params["search"]["band"] = 0.02
    (tmp_path / "results").mkdir()
    for stage in ("pretrain", "latency_table", "filter_latency", "supernet_latency"):
        (tmp_path / "results" / stage).symlink_to(smoke_pipeline / "results" / stage)
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml", params)
    budget = str(milliseconds)
    assert main(["search", "--method", "flora_latency", "--budget", budget, "--params", "params.yaml"]) == 0
    metrics = json.loads((tmp_path / f"results/search_latency/{budget}/metrics.json").read_text())
    assert metrics["limit_ms"] == pytest.approx(milliseconds) and metrics["predicted_ms"] <= milliseconds + 1e-6
