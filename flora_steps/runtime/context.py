"""What every stage command shares: its context (paths, device, seed, timer, identity), log and errors."""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from ..errors import UserError
from ..params import Params, load_params, with_values
from ..pipeline.catalogue import STAGES, idle_stages, param_value, stage_for, tracked_params
from ..pipeline.code import STAGES_PACKAGE
from ..pipeline.commands import add_stage_arguments
from ..pipeline.schema import RESULTS, Stage, budget_name, budgets_key, input_paths, results_root
from . import distributed
from .allocator import use_allocator
from .artifacts import remove_temporaries
from .data import default_workers
from .training import checkpoint_name

log = logging.getLogger(__name__)
#: A fine-tuning seed ``s`` of run ``k`` trains with ``s + RUN_SEEDS * k`` (its name in the results stays ``s``).
RUN_SEEDS = 1000
PACKAGE_LOG = logging.getLogger(__package__.partition(".")[0])
#: Where stage runs log: the package, and the stage module itself, which ``python -m`` names ``__main__``
STAGE_LOGS = (PACKAGE_LOG, logging.getLogger("__main__"))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def why_no_cuda() -> str:
    """Why PyTorch has no usable CUDA device here, in words."""
    if torch.version.cuda is None:
        return "this PyTorch build has no CUDA support"
    return (
        f"PyTorch (built for CUDA {torch.version.cuda}) finds no usable GPU: none is visible, "
        "or the driver is too old for this build"
    )


def file_digest(path: Path) -> str:
    """SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class StageContext:
    """One run of a stage: its params, budget, input and output paths, device, timer and identity.

    ``root`` is the results folder of the params file (``schema.results_root``); ``run``
    the run of the pipeline (``None`` when it runs once), whose ``params.seed`` is
    already the run's own (``for_run``).
    """

    stage: Stage
    params: Params
    budget: float | None = None
    root: Path = RESULTS
    run: int | None = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def method(self) -> str | None:
        return self.stage.method

    @property
    def budget_name(self) -> str | None:
        return None if self.budget is None else budget_name(self.budget)

    @cached_property
    def out(self) -> Path:
        """The run's results folder (created on first use)."""
        folder = self.stage.directory(self.budget_name, self.root, self.run)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def output(self, key: str) -> Path:
        """Where the run writes its output ``key`` (a name of ``catalogue.STAGES[...].outputs``)."""
        return self.out / self.stage.path(key, self.budget_name).name

    def inputs(self, key: str) -> list[Path]:
        """The paths of input ``key``: one, or one per budget when a per-budget stage makes it (for each run of
        the pipeline it reads, run by run)."""
        return self._input_paths[key]

    @cached_property
    def _input_paths(self) -> dict[str, list[Path]]:
        """Every input's paths, resolved once (the stages idle under these budgets give none)."""
        budgets = self._dumped_params["budgets"]
        idle = idle_stages(budgets)
        return input_paths(self.stage, self.budget_name, budgets, STAGES, self.root, self.run, self.params.runs, idle)

    def inputs_by_run(self, key: str) -> list[list[Path]]:
        """The paths of an input read from every run of the pipeline (``Input.every_run``), one list per run."""
        paths = self.inputs(key)
        runs = self.params.runs if self.stage.inputs[key].every_run else 1
        per_run = len(paths) // runs
        return [paths[index * per_run : (index + 1) * per_run] for index in range(runs)]

    @cached_property
    def _dumped_params(self) -> dict[str, Any]:
        return self.params.model_dump(mode="json")

    def input(self, key: str) -> Path:
        """The path of input ``key``, made by a stage that runs once (or at this run's budget)."""
        (path,) = self.inputs(key)
        return path

    @cached_property
    def device(self) -> torch.device:
        """The torch device ``compute.device`` asks for (CUDA under ``auto`` when usable); logged with its name."""
        wanted = self.params.compute.device
        if wanted == "cuda" and not torch.cuda.is_available():
            raise UserError(f"compute.device: cuda requested, but {why_no_cuda()}")
        if wanted == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(wanted)
        if device.type == "cuda":
            log.info("device: %s (%s)", device, torch.cuda.get_device_name(device))
        else:
            reason = f" (compute.device auto: {why_no_cuda()})" if wanted == "auto" else ""
            threads = torch.get_num_threads()
            log.info("device: cpu (%d thread%s)%s", threads, "" if threads == 1 else "s", reason)
        return device

    @cached_property
    def workers(self) -> int:
        """Loader worker processes: ``compute.workers``, or when null the CPUs given, less one, per process."""
        workers = self.params.compute.workers
        return default_workers() if workers is None else workers

    def fit_arguments(self, seed: int | None = None, epochs: int | None = None) -> dict[str, Any]:
        """What ``training.fit`` needs of this run: device, precision, seed (the params' unless a stage trains
        once per ``seed``), checkpoint file (one per seed then), identity, loader workers."""
        return {
            "device": self.device,
            "amp": self.params.compute.amp,
            "seed": self.params.seed if seed is None else seed + RUN_SEEDS * (self.run or 0),
            "checkpoint": self.out / checkpoint_name(seed),
            "identity": self.identity(seed=seed, epochs=epochs),  # not the process count: a resume may use other GPUs
            "workers": self.workers,
        }

    def seconds(self) -> float:
        """Wall time since the run started, rounded to 10 ms."""
        return round(time.perf_counter() - self.started, 2)

    @cached_property
    def _input_digests(self) -> dict[str, list[str]]:
        digests = {key: [file_digest(path) for path in self.inputs(key)] for key in self.stage.inputs}
        for key in self.stage.file_params:
            path = param_value(self._dumped_params, key)
            digests[key] = [file_digest(Path(path))] if path is not None and Path(path).is_file() else []
        return digests

    def identity(self, **extra: Any) -> str:
        """A hash of everything the run's results depend on: its tracked params' values,
        its budget, the content of every input artifact and input file named by a
        param (``Stage.file_params``), and ``extra`` (JSON values).

        A training checkpoint is resumed only by a run with the same identity.
        """
        description = {
            "stage": self.stage.name,
            "budget": self.budget_name,
            "run": self.run,
            "params": tracked_params(self.stage.name, self._dumped_params),
            "inputs": self._input_digests,
            **extra,
        }
        return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def _configure_logging(folder: Path | None, label: str) -> logging.FileHandler | None:
    """Log to stderr, and to ``folder/log.txt`` when given; extra torchrun processes only warn, to stderr."""
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(f"flora {label}: %(message)s"))
    first = os.environ.get("RANK", "0") == "0"
    file = None
    if first and folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(folder / "log.txt", mode="w")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    for logger in STAGE_LOGS:
        logger.handlers.clear()
        logger.propagate = False
        logger.setLevel(logging.INFO if first else logging.WARNING)
        logger.addHandler(console)
        if file is not None:
            logger.addHandler(file)
    return file


