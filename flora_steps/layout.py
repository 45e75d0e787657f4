"""The pipeline's shape, described once: every stage's artifacts, inputs, params and command.

The stages take their paths from here (through ``StageContext``), the ``Snakefile``
wires its rules from here (outputs, inputs as other rules' outputs, params, code),
and ``dvc.yaml`` is generated from here (``flora dvc-yaml``). Nothing in this module
imports torch, so the Snakefile reads it quickly.

A stage that runs once per budget has ``{budget}`` in its folder; its runs are
Snakemake jobs of one rule (a wildcard) and DVC ``foreach`` items, and a budget has
one canonical name everywhere (``budget_name``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

RESULTS = Path("results")
PACKAGE = Path(__file__).resolve().parent

OutputKind = Literal["out", "metrics", "plot"]


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

    From a per-budget stage into a per-budget stage: the same budget. From a
    per-budget stage into a stage that runs once: every budget of ``foreach``, or the
    one budget at the params key ``budget`` when it is given (``budgets.ofb_base``).
    """

    stage: str
    output: str
    budget: str | None = None


@dataclass(frozen=True)
class Stage:
    """One command of the pipeline and everything around it.

    ``params`` are the params keys whose values change the stage's results: both
    engines rerun the stage when one of them changes, and its training checkpoint
    belongs to their values. A stage may also read keys of ``UNTRACKED``.
    """

    name: str
    module: str
    folder: str
    outputs: Mapping[str, Output]
    inputs: Mapping[str, Input]
    params: tuple[str, ...]
    file_params: tuple[str, ...] = ()  # params keys naming a file whose content is an input when set
    method: str | None = None
    base: str = "dense"  # the base model a FLORA stage compresses (``BASES``)
    foreach: str | None = None  # "budgets.search": one run per budget of that params list
    distributed: bool = False  # runs as compute.processes processes under torchrun; the others refuse to

    def path(self, output: str, budget: str | None = None) -> Path:
        """Path of one output (``log`` and ``benchmark`` included) for a budget name."""
        name = {"log": "log.txt", "benchmark": "benchmark.tsv"}.get(output) or self.outputs[output].file
        return self.directory(budget) / name

    def directory(self, budget: str | None = None) -> Path:
        """The stage's results folder for a budget name (the pattern with ``{budget}`` when ``None``)."""
        return RESULTS / (self.folder if budget is None else self.folder.format(budget=budget))

    @property
    def root(self) -> Path:
        """The folder holding every run of the stage (the part of ``folder`` before any wildcard)."""
        return RESULTS / self.folder.split("/{")[0]

    def arguments(self, budget: str) -> list[str]:
        """Command-line options after ``--params`` (``budget`` is substituted as given)."""
        options = ["--method", self.method] if self.method else []
        options += ["--base", self.base] if self.base != "dense" else []
        return options + (["--budget", budget] if self.foreach else [])


def budget_name(budget: float) -> str:
    """A budget's one name, in results folders, Snakemake wildcards and DVC ``foreach`` items: 0.5 -> ``0.5``.

    It is Python's ``str`` of the float, which is also how DVC writes a YAML float
    (a YAML integer such as ``1`` would become ``1``, so params reject integers here).
    """
    return repr(float(budget))


DATA = (
    "data.dataset",
    "data.root",
    "data.val_fraction",
    "data.test_fraction",
    "data.split_seed",
    "data.shift",
    "data.train_transform",
    "data.crop_pct",
    "data.skip_unreadable",
)
DEVICE = ("compute.device", "compute.amp")
TRAINING = ("epochs", "batch_size", "lr", "min_lr", "weight_decay", "warmup_epochs", "grad_clip")
BUDGETS = ("budgets.search", "budgets.uniform")

#: Keys a stage may read without tracking them, because they do not change its results
#: (a stage whose results they do change tracks them: the latency stage tracks threads).
UNTRACKED = {
    "compute.threads": "CPU threads: speed",
    "compute.workers": "loader processes: speed (each training image's augmentation has its own seed)",
    "compute.processes": "torchrun processes: the global batch and schedule stay the same",
    "data.eval_batch_size": "evaluation batching",
    "pretrain.micro_batch": "memory: gradients accumulate to the same global batch",
    "supernet.micro_batch": "memory: gradients accumulate to the same global batch",
    "retrain.micro_batch": "memory: gradients accumulate to the same global batch",
    "slim.micro_batch": "memory: gradients accumulate to the same global batch",
    "budgets.search": "which budgets run; a per-budget stage only checks that its own is listed",
    "budgets.uniform": "which budgets run; a per-budget stage only checks that its own is listed",
    "budgets.slim": "which budgets run; a per-budget stage only checks that its own is listed",
    "budgets.slim_flora": "which budgets run; a per-budget stage only checks that its own is listed",
    "budgets.ofb": "which budgets run; a per-budget stage only checks that its own is listed",
    "budgets.ofb_flora": "which budgets run; a per-budget stage only checks that its own is listed",
    "ofb.micro_batch": "memory: gradients accumulate to the same global batch (PMIM's token masks are drawn per "
    "micro-batch: documented)",
}


