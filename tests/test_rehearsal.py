"""The real-scale path rehearsed on the CPU (``configs/rehearsal.yaml``), every stage as a user runs it.

A real timm model (DeiT-Tiny, random weights from a local file), ImageFolder images
at 224 px with the paper's transforms, micro-batches with gradient accumulation, and
filter, supernet, search and retrain as two gloo processes. Accuracy means nothing here;
the path running end to end, the bookkeeping and the processes agreeing do.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import sys
import time
import traceback
from pathlib import Path

from conftest import HANG_GUARD, ROOT
from rehearsal import TRAIN_PER_CLASS, write_rehearsal_inputs

from flora_steps.cli import main
from flora_steps.params import load_params
from flora_steps.pipeline.catalogue import STAGES
from flora_steps.pipeline.schema import budget_name

def run_as_two_processes(arguments: list[str]) -> None:
    """``flora <arguments>`` as two gloo processes with the environment ``torchrun`` gives its workers (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR`` ...), forked from this one so that neither pays Python's and torch's start-up.
    Past ``HANG_GUARD`` seconds, or once one fails, both are killed and the test fails."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    forked = multiprocessing.get_context("fork")
    workers = [forked.Process(target=_worker, args=(rank, port, arguments)) for rank in range(2)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + HANG_GUARD
    while any(w.is_alive() for w in workers) and time.monotonic() < deadline:
        if any(w.exitcode not in (None, 0) for w in workers):
            break
        time.sleep(0.1)
    for worker in workers:
        if worker.is_alive():
            worker.kill()
        worker.join()
    assert [w.exitcode for w in workers] == [0, 0], (arguments, [w.exitcode for w in workers])


def _worker(rank: int, port: int, arguments: list[str]) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    try:
        code = main(arguments)
    except BaseException:  # noqa: BLE001 (a forked test process reports and leaves, whatever happened)
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def test_the_real_scale_path_runs_on_the_cpu_with_two_processes(tmp_path: Path, monkeypatch) -> None:
    """Every stage of a distributed command (filter, supernet, search, retrain, slim, ofb) runs as two gloo
    processes, as torchrun starts them (the stages' own start of torchrun is tested with the supernet, in
    test_supernet.py); every other stage runs in this process, as one process would."""
    write_rehearsal_inputs(tmp_path / "rehearsal")
    params_file = tmp_path / "params.yaml"
    shutil.copy(ROOT / "configs" / "rehearsal.yaml", params_file)
    params = load_params(params_file)
    budgets = params.budgets.model_dump()
    monkeypatch.chdir(tmp_path)
    for stage in STAGES.values():
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