def _check_budget(stage: Stage, budget: float | None, params: Params) -> None:
    if stage.foreach is None:
        return
    allowed = getattr(params.budgets, stage.foreach)
    if budget not in allowed:
        raise UserError(f"--budget {budget}: not one of {budgets_key(stage.foreach)} {list(allowed)}")


def _check_processes(stage: Stage) -> None:
    """Only a distributed stage runs under ``torchrun`` with more than one process."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1 and not stage.distributed:
        names = ", ".join(dict.fromkeys(s.module for s in STAGES.values() if s.distributed))
        raise UserError(
            f"{stage.name} runs as one process, but torchrun started {processes} (WORLD_SIZE={processes}); "
            f"only {names} run under torchrun"
        )


def _check_run(stage: Stage, run: int | None, params: Params) -> int | None:
    """The run of the pipeline a replicated stage's command runs: ``--run`` (required with several ``runs``);
    ``None`` when the pipeline runs once."""
    if params.runs == 1 or not stage.replicated:
        if run not in (None, 0):
            raise UserError(
                f"--run {run}: the params have runs: {params.runs}"
                + ("" if stage.replicated else f"; {stage.name} runs once")
            )
        return None
    if run is None or not 0 <= run < params.runs:
        raise UserError(f"--run: give one of 0 to {params.runs - 1} (the params have runs: {params.runs})")
    return run


def for_run(params: Params, run: int | None) -> Params:
    """The params of run ``run`` of the pipeline: its own ``seed`` (``seed + run``)."""
    return params if run is None else params.model_copy(update={"seed": params.seed + run})


def _under_torchrun(stage: Stage, params_path: Path, budget: float | None, run: int | None, processes: int) -> int:
    """Run the stage again as ``processes`` processes under ``torchrun`` (one per GPU); their exit status."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    options = stage.arguments("" if budget is None else budget_name(budget), None if run is None else str(run))
    command = [*launcher, "-m", f"{STAGES_PACKAGE}.{stage.module}", "--params", str(params_path), *options]
    log.info("starting %d processes under torchrun (compute.processes): %s", processes, shlex.join(command))
    return subprocess.call(command)


def _first_missing(folder: Path) -> Path | None:
    """The outermost folder on the way to ``folder`` (itself included) that does not exist yet."""
    return next((path for path in (*reversed(folder.parents), folder) if not path.exists()), None)