def _keys(section: str, names: Iterable[str]) -> tuple[str, ...]:
    return tuple(f"{section}.{name}" for name in names)


#: A model artifact: weights beside the JSON that says what to build before loading them.
_MODEL = {"model": Output("model.safetensors"), "spec": Output("model.json")}


def _model_of(stage: str, name: str = "model", budget: str | None = None) -> dict[str, Input]:
    """The model artifact of ``stage`` as two inputs: ``name`` (weights) and ``<name>_spec`` (or ``spec``);
    of a per-budget stage's run at the params key ``budget`` when given."""
    spec = "spec" if name == "model" else f"{name}_spec"
    return {name: Input(stage, "model", budget), spec: Input(stage, "spec", budget)}


_TEACHER = _model_of("pretrain", "teacher")


def _table(name: str, plot: Mapping[str, str] | None = None) -> dict[str, Output]:
    """A report table as CSV (raw numbers; a DVC plot when ``plot`` is given), Markdown and LaTeX."""
    return {
        f"{name}_csv": Output(f"{name}.csv", "plot" if plot else "out", category="Tables", plot=plot or {}),
        f"{name}_md": Output(f"{name}.md"),
        f"{name}_tex": Output(f"{name}.tex"),
    }


#: The report's compressed models: each method and the retrain stage that makes its models, per budget.
METHOD_STAGES = {
    "uniform": "retrain_uniform",
    "control": "retrain_control",
    "flora": "retrain_flora",
    "slim": "retrain_slim",
    "slim_flora": "retrain_flora_on_slim",
    "ofb": "retrain_ofb",
    "ofb_flora": "retrain_flora_on_ofb",
}

_RETRAIN_OUTPUTS = {
    **_MODEL,
    "ranks": Output("ranks.json"),
    "history": Output("history.csv"),
    "predictions": Output("predictions.csv"),
    "metrics": Output("metrics.json", "metrics"),
}
_RETRAIN_PARAMS = (
    "seed",
    *DEVICE,
    *DATA,
    *_keys("retrain", (*TRAINING, "seeds", "temperature", "hard_label_weight")),
)


@dataclass(frozen=True)
class Base:
    """A model FLORA compresses: the dense base model, or a model another method already compressed.

    FLORA's stages (``flora_stages``) are described once and run on every base; on a
    base other than the dense one their names end in ``_on_<base>`` and their folders
    sit under ``on_<base>/``. Budgets stay fractions of the dense model's MACs.
    """

    name: str
    model: str  # the stage whose model is the base (its metrics count the training the base had)
    budgets: str  # the params list of FLORA's budgets on this base
    model_budget: str | None = None  # when ``model`` runs per budget: the params key of the base's budget

    def stage(self, name: str) -> str:
        """A FLORA stage's name on this base: ``search``, or ``search_on_slim``."""
        return name if self.name == "dense" else f"{name}_on_{self.name}"

    def folder(self, folder: str) -> str:
        """A FLORA stage's results folder on this base: ``search/{budget}``, or ``on_slim/search/{budget}``."""
        return folder if self.name == "dense" else f"on_{self.name}/{folder}"


BASES = {
    "dense": Base("dense", "pretrain", "budgets.search"),
    "slim": Base("slim", "slim_base", "budgets.slim_flora"),  # ViT-Slim's searched model, sliced
    "ofb": Base("ofb", "ofb", "budgets.ofb_flora", "budgets.ofb_base"),  # OFB's searched (sliced) model
}


def _retrain(
    method: str,
    source: str,
    extra: Mapping[str, Input] | None = None,
    params: tuple[str, ...] = (),
    base: Base = BASES["dense"],
    foreach: str = "budgets.uniform",
) -> Stage:
    """A retrain stage: ``method``'s compressed model from ``source``'s model, fine-tuned per budget of ``foreach``."""
    return Stage(
        name=base.stage(f"retrain_{method}"),
        module="retrain",
        method=method,
        base=base.name,
        folder=base.folder(f"retrain/{method}/{{budget}}"),
        foreach=foreach,
        outputs=_RETRAIN_OUTPUTS,
        inputs={**_model_of(source), **_TEACHER, **(extra or {})},
        params=(*_RETRAIN_PARAMS, *params),
        distributed=True,
    )


