"""The real-scale path rehearsed on the CPU (``configs/rehearsal.yaml``), every stage as a user runs it.

A real timm model (DeiT-Tiny, random weights from a local file), ImageFolder images
at 224 px with the paper's transforms, micro-batches with gradient accumulation, and
filter, supernet, search and retrain as two gloo processes. Accuracy means nothing here;
the path running end to end, the bookkeeping and the processes agreeing do.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from conftest import ROOT, machine_independent_latency, run_as_two_processes, write_params
from rehearsal import TRAIN_PER_CLASS, write_rehearsal_inputs
from workflow import ABLATIONS_ONLY

from flora_steps.cli import main
from flora_steps.params import load_params
from flora_steps.pipeline.catalogue import STAGES
from flora_steps.pipeline.schema import budget_name


def test_the_real_scale_path_runs_on_the_cpu_with_two_processes(tmp_path: Path, monkeypatch) -> None:
    """Every stage of a distributed command (filter, supernet, search, retrain, slim, ofb) runs as two gloo
    processes, as torchrun starts them (the stages' own start of torchrun is tested with the supernet, in
    test_supernet.py); every other stage runs in this process, as one process would. The ablations' stages are
    FLORA's own commands with other params values (they run in the smoke pipeline, ``conftest.smoke_pipeline``)."""
    write_rehearsal_inputs(tmp_path / "rehearsal")
    params_file = tmp_path / "params.yaml"
    profile = yaml.safe_load((ROOT / "configs" / "rehearsal.yaml").read_text())
    profile["budgets"]["slim"] = profile["budgets"]["slim"][:1]  # one sliced model: each of its stages runs once
    params = load_params(write_params(params_file, profile))
    budgets = params.budgets.model_dump()
    monkeypatch.chdir(tmp_path)
    with machine_independent_latency():  # the latency budgets' fate may not rest on this machine's speed
        for stage in (stage for name, stage in STAGES.items() if name not in ABLATIONS_ONLY):
            for budget in budgets[stage.foreach] if stage.foreach else [None]:
                arguments = [stage.module, "--params", str(params_file)]
                arguments += stage.arguments("" if budget is None else budget_name(budget))
                if stage.distributed:
                    run_as_two_processes(arguments)
                else:
                    assert main(arguments) == 0, stage.name
                log = (tmp_path / stage.path("log", None if budget is None else budget_name(budget))).read_text()
                if stage.distributed:
                    assert "one of 2 processes under torchrun" in log, stage.name
                    if stage.module in ("supernet", "retrain", "slim", "ofb"):
                        assert "weights identical on all 2 processes" in log, stage.name

    results = tmp_path / "results"
    train_images = 4 * TRAIN_PER_CLASS - 8  # 8 held out as the val split
    steps = train_images // params.supernet.batch_size  # global batches of 2 processes x 2 micro-batches of 2
    assert json.loads((results / "supernet/metrics.json").read_text())["train_steps"] == steps
    for method, budget in (("flora", "0.8"), ("control", "0.7"), ("uniform", "0.7")):
        metrics = json.loads((results / "retrain" / method / budget / "metrics.json").read_text())
        assert metrics["training"]["steps"] == steps and metrics["training"]["images"] == steps * 8
        predictions = (results / "retrain" / method / budget / "predictions.csv").read_text().splitlines()
        assert len(predictions) == 1 + 8  # every test image once: the two shards gathered, nothing twice
    search = json.loads((results / "search/0.8/metrics.json").read_text())
    assert 0.7 <= search["macs_fraction"] <= 0.8
    assert (results / "report/summary.json").is_file() and (results / "report/tradeoff.png").is_file()