def run_stage(
    module: str,
    run: Callable[[StageContext], None],
    params_path: Path,
    method: str | None = None,
    budget=None,
    base: str = "dense",
    pipeline_run: int | None = None,
    ablation: str | None = None,
) -> int:
    """Load params, log to the run's ``log.txt``, run the stage (in run ``pipeline_run`` of the pipeline, with an
    ablation's overrides); user errors become one line.

    A run rejected by a user error leaves no files behind: nothing is written before
    params and budget are valid, and a results folder the run created is removed
    again (a folder that was already there keeps its files; its ``log.txt`` tells the error).
    """
    on = None if base == "dense" else f"on {base}"
    number = None if pipeline_run is None else f"run {pipeline_run}"
    parts = (module, method, on, ablation, None if budget is None else budget_name(budget), number)
    label = "/".join(part for part in parts if part)
    _configure_logging(None, label)
    try:
        stage = stage_for(module, method, base, ablation)
    except KeyError:
        command = f"{module}{f' --method {method}' if method else ''}"
        if ablation and base != "dense":
            log.error(
                "error: --ablation %s: the ablations run on the dense model only, not with --base %s", ablation, base
            )
        elif ablation:
            log.error("error: --ablation %s: %s is not a stage of that ablation", ablation, command)
        else:
            log.error("error: --base %s: %s runs on the dense model only", base, command)
        return 2
    try:
        _check_processes(stage)
        params = load_params(params_path)
        _check_budget(stage, budget, params)
        pipeline_run = _check_run(stage, pipeline_run, params)
    except UserError as error:
        log.error("error: %s", error)
        return 2
    if stage.distributed and params.compute.processes > 1 and "WORLD_SIZE" not in os.environ:
        return _under_torchrun(stage, params_path, budget, pipeline_run, params.compute.processes)
    params = with_values(for_run(params, pipeline_run), stage.overrides)
    context = StageContext(stage, params, budget, results_root(params_path), pipeline_run)
    params = context.params
    created = _first_missing(stage.directory(context.budget_name, context.root, pipeline_run))
    file_handler = _configure_logging(context.out, label)
    failed = False
    try:
        log.info("params from %s", params_path)
        for path in remove_temporaries(context.out):
            log.info("removed %s, left by a killed run", path)
        if params.compute.threads:
            torch.set_num_threads(params.compute.threads)
        use_allocator(params.compute.allocator)
        seed_everything(params.seed)
        if stage.distributed and "WORLD_SIZE" in os.environ:
            context.device = distributed.join(context.device)
            log.info("one of %d processes under torchrun, each on %s", distributed.world()[1], context.device.type)
        with logging_redirect_tqdm(list(STAGE_LOGS)):
            run(context)
        log.info("done in %.1f s", context.seconds())
        return 0
    except UserError as error:
        log.error("error: %s", error)
        failed = True
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; a rerun resumes from the last checkpoint where the stage keeps one")
        return 130
    finally:
        distributed.leave()
        if file_handler is not None:
            for logger in STAGE_LOGS:
                logger.removeHandler(file_handler)
            file_handler.close()
        if failed and created is not None:
            shutil.rmtree(created, ignore_errors=True)


def run_from_args(module: str, run: Callable[[StageContext], None], args: argparse.Namespace) -> int:
    """Run a stage from its parsed arguments."""
    return run_stage(
        module,
        run,
        args.params,
        getattr(args, "method", None),
        getattr(args, "budget", None),
        getattr(args, "base", "dense"),
        getattr(args, "run", None),
        getattr(args, "ablation", None),
    )


def stage_main(module: str, description: str, run: Callable[[StageContext], None], argv: Sequence[str] | None) -> int:
    """Entry point for ``python -m flora_steps.stages.<module>``."""
    parser = argparse.ArgumentParser(prog=f"python -m {STAGES_PACKAGE}.{module}", description=description)
    add_stage_arguments(parser, module)
    return run_from_args(module, run, parser.parse_args(argv))


def run_as_program(main: Callable[[], int]) -> NoReturn:
    """Run a command's ``main`` as the whole process and exit with its code (``python -m flora_steps.stages.<stage>``).

    What is imported by then (torch, timm, the package: about a million objects) lives as
    long as the process, so it is frozen out of the garbage collector's sight first: later
    full collections, and the one at exit, no longer walk it. That takes 1.5 to 3 s off
    every job on a slow 2-core machine (``bench/startup.py``), where most of a small job
    is start-up. Only a process of its own may do this: frozen objects are never collected.
    """
    gc.freeze()
    raise SystemExit(main())
