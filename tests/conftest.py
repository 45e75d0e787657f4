"""Shared fixtures: the repository root, the smoke profile, and a scratch working directory."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Hashable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import flora_steps.runtime.models  # noqa: F401  (registers vit_digits with timm)
from flora_steps.core.latency import Rounds
from flora_steps.pipeline.catalogue import STAGES
from flora_steps.pipeline.schema import budget_name

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


#: The modules that take longest, each run first among its kind: pytest-xdist hands modules to its workers in the
#: collection's order (``--no-loadscope-reorder``), so the short ones fill in beside them instead of one long module
#: running alone at the end. DVC's tests go first: their worker makes the smoke pipeline (``smoke_pipeline``) that
#: most modules wait for; the other worker meanwhile runs the modules that need none, the rehearsal's first.
LONGEST = ("test_dvc.py", "test_rehearsal.py", "test_hybrid.py", "test_snakemake.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONGEST)}
    waits = {item.path.name for item in items if "smoke_pipeline" in item.fixturenames} - {LONGEST[0]}
    items.sort(key=lambda item: (item.path.name in waits, rank.get(item.path.name, len(LONGEST))))


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory) -> None:
    """Caches (the image check's) go to a scratch folder, not the user's home."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def smoke_params() -> dict:
    """The smoke profile as a plain dict, to be modified by a test."""
    return yaml.safe_load(SMOKE.read_text())


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory (stages write ``results/`` relative to it)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


class Recorder:
    """A read-only view of params that records every key read through it (``"retrain.lr"``)."""

    def __init__(self, model, seen: set[str], prefix: str = "") -> None:
        self._model, self._seen, self._prefix = model, seen, prefix

    def __getattr__(self, name: str):
        from pydantic import BaseModel

        value = getattr(self._model, name)
        if name not in type(self._model).model_fields:
            return value  # a method such as model_dump: not a key
        key = self._prefix + name
        if isinstance(value, BaseModel):  # a section: record the keys read inside it
            return Recorder(value, self._seen, key + ".")
        self._seen.add(key)
        return value


READS = "reads.json"  # beside a shared smoke run: the params keys each of its stages read


def run_recorded(stage, arguments: list[str], params_file: Path, reads: dict[str, set[str]]) -> None:
    """Run one stage in this process with params that record what it reads into ``reads[stage.name]``."""
    import flora_steps.runtime.context as context
    from flora_steps.cli import main

    real_load, real_with, seen = context.load_params, context.with_values, reads.setdefault(stage.name, set())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(context, "load_params", lambda path: Recorder(real_load(path), seen))
        # an ablation's stage runs with its overrides: record what it reads of those params too
        patch.setattr(
            context,
            "with_values",
            lambda params, values: Recorder(real_with(params, values), seen) if values else params,
        )
        assert main([stage.module, *arguments, "--params", str(params_file)]) == 0, (stage.name, arguments)


def shared_folder(tmp_path_factory, name: str, make) -> Path:
    """A folder that ``make(folder)`` fills once per test session, even over several pytest-xdist workers: the
    first worker to ask makes it, the others wait for it and reuse it (treat it as read-only)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the workers' common folder
    folder = root / name
    with FileLock(f"{folder}.lock"):
        if not (folder / ".done").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            (folder / ".done").touch()
    return folder


def macs_clock(
    runs: Mapping[Hashable, tuple[nn.Module, torch.Tensor]],
    repeats: int,
    warmup: int = 3,
    dtype: torch.dtype = torch.float32,
    rounds: Rounds = iter,
    shuffle: int | None = None,
) -> dict[Hashable, np.ndarray]:
    """``core.latency.time_rounds`` on a clock every machine shares: a forward pass takes one millisecond per
    million multiply-accumulates (``FlopCounterMode``), in every round. ``dtype`` and ``shuffle`` change nothing."""
    milliseconds = {}
    with torch.no_grad():
        for key, (module, inputs) in runs.items():
            with FlopCounterMode(display=False) as counter:
                module(inputs)
            milliseconds[key] = counter.get_total_flops() / 2 / 1e6
    for _ in rounds(range(warmup + repeats)):  # the stage's progress bar and log, as with real rounds
        pass
    return {key: np.full(repeats, value) for key, value in milliseconds.items()}


@contextmanager
def machine_independent_latency() -> Iterator[None]:
    """Stages in this process time models on ``macs_clock`` instead of the machine's clock.

    A latency budget's fate otherwise rests on the machine: on a busy or slow one, the tiny smoke model's
    narrowest ViT-Slim slice timed at more than 0.98 of the dense model, and the smoke pipeline stopped. The
    timing itself is tested on its own (``test_latency.py``: ``time_rounds``, ``measure_table``)."""
    import flora_steps.core.latency as core
    import flora_steps.stages.latency as stage

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(core, "time_rounds", macs_clock)
        patch.setattr(stage, "time_rounds", macs_clock)
        yield


def _record_runs(folder: Path, runs, params_file: Path) -> None:
    """Run ``(stage, budget)`` pairs in ``folder`` on ``macs_clock``, recording the params each reads into
    ``folder/reads.json``."""
    reads: dict[str, set[str]] = {}
    with pytest.MonkeyPatch.context() as patch, machine_independent_latency():
        patch.chdir(folder)
        for stage, budget in runs:
            run_recorded(stage, stage.arguments(budget), params_file, reads)
    (folder / READS).write_text(json.dumps({name: sorted(keys) for name, keys in reads.items()}))


@pytest.fixture(scope="session")
def smoke_results(tmp_path_factory) -> Path:
    """``results/`` after pretrain, decompose and filter on the smoke profile (run once; treat as read-only)."""

    def make(folder: Path) -> None:
        params_file = write_params(folder / "params.yaml", yaml.safe_load(SMOKE.read_text()))
        _record_runs(folder, [(STAGES[name], "") for name in ("pretrain", "decompose", "filter")], params_file)

    return shared_folder(tmp_path_factory, "smoke", make) / "results"


@pytest.fixture(scope="session")
def smoke_pipeline(smoke_results: Path, tmp_path_factory) -> Path:
    """A project folder with params.yaml = smoke profile, after every stage up to retrain (run once)."""

    def make(folder: Path) -> None:
        (folder / "results").mkdir()
        for stage in ("pretrain", "decompose", "filter"):
            (folder / "results" / stage).symlink_to(smoke_results / stage)
        params = yaml.safe_load(SMOKE.read_text())
        runs = [  # every other stage but the report, in the catalogue's order (producers first), every budget
            (stage, budget)
            for stage in STAGES.values()
            if stage.name not in ("pretrain", "decompose", "filter", "report")
            for budget in ([budget_name(b) for b in params["budgets"][stage.foreach]] if stage.foreach else [""])
        ]
        _record_runs(folder, runs, write_params(folder / "params.yaml", params))

    return shared_folder(tmp_path_factory, "pipeline", make)


@pytest.fixture(scope="session")
def params_reads(smoke_results: Path, smoke_pipeline: Path) -> dict[str, set[str]]:
    """The params keys each stage read in the session's smoke runs (``smoke_results``, ``smoke_pipeline``)."""
    reads: dict[str, set[str]] = {}
    for folder in (smoke_results.parent, smoke_pipeline):
        for name, keys in json.loads((folder / READS).read_text()).items():
            reads.setdefault(name, set()).update(keys)
    return reads


def kill_after_first_epoch(monkeypatch: pytest.MonkeyPatch, at: int = 1) -> list[int]:
    """Make the training loop's ``save_checkpoint`` save and then raise ``KeyboardInterrupt`` at save ``at``, once.

    As if the job were killed right after its first checkpoint (or its ``at``-th, when
    a stage trains several seeds in turn). Returns the epochs saved so far, a list
    that keeps growing over later runs.
    """
    import flora_steps.runtime.training as module

    real_save = module.save_checkpoint
    saves: list[int] = []

    def save_then_die(path, state):
        real_save(path, state)
        saves.append(state["epoch"])
        if len(saves) == at and not hasattr(save_then_die, "killed"):
            save_then_die.killed = True
            raise KeyboardInterrupt

    monkeypatch.setattr(module, "save_checkpoint", save_then_die)
    return saves


def set_key(params: dict, dotted: str, value) -> dict:
    """Set the value at a dotted key (``"retrain.lr"``) of a params dict; returns the dict."""
    *parents, last = dotted.split(".")
    node = params
    for key in parents:
        node = node[key]
    node[last] = value
    return params


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def copy_project(destination: Path) -> Path:
    """Copy what the workflows need (package, wiring, params, profiles) into ``destination``."""
    for name in ("flora_steps", "configs", "report"):
        shutil.copytree(ROOT / name, destination / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("Snakefile", "dvc.yaml", "params.yaml", "environment.yml", ".dvcignore"):
        shutil.copy(ROOT / name, destination / name)
    return destination


#: A guard against a hang, far above any expected time (no test depends on the machine's speed).
HANG_GUARD = 3600


def run_command(command: list[str], guard: int = HANG_GUARD, **options) -> subprocess.CompletedProcess:
    """``subprocess.run`` with captured text output, in its own process group: past ``guard`` seconds the whole
    group is killed (a workflow engine's jobs too), and the test fails saying so."""
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **options
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=guard)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise AssertionError(f"{' '.join(command)}: still running after {guard} s, killed with its processes")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


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
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        from flora_steps.cli import main

        code = main(arguments)
    except BaseException:  # noqa: BLE001 (a forked test process reports and leaves, whatever happened)
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
