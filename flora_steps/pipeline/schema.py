"""The types that describe the pipeline: a stage, its outputs and inputs, its resources; and how an input resolves.

A stage that runs once per budget has ``{budget}`` in its folder and names the list of
the params' ``budgets`` section it runs over (``foreach``); its runs are Snakemake jobs
of one rule (a wildcard) and DVC ``foreach`` items, and a budget has one canonical name
everywhere (``budget_name``). With ``runs`` above 1 in the params, everything after the
dense model runs once per run (a ``replicated`` stage), each run under ``runs/<run>/``
of the results root; with one run there is no such folder. Nothing here imports torch,
so the Snakefile reads it quickly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal

#: The results root of ``params.yaml``; another params file writes under ``results/<its stem>/`` (``results_root``).
RESULTS = Path("results")
#: The params file whose results land directly in ``RESULTS`` (and the only one DVC runs).
DEFAULT_PARAMS = "params.yaml"

OutputKind = Literal["out", "metrics", "plot"]


def results_root(params_file: str | Path) -> Path:
    """Where a run with ``params_file`` writes: ``results/`` for ``params.yaml``, else ``results/<stem>/``,
    so that each profile keeps its own results (``configs/hybrid.yaml``: ``results/hybrid/``)."""
    path = Path(params_file)
    return RESULTS if path.name == DEFAULT_PARAMS else RESULTS / path.stem


def budgets_key(name: str) -> str:
    """The dotted params key of a list or value of the ``budgets`` section: ``search`` -> ``budgets.search``."""
    return f"budgets.{name}"


def budget_name(budget: float) -> str:
    """A budget's one name, in results folders, Snakemake wildcards and DVC ``foreach`` items: 0.5 -> ``0.5``.

    It is Python's ``str`` of the float, which is also how DVC writes a YAML float
    (a YAML integer such as ``1`` would become ``1``, so params reject integers here).
    """
    return repr(float(budget))


@dataclass(frozen=True)
class Output:
    """One file a stage writes into its folder.

    ``kind`` says how DVC keeps it: ``out`` (cached), ``metrics`` or ``plot`` (in git).
    ``category``/``caption`` flag it for ``snakemake --report``; ``plot`` holds
    ``dvc plots`` properties (x, y, title, template).
    """

    file: str
    kind: OutputKind = "out"
    category: str | None = None
    caption: str | None = None
    plot: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Input:
    """An artifact another stage writes: ``stage``'s output ``output``.

    ``budget`` names a value of the params' ``budgets`` section (``ofb_base``): the one
    run of a per-budget producer that a stage running once reads (``resolve``).
    ``every_run``: a stage that is not replicated reads the artifact of every run of the
    pipeline (the report's predictions); otherwise the first run's (a figure).
    ``collected``: read if its stage runs (the report's and the latency stage's models and
    metrics of every method): a stage idle under the params' budgets (``catalogue.idle_stages``)
    gives no paths, and reading it does not make that stage run.
    """

    stage: str
    output: str
    budget: str | None = None
    every_run: bool = False
    collected: bool = False


@dataclass(frozen=True)
class Resources:
    """What one job of a stage needs on a small machine (``cluster/slurm/config.yaml`` scales them per rule).

    ``device``: the stage runs on ``compute.device`` (a GPU job unless that is the CPU).
    ``alone``: the job times models, so it claims every core Snakemake is given: no other job runs beside it.
    """

    mem_mb: int
    runtime: int  # minutes
    device: bool = True
    threads: int | None = None  # CPU threads of a job; None: compute.threads (0: every core it is given)
    alone: bool = False


@dataclass(frozen=True)
class Stage:
    """One command of the pipeline and everything around it.

    ``params`` are the params keys whose values change the stage's results: both
    engines rerun the stage when one of them changes, and its training checkpoint
    belongs to their values. A stage may also read keys of ``catalogue.UNTRACKED``,
    and keys of ``overrides``, whose values it always runs with (an ablation's change).
    A ``machine`` stage's results also depend on the machine it runs on: Snakemake reruns
    it on a new processor, GPU or torch/timm version.
    """

    name: str
    module: str  # the command: ``flora <module>``, ``python -m flora_steps.stages.<module>``
    folder: str
    outputs: Mapping[str, Output]
    inputs: Mapping[str, Input]
    params: tuple[str, ...]
    resources: Resources
    file_params: tuple[str, ...] = ()  # params keys naming a file whose content is an input when set
    method: str | None = None  # ``retrain --method``
    base: str = "dense"  # the base model a FLORA stage compresses (``catalogue.BASES``)
    foreach: str | None = None  # a list of the params' budgets section: one run per budget of it
    distributed: bool = False  # runs as compute.processes processes under torchrun; the others refuse to
    replicated: bool = True  # runs once per run of the pipeline (``runs``); else once, reading the runs' artifacts
    ablation: str | None = None  # one of FLORA's ablations (``methods.ABLATIONS``): ``--ablation``
    overrides: Mapping[str, Any] = field(default_factory=dict)  # params values it runs with, whatever the file says
    machine: bool = False  # times models: its results depend on the machine (``machine.host_fingerprint``)
    cost: Literal["macs", "latency"] = "macs"  # what its budgets limit: MACs, or latency predicted by the table

    def path(self, output: str, budget: str | None = None, root: Path = RESULTS, run: int | None = None) -> Path:
        """Path of one output (``log`` and ``benchmark`` included) for a budget name and run."""
        name = {"log": "log.txt", "benchmark": "benchmark.tsv"}.get(output) or self.outputs[output].file
        return self.directory(budget, root, run) / name

    def directory(self, budget: str | None = None, root: Path = RESULTS, run: int | None = None) -> Path:
        """The stage's results folder for a budget name (the pattern with ``{budget}`` when ``None``) and a run of
        the pipeline (``None``: the pipeline runs once)."""
        return self.run_root(root, run) / (self.folder if budget is None else self.folder.format(budget=budget))

    def run_root(self, root: Path = RESULTS, run: int | None = None) -> Path:
        """Where a run of the pipeline keeps this stage: ``root/runs/<run>`` for a replicated stage of several runs."""
        return root / "runs" / str(run) if run is not None and self.replicated else root

    def root(self, root: Path = RESULTS, run: int | None = None) -> Path:
        """The folder holding every budget's run of the stage (the part of ``folder`` before any wildcard)."""
        return self.run_root(root, run) / self.folder.split("/{")[0]

    def arguments(self, budget: str, run: str | None = None) -> list[str]:
        """Command-line options after ``--params`` (``budget`` and ``run`` are substituted as given; ``run``
        ``None``: the pipeline runs once)."""
        options = ["--method", self.method] if self.method else []
        options += ["--base", self.base] if self.base != "dense" else []
        options += ["--ablation", self.ablation] if self.ablation else []
        options += ["--budget", budget] if self.foreach else []
        return options + (["--run", run] if run is not None and self.replicated else [])


class Case(Enum):
    """How a stage's input maps to the producer's runs."""

    ONCE = "the producer runs once: its one file"
    PINNED = "one run of a per-budget producer, at the budget of a params key"
    SAME = "a per-budget producer into a per-budget stage: the run at the same budget"
    EVERY = "a per-budget producer into a stage that runs once: every run"


@dataclass(frozen=True)
class Resolved:
    """An input resolved: its case, the producing stage and output, and the budgets key that names the runs
    (``PINNED``: the key of the one budget; ``EVERY``: the producer's list; otherwise ``None``)."""

    case: Case
    producer: Stage
    output: str
    budgets: str | None = None


def resolve(consumer: Stage, reference: Input, stages: Mapping[str, Stage]) -> Resolved:
    """The one place that turns an input into its case; the engines only spell the case in their syntax."""
    producer = stages[reference.stage]
    if producer.foreach is None:
        return Resolved(Case.ONCE, producer, reference.output)
    if reference.budget is not None:
        return Resolved(Case.PINNED, producer, reference.output, reference.budget)
    if consumer.foreach is not None:
        return Resolved(Case.SAME, producer, reference.output)
    return Resolved(Case.EVERY, producer, reference.output, producer.foreach)


def budget_values(budgets: Mapping[str, Any], name: str) -> list[str]:
    """The budget names of a value or a list of the params' budgets section (as a plain mapping)."""
    value = budgets[name]
    return [budget_name(b) for b in (value if isinstance(value, list) else [value])]


def runs_of(consumer: Stage, reference: Input, producer: Stage, run: int | None, runs: int) -> list[int | None]:
    """The runs of the pipeline whose artifact an input is: the consumer's own run, every run, or the first."""
    if runs == 1 or not producer.replicated:
        return [None]
    if consumer.replicated:
        return [run]
    return list(range(runs)) if reference.every_run else [0]


def input_paths(
    consumer: Stage,
    budget: str | None,
    budgets: Mapping[str, Any],
    stages: Mapping[str, Stage],
    root: Path = RESULTS,
    run: int | None = None,
    runs: int = 1,
    idle: frozenset[str] = frozenset(),
) -> dict[str, list[Path]]:
    """Each input of one run of ``consumer`` (at budget name ``budget``, in run ``run`` of ``runs``): one path, or
    one per budget of a per-budget producer, for each run it reads (run by run). ``budgets`` is the params'
    budgets section (it says which budgets a producer ran at); an input from an ``idle`` stage has no paths."""
    paths = {}
    for key, reference in consumer.inputs.items():
        found = resolve(consumer, reference, stages)
        if reference.stage in idle:
            paths[key] = []
            continue
        if found.case is Case.ONCE:
            names: list[str | None] = [None]
        elif found.case is Case.SAME:
            names = [budget]
        else:
            names = list(budget_values(budgets, found.budgets))
        paths[key] = [
            found.producer.path(found.output, name, root, each)
            for each in runs_of(consumer, reference, found.producer, run, runs)
            for name in names
        ]
    return paths