def flora_stages(base: Base) -> list[Stage]:
    """FLORA on one base model: decompose it, filter the candidate ranks, train the supernet, search per
    budget, fine-tune each searched subnet. The training the base model had counts in FLORA's."""
    name = base.stage
    base_training = {"base_training": Input(base.model, "metrics", base.model_budget)} if base.name != "dense" else {}
    return [
        Stage(
            name=name("decompose"),
            module="decompose",
            base=base.name,
            folder=base.folder("decompose"),
            outputs={
                **_MODEL,
                "spectra": Output("spectra.csv"),
                "layers": Output("layers.csv"),
                "plot": Output("spectra.png", "plot", category="Decompose", caption="report/spectra.rst"),
                "metrics": Output("metrics.json", "metrics"),
            },
            inputs=_model_of(base.model, budget=base.model_budget),
            params=("seed", "decompose.targets"),  # a base's budget is in its input's path
        ),
        Stage(
            name=name("filter"),
            module="filter",
            base=base.name,
            folder=base.folder("filter"),
            outputs={
                "space": Output("space.json"),
                "sensitivity": Output("sensitivity.csv"),
                "plot": Output("sensitivity.png", "plot", category="Filter", caption="report/sensitivity.rst"),
                "metrics": Output("metrics.json", "metrics"),
            },
            inputs=_model_of(name("decompose")),
            params=("seed", *DEVICE, *DATA, *_keys("filter", ("ratios", "images", "keep_ratio", "bins"))),
            distributed=True,
        ),
        Stage(
            name=name("supernet"),
            module="supernet",
            base=base.name,
            folder=base.folder("supernet"),
            outputs={
                **_MODEL,
                "history": Output("history.csv"),
                "metrics": Output("metrics.json", "metrics"),
            },
            inputs={
                **_model_of(name("decompose")),
                **_TEACHER,
                "space": Input(name("filter"), "space"),
            },
            params=(
                "seed",
                *DEVICE,
                *DATA,
                *_keys("supernet", (*TRAINING, "sampling", "temperature", "hard_label_weight")),
            ),
            distributed=True,
        ),
        Stage(
            name=name("search"),
            module="search",
            base=base.name,
            folder=base.folder("search/{budget}"),
            foreach=base.budgets,
            outputs={
                "ranks": Output("ranks.json"),
                "history": Output(
                    "history.csv",
                    category="Search",
                    plot={"x": "generation", "y": "best_top1", "title": "Search, best val top-1 per generation"},
                ),
                "metrics": Output("metrics.json", "metrics"),
            },
            inputs={
                **_model_of(name("supernet")),
                **_TEACHER,
                "space": Input(name("filter"), "space"),
            },
            params=(
                "seed",
                *DEVICE,
                *DATA,
                "supernet.temperature",
                *_keys(
                    "search",
                    ("band", "population", "top_k", "mutations", "mutation_prob", "crossovers", "generations"),
                ),
                "search.val_images",
            ),
            distributed=True,
        ),
        _retrain(
            "flora",
            name("supernet"),
            {"inherited": Input(name("supernet"), "metrics"), **base_training, "ranks": Input(name("search"), "ranks")},
            base=base,
            foreach=base.budgets,
        ),
    ]


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            name="pretrain",
            module="pretrain",
            folder="pretrain",
            outputs={
                **_MODEL,
                "history": Output(
                    "history.csv", plot={"x": "epoch", "y": "val_top1", "title": "Base model, val top-1 per epoch"}
                ),
                "predictions": Output("predictions.csv"),
                "metrics": Output("metrics.json", "metrics"),
            },
            inputs={},
            params=(
                "seed",
                *DEVICE,
                *_keys("model", ("name", "checkpoint", "hub", "num_classes", "kwargs")),
                *DATA,
                *_keys("pretrain", (*TRAINING, "label_smoothing")),
            ),
            file_params=("model.checkpoint",),
        ),
        *flora_stages(BASES["dense"]),
        # the baselines: one uniform rank ratio, from the supernet (the control) or from the SVD (uniform)
        _retrain(
            "control", "supernet", {"inherited": Input("supernet", "metrics")}, ("retrain.uniform_rank_multiple",)
        ),
        _retrain(
            "uniform",
            "decompose",
            params=("retrain.uniform_rank_multiple", "retrain.uniform_epochs", "supernet.epochs"),
        ),
        Stage(
            name="slim",
            module="slim",
            folder="slim",
            outputs={
                **_MODEL,
                "masks": Output("masks.safetensors"),
                "history": Output("history.csv"),
                "metrics": Output("metrics.json", "metrics"),
            },
            inputs={**_model_of("pretrain"), **_TEACHER},
            params=(
                "seed",
                *DEVICE,
                *DATA,
                *_keys("slim", (*TRAINING, "attention_weight", "mlp_weight", "temperature", "hard_label_weight")),
            ),
            distributed=True,
        ),
        _retrain(
            "slim",
            "slim",
            {"inherited": Input("slim", "metrics"), "masks": Input("slim", "masks")},
            ("retrain.slim_epochs", "supernet.epochs"),
            foreach="budgets.slim",
        ),
        Stage(
            name="slim_base",
            module="slim_base",
            folder="slim_base",
            outputs={**_MODEL, "metrics": Output("metrics.json", "metrics")},
            inputs={**_model_of("slim"), "masks": Input("slim", "masks"), "inherited": Input("slim", "metrics")},
            params=("seed", *DEVICE, *DATA, "budgets.slim_base"),
        ),
        *flora_stages(BASES["slim"]),
        Stage(
            name="ofb",
            module="ofb",
            folder="ofb/{budget}",
            foreach="budgets.ofb",
            outputs={
                **_MODEL,
                "structure": Output("structure.json"),
                "history": Output("history.csv"),
                "metrics": Output("metrics.json", "metrics"),
            },
            inputs={**_model_of("pretrain"), **_TEACHER},
            params=(
                "seed",
                *DEVICE,
                *DATA,
                "search.band",
                *_keys(
                    "ofb",
                    (
                        *TRAINING,
                        "arch_lr",
                        "temperature",
                        "hard_label_weight",
                        "head_ratios",
                        "head_dim_ratios",
                        "mlp_ratios",
                        "embed_ratios",
                        "ramp_epochs",
                        "score_weight",
                        "mask_ratio",
                        "reconstruction_weight",
                        "macs_weight",
                        "onehot_weight",
                        "attention_weight",
                        "mlp_weight",
                        "embed_weight",
                        "prune_threshold",
                        "prunes_per_epoch",
                        "target_window",
                    ),
                ),
            ),
            distributed=True,
        ),
        _retrain(
            "ofb",
            "ofb",
            {"inherited": Input("ofb", "metrics")},
            ("retrain.ofb_epochs", "supernet.epochs"),
            foreach="budgets.ofb",
        ),
        *flora_stages(BASES["ofb"]),
        Stage(
            name="latency",
            module="latency",
            folder="latency",
            outputs={"latency": Output("latency.csv"), "metrics": Output("metrics.json", "metrics")},
            inputs={
                **_model_of("pretrain", "dense"),
                **_model_of("retrain_flora", "flora"),
                **_model_of("retrain_uniform", "uniform"),
            },
            params=(
                "seed",
                "compute.device",
                "compute.threads",
                *BUDGETS,
                "retrain.latency_batch",
                "retrain.latency_repeats",
            ),
        ),
        Stage(
            name="report",
            module="report",
            folder="report",
            outputs={
                **_table(
                    "results",
                    {
                        "x": "macs",
                        "y": "top1",
                        "template": "scatter",
                        "title": "Test top-1 vs MACs (every method)",
                    },
                ),
                **_table("comparison"),
                **_table("ranks"),
                **_table("costs"),
                **_table("search_costs"),
                "tradeoff": Output("tradeoff.png", "plot", category="Headline", caption="report/tradeoff.rst"),
                "spectra": Output("spectra.png", "plot", category="Decompose", caption="report/spectra.rst"),
                "sensitivity": Output("sensitivity.png", "plot", category="Filter", caption="report/sensitivity.rst"),
                "search": Output("search.png", "plot", category="Search", caption="report/search.rst"),
                "ranks_figure": Output("ranks.png", "plot", category="Search", caption="report/ranks.rst"),
                "sampling": Output("sampling.png", "plot", category="Supernet", caption="report/sampling.rst"),
                "summary": Output("summary.json", "metrics"),
            },
            inputs={
                "base": Input("pretrain", "metrics"),
                "spectra": Input("decompose", "spectra"),
                "layers": Input("decompose", "layers"),
                "decompose": Input("decompose", "metrics"),
                "spec": Input("decompose", "spec"),
                "sensitivity": Input("filter", "sensitivity"),
                "space": Input("filter", "space"),
                "filter": Input("filter", "metrics"),
                "supernet": Input("supernet", "metrics"),
                "search": Input("search", "metrics"),
                "search_history": Input("search", "history"),
                "search_ranks": Input("search", "ranks"),
                "dense_predictions": Input("pretrain", "predictions"),
                "slim_search": Input("slim", "metrics"),
                "slim_base": Input("slim_base", "metrics"),
                **{
                    name: Input(name, "metrics") for name in ("decompose_on_slim", "filter_on_slim", "supernet_on_slim")
                },
                "search_on_slim": Input("search_on_slim", "metrics"),
                "ofb_search": Input("ofb", "metrics"),
                "ofb_base": Input("ofb", "metrics", "budgets.ofb_base"),
                **{name: Input(name, "metrics") for name in ("decompose_on_ofb", "filter_on_ofb", "supernet_on_ofb")},
                "search_on_ofb": Input("search_on_ofb", "metrics"),
                **{
                    f"{method}{suffix}": Input(stage, output)
                    for method, stage in METHOD_STAGES.items()
                    for suffix, output in (("", "metrics"), ("_predictions", "predictions"))
                },
            },
            params=(
                "seed",
                *BUDGETS,
                "budgets.slim",
                "budgets.slim_flora",
                "budgets.ofb",
                "budgets.ofb_flora",
                "decompose.targets",
            ),
        ),
    )
}

#: DVC plots that combine columns of one file (declared at the top level of dvc.yaml).
COMBINED_PLOTS = {
    "supernet_val_top1": {
        "title": "Supernet, val top-1 of the smallest and the largest subnet",
        "x": "epoch",
        "y": {"results/supernet/history.csv": ["val_top1_smallest", "val_top1_largest"]},
    }
}


def stage_for(module: str, method: str | None = None, base: str = "dense") -> Stage:
    """The stage a command runs: ``retrain --method flora`` is ``retrain_flora``, with ``--base slim``
    ``retrain_flora_on_slim``."""
    return STAGES[BASES[base].stage(f"{module}_{method}" if method else module)]


def param_value(params: Mapping[str, Any], key: str) -> Any:
    """The value at a dotted key of a params mapping (``"retrain.lr"``)."""
    value: Any = params
    for part in key.split("."):
        value = value[part]
    return value


def tracked_params(stage: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The stage's tracked keys and their values (what both engines compare to rerun it)."""
    return {key: param_value(params, key) for key in STAGES[stage].params}


def input_paths(stage: str, budget: str | None, params: Mapping[str, Any]) -> dict[str, list[Path]]:
    """Each input of one run of ``stage``: one path, or one per budget for a per-budget producer.

    ``params`` is the params mapping (its budgets say which runs a producer made).
    """
    consumer = STAGES[stage]
    paths = {}
    for key, reference in consumer.inputs.items():
        producer = STAGES[reference.stage]
        if producer.foreach is None:
            paths[key] = [producer.path(reference.output)]
        elif reference.budget is not None:
            paths[key] = [producer.path(reference.output, budget_name(param_value(params, reference.budget)))]
        elif consumer.foreach is not None:
            paths[key] = [producer.path(reference.output, budget)]
        else:
            names = [budget_name(b) for b in param_value(params, producer.foreach)]
            paths[key] = [producer.path(reference.output, name) for name in names]
    return paths


def _module_file(module: str) -> Path | None:
    """The source file of a ``flora_steps`` module name, or ``None`` outside the package."""
    parts = module.split(".")
    if parts[0] != PACKAGE.name:
        return None
    base = PACKAGE.joinpath(*parts[1:])
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


@cache
def _imports(path: Path) -> frozenset[str]:
    """Package modules ``path`` imports (a package's ``__init__`` runs too), read from its source."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return frozenset(found)


def code_files(module: str) -> list[Path]:
    """Every package source file that ``python -m flora_steps.<module>`` runs, by its imports (transitively).

    Importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` too, so those
    count. Paths are relative to the repository root, sorted.
    """
    pending, seen = [f"{PACKAGE.name}.{module}"], set()
    while pending:
        name = pending.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            path = _module_file(".".join(parts[:depth]))
            if path is not None and path not in seen:
                seen.add(path)
                pending.extend(_imports(path))
    return sorted(path.relative_to(PACKAGE.parent) for path in seen)
