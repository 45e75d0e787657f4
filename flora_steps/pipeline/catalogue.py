"""The pipeline's stages, described once: every stage's artifacts, inputs, params, resources and command.

The stages take their paths from here (through ``runtime.context.StageContext``), the
``Snakefile`` makes one rule per stage from here, and ``dvc.yaml`` is generated from
here (``flora dvc-yaml``). FLORA's stages are described once and made for every base
model (``methods.BASES``), from the first one each changes, for every ablation
(``methods.ABLATIONS``), and from the filter on for FLORA under latency budgets
(``latency_flora_stages``); each method's ``retrain`` stage is made from its record
(``methods.METHODS``, ``methods.ABLATION_METHODS``). Nothing here imports torch, so the
Snakefile reads it quickly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from functools import cache
from typing import Any

from .methods import ABLATION_METHODS, ABLATIONS, BASES, METHODS, RETRAINED, Ablation, Base, Method
from .schema import Case, Input, Output, Resources, Stage, budgets_key, resolve

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

#: Memory and time of one job of each command on a small machine; ``device=False``: never on compute.device.
SMALL, ONE_PASS, TRAINS = Resources(4000, 30), Resources(4000, 60), Resources(8000, 720)
RESOURCES = {
    "pretrain": ONE_PASS,
    "decompose": Resources(4000, 30, device=False),
    "filter": Resources(8000, 120),
    "supernet": TRAINS,
    "search": Resources(8000, 240),
    "retrain": TRAINS,
    "slim": TRAINS,
    "ofb": TRAINS,
    "base": TRAINS,
    "filter_latency": SMALL,
    "latency_table": Resources(4000, 30, alone=True),
    "latency_table_ofb": Resources(4000, 30, alone=True),
    "latency": Resources(8000, 60, alone=True),
    "report": Resources(2000, 10, device=False, threads=1),
    "ablations": Resources(2000, 10, device=False, threads=1),
}


def _keys(section: str, names: Iterable[str]) -> tuple[str, ...]:
    return tuple(f"{section}.{name}" for name in names)


#: A model artifact: weights beside the JSON that says what to build before loading them.
_MODEL = {"model": Output("model.safetensors"), "spec": Output("model.json")}


def _model_of(stage: str, name: str = "model", budget: str | None = None) -> dict[str, Input]:
    """The model artifact of ``stage`` as two inputs: ``name`` (weights) and ``<name>_spec`` (or ``spec``);
    of a per-budget stage's run at the budgets key ``budget`` when given."""
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


def _stage(name: str, module: str | None = None, **fields: Any) -> Stage:
    """A stage with its command's resources; ``module`` defaults to the name."""
    module = module or name
    return Stage(name=name, module=module, resources=RESOURCES[module], **fields)


_RETRAIN_OUTPUTS = {
    **_MODEL,
    "ranks": Output("ranks.json"),
    "history": Output("history.csv"),
    "predictions": Output("predictions.csv"),
    "inherited_predictions": Output("predictions_inherited.csv"),
    "metrics": Output("metrics.json", "metrics"),
}
_RETRAIN_PARAMS = (
    "seed",
    *DEVICE,
    *DATA,
    *_keys("retrain", (*TRAINING, "seeds", "temperature", "hard_label_weight")),
)
#: What each way of building a model reads beyond its source model: inputs (by the source stage) and params.
_BUILD_INPUTS = {
    "searched_ranks": lambda method: {"ranks": Input(method.searched_by, "ranks")},
    "sliced": lambda method: {"masks": Input(method.source, "masks")},
}
_BUILD_PARAMS = {"uniform_ranks": ("retrain.uniform_rank_multiple",)}
#: What a stage pricing by the latency table reads beyond the table: the budgets' unit, the table's key.
_LATENCY_BUDGET = (budgets_key("latency_unit"), "retrain.latency_batch")


def retrain_stage(method: Method) -> Stage:
    """``retrain --method``: ``method``'s compressed model per budget, fine-tuned once per seed and evaluated.

    It inherits the training of ``method.inherits`` and, on a compressed base, the training that base had.
    """
    base = BASES[method.base]
    inputs = {**_model_of(method.source), **_TEACHER}
    if method.inherits:
        inputs["inherited"] = Input(method.inherits, "metrics")
    if base.name != "dense":
        inputs["base_training"] = Input(base.model, "metrics")
    inputs |= _BUILD_INPUTS.get(method.build, lambda _: {})(method)
    priced = method.cost == "latency" and method.build in ("uniform_ranks", "sliced")  # fitted by the table
    inputs |= {"table": Input("latency_table", "table")} if priced else {}
    epochs = (method.epochs, "supernet.epochs") if method.epochs else ()
    epochs += ("retrain.base_epochs",) if method.epochs and method.source in BASES else ()
    name, folder = base.stage(f"retrain_{method.option}"), base.folder(f"retrain/{method.option}/{{budget}}")
    if method.ablation:
        ablation = ABLATIONS[method.ablation]
        name, folder = ablation.stage(name), ablation.folder("retrain/{budget}")
    return _stage(
        name,
        "retrain",
        method=method.option,
        base=base.name,
        ablation=method.ablation,
        folder=folder,
        foreach=method.budgets,
        outputs=_RETRAIN_OUTPUTS,
        inputs=inputs,
        params=(*_RETRAIN_PARAMS, *_BUILD_PARAMS.get(method.build, ()), *epochs, *(_LATENCY_BUDGET if priced else ())),
        distributed=True,
        cost=method.cost,
    )


def flora_stages(base: Base) -> list[Stage]:
    """FLORA on one base model, up to its search: decompose it, filter the candidate ranks, train the supernet,
    search per budget (its retrain stage comes from its method's record)."""
    name = base.stage
    return [
        _stage(
            name("decompose"),
            "decompose",
            base=base.name,
            folder=base.folder("decompose"),
            outputs={
                **_MODEL,
                "spectra": Output("spectra.csv"),
                "layers": Output("layers.csv"),
                "plot": Output("spectra.png", "plot", category="Decompose", caption="report/spectra.rst"),
                "metrics": Output("metrics.json", "metrics"),
            },
            inputs=_model_of(base.model),
            params=("seed", "decompose.targets"),  # a base's budget is in its input's path
        ),
        _stage(
            name("filter"),
            "filter",
            base=base.name,
            folder=base.folder("filter"),
            outputs={
                "space": Output("space.json"),
                "sensitivity": Output("sensitivity.csv"),
                "plot": Output("sensitivity.png", "plot", category="Filter", caption="report/sensitivity.rst"),
                "metrics": Output("metrics.json", "metrics"),
            },
            inputs=_model_of(name("decompose")),
            params=(
                "seed",
                *DEVICE,
                *DATA,
                *_keys("filter", ("ratios", "images", "keep_ratio", "bins")),
                *_keys("filter.local", (*TRAINING, "share")),
            ),
            distributed=True,
        ),
        _stage(
            name("supernet"),
            "supernet",
            base=base.name,
            folder=base.folder("supernet"),
            outputs={**_MODEL, "history": Output("history.csv"), "metrics": Output("metrics.json", "metrics")},
            inputs={**_model_of(name("decompose")), **_TEACHER, "space": Input(name("filter"), "space")},
            params=(
                "seed",
                *DEVICE,
                *DATA,
                *_keys("supernet", (*TRAINING, "sampling", "init", "temperature", "hard_label_weight")),
            ),
            distributed=True,
        ),
        _stage(
            name("search"),
            "search",
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
                "candidates": Output("candidates.csv"),
                "metrics": Output("metrics.json", "metrics"),
            },
            inputs={**_model_of(name("supernet")), **_TEACHER, "space": Input(name("filter"), "space")},
            params=(
                "seed",
                *DEVICE,
                *DATA,
                "supernet.temperature",
                "supernet.sampling",
                *_keys(
                    "search",
                    ("band", "population", "top_k", "mutations", "mutation_prob", "crossovers", "generations"),
                ),
                "search.val_images",
                "search.held_out",
            ),
            distributed=True,
        ),
    ]


def ablation_stages(ablation: Ablation) -> list[Stage]:
    """FLORA's stages on the dense model that ``ablation`` runs anew, under its names and folders, with its
    overrides (no longer tracked: they are the same whatever the params say, nor are the keys they make moot);
    their inputs from stages it runs anew are its own, the others FLORA's (without a supernet, the SVD's model in
    place of the supernet's)."""
    own = {module: ablation.stage(module) for module in ablation.redoes}  # on the dense model a stage is its command
    if not ablation.supernet:
        own["supernet"] = "decompose"
    return [
        replace(
            stage,
            name=ablation.stage(stage.name),
            folder=ablation.folder(stage.folder),
            inputs={key: replace(read, stage=own.get(read.stage, read.stage)) for key, read in stage.inputs.items()},
            params=tuple(
                key for key in stage.params if key not in ablation.overrides and not key.startswith(ablation.moot)
            ),
            ablation=ablation.name,
            overrides=ablation.overrides,
        )
        for stage in flora_stages(BASES["dense"])
        if stage.module in ablation.redoes
    ]


_PRETRAIN = _stage(
    "pretrain",
    folder="pretrain",
    replicated=False,  # the dense model: every run compresses the same one
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
)

#: The machine's timings that predict a model's latency (``core.latency``): the same on every run.
TIMING = ("compute.device", "compute.amp", "compute.threads", "compute.allocator", "retrain.latency_batch")
_OFB_GRIDS = _keys("ofb", ("head_ratios", "head_dim_ratios", "mlp_ratios", "embed_ratios"))
_OFB = _stage(
    "ofb",
    folder="ofb/{budget}",
    foreach="ofb",
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
                *("score_lr", "arch_lr", "arch_betas", "arch_weight_decay", "released_steps"),
                *("temperature", "hard_label_weight"),
                *("head_ratios", "head_dim_ratios", "mlp_ratios", "embed_ratios"),
                *("ramp_epochs", "score_weight", "mask_ratio", "reconstruction_weight"),
                *("macs_weight", "onehot_weight", "attention_weight", "mlp_weight", "embed_weight"),
                *("prune_threshold", "prunes_per_epoch", "target_window", "cut_to_budget"),
            ),
        ),
    ),
    distributed=True,
)
#: OFB's widths, timed at every candidate of its grids: what OFB under latency budgets is priced by.
_LATENCY_TABLE_OFB = _stage(
    "latency_table_ofb",
    folder="latency_table_ofb",
    replicated=False,  # a property of the machine and the dense model's shapes
    outputs={"table": Output("table.csv"), "metrics": Output("metrics.json", "metrics")},
    inputs=_model_of("pretrain", "dense"),
    params=("seed", *TIMING, "retrain.table_repeats", *_OFB_GRIDS, "ofb.table_embed_widths"),
    machine=True,
)
#: OFB searched under latency budgets: its cost loss and cut priced by OFB's latency table.
_OFB_LATENCY = replace(
    _OFB,
    name="ofb_latency",
    method="latency",
    folder="ofb_latency/{budget}",
    foreach="ofb_latency",
    inputs={**_OFB.inputs, "table": Input("latency_table_ofb", "table")},
    params=(*_OFB.params, budgets_key("latency_unit"), "retrain.latency_batch"),
    cost="latency",
)

#: The pruning baselines' own stages: their searches, and ViT-Slim's model sliced as FLORA's base.
_PRUNING = [
    _stage(
        "slim",
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
            *_keys(
                "slim",
                (*TRAINING, "mask_lr", "mask_weight_decay", "released_steps", "attention_weight", "mlp_weight"),
            ),
            *_keys("slim", ("temperature", "hard_label_weight")),
        ),
        distributed=True,
    ),
    _OFB,
    _OFB_LATENCY,
]


def base_stage(base: Base) -> Stage:
    """``base --base``: the pruning method's model at its base budget, fine-tuned: what FLORA compresses on
    ``base``."""
    method = METHODS[base.name]
    pinned = base.budget if base.pinned else None  # a search per budget: its run at the base budget
    inputs = {**_model_of(method.source, budget=pinned), **_TEACHER}
    inputs["inherited"] = Input(method.inherits, "metrics", pinned)
    if method.build == "sliced":
        inputs["masks"] = Input(method.source, "masks")
    return _stage(
        base.stage("base"),
        "base",
        base=base.name,
        folder=base.folder("base"),
        outputs={**_MODEL, "history": Output("history.csv"), "metrics": Output("metrics.json", "metrics")},
        inputs=inputs,
        params=(
            "seed",
            *DEVICE,
            *DATA,
            budgets_key(base.budget),
            *_keys("retrain", ("base_epochs", *TRAINING[1:], "seeds", "temperature", "hard_label_weight")),
        ),
        distributed=True,
    )


def latency_table_stage(base: Base) -> Stage:
    """The latency table of ``base``'s model: the dense model's (what the latency methods choose by), or a pruned
    base's (what predicts FLORA's models on it; its first run's)."""
    return _stage(
        base.stage("latency_table"),
        "latency_table",
        base=base.name,
        folder=base.folder("latency_table"),
        replicated=False,  # a property of the machine and the model's shapes
        outputs={"table": Output("table.csv"), "metrics": Output("metrics.json", "metrics")},
        inputs=_model_of(base.model, "dense"),
        params=(
            "seed",
            *TIMING,
            "retrain.table_repeats",
            "retrain.table_rank_multiple",
            "decompose.targets",
            "filter.ratios",
        ),
        machine=True,
    )


_LATENCY_TABLE = latency_table_stage(BASES["dense"])


def latency_flora_stages(method: Method) -> list[Stage]:
    """FLORA's filter, supernet and search for ``method``'s latency budgets on its base: ``filter_latency`` keeps the
    filter's scored rank tuples by the prediction of the base's latency table, the supernet trains on that space, and
    the search prices subnets by that table (fractions of the latency it predicts for the base model)."""
    base = BASES[method.base]
    flora = {stage.module: stage for stage in flora_stages(base)}
    own = {base.stage("filter"): base.stage("filter_latency"), base.stage("supernet"): method.source}
    table = {"table": Input(base.stage("latency_table"), "table")}

    def relinked(stage: Stage) -> dict[str, Input]:
        return {key: replace(read, stage=own.get(read.stage, read.stage)) for key, read in stage.inputs.items()}

    return [
        _stage(
            base.stage("filter_latency"),
            "filter_latency",
            base=base.name,
            folder=base.folder("filter_latency"),
            outputs={key: output for key, output in flora["filter"].outputs.items() if key != "plot"},
            inputs={"scores": Input(base.stage("filter"), "sensitivity"), "space": Input(base.stage("filter"), "space")}
            | table,
            params=("seed", *DEVICE, *_keys("filter", ("keep_ratio", "bins")), "retrain.latency_batch"),
            cost=method.cost,
        ),
        replace(
            flora["supernet"],
            name=method.source,
            method=method.option,
            folder=base.folder("supernet_latency"),
            inputs=relinked(flora["supernet"]),
            cost=method.cost,
        ),
        replace(
            flora["search"],
            name=method.searched_by,
            method=method.option,
            folder=base.folder("search_latency/{budget}"),
            foreach=method.budgets,
            inputs={**relinked(flora["search"]), **table},
            params=(*flora["search"].params, *_LATENCY_BUDGET),
            cost=method.cost,
        ),
    ]


#: FLORA under latency budgets, on each base it compresses.
_LATENCY_FLORA = {method.base: method for method in METHODS.values() if method.cost == "latency" and method.searched_by}
_SEARCHES = [
    _PRETRAIN,
    _LATENCY_TABLE,  # what the latency methods choose by
    _LATENCY_TABLE_OFB,
    *flora_stages(BASES["dense"]),
    *latency_flora_stages(_LATENCY_FLORA["dense"]),
    *_PRUNING,
]
for _base in (BASES["slim"], BASES["ofb"]):
    _SEARCHES += [base_stage(_base), *flora_stages(_base), latency_table_stage(_base)]
    _SEARCHES += latency_flora_stages(_LATENCY_FLORA[_base.name])
_RETRAINS = [retrain_stage(method) for method in RETRAINED.values()]
#: The stage that makes each method's models.
METHOD_STAGES = {method.name: stage.name for method, stage in zip(RETRAINED.values(), _RETRAINS, strict=True)}
#: Every stage that chooses a model (the dense base model's training and the latency table included), by name.
SEARCH_STAGES = {stage.name: stage for stage in _SEARCHES}

_LATENCY = _stage(
    "latency",
    folder="latency",
    replicated=False,  # times the first run's models
    outputs={"latency": Output("latency.csv"), "metrics": Output("metrics.json", "metrics")},
    machine=True,
    inputs={  # the latency tables, the dense model and every retrained model of every method
        **{base.stage("table"): Input(base.stage("latency_table"), "table") for base in BASES.values()},
        "table_ofb": Input("latency_table_ofb", "table"),
        **_model_of("pretrain", "dense"),
        **{
            key: replace(read, collected=True)
            for method, stage in METHOD_STAGES.items()
            for key, read in _model_of(stage, method).items()
        },
    },
    params=(
        "seed",
        *TIMING,
        "retrain.latency_repeats",
        *dict.fromkeys(budgets_key(method.budgets) for method in RETRAINED.values()),
    ),
)

#: A retrain stage's outputs a report reads of every model, by the suffix of their input key (``<method><suffix>``).
EVALUATIONS = {"": "metrics", "_predictions": "predictions", "_inherited_predictions": "inherited_predictions"}


def _evaluations(method: str, stage: str, collected: bool = False) -> dict[str, Input]:
    """A method's metrics and predictions (fine-tuned and as fine-tuning starts), from every run: a report's inputs
    (``collected``: the method's, if it runs)."""
    return {
        f"{method}{suffix}": Input(stage, output, every_run=True, collected=collected)
        for suffix, output in EVALUATIONS.items()
    }


_REPORT = _stage(
    "report",
    folder="report",
    replicated=False,  # one report over every run: its figures of FLORA's stages are the first run's
    outputs={
        **_table(
            "results", {"x": "macs", "y": "top1", "template": "scatter", "title": "Test top-1 vs MACs (every method)"}
        ),
        **_table("comparison"),
        **_table("means"),
        **_table("ranks"),
        **_table("costs"),
        **_table("search_costs"),
        **_table("latency"),
        **_table("latency_comparison"),
        "tradeoff": Output("tradeoff.png", "plot", category="Headline", caption="report/tradeoff.rst"),
        "latency_figure": Output("latency.png", "plot", category="Latency", caption="report/latency.rst"),
        "spectra": Output("spectra.png", "plot", category="Decompose", caption="report/spectra.rst"),
        "sensitivity": Output("sensitivity.png", "plot", category="Filter", caption="report/sensitivity.rst"),
        "search": Output("search.png", "plot", category="Search", caption="report/search.rst"),
        "ranks_figure": Output("ranks.png", "plot", category="Search", caption="report/ranks.rst"),
        "sampling": Output("sampling.png", "plot", category="Supernet", caption="report/sampling.rst"),
        "summary": Output("summary.json", "metrics"),
    },
    inputs={
        # the figures of FLORA on the dense model
        "dense_predictions": Input("pretrain", "predictions"),
        "spectra": Input("decompose", "spectra"),
        "layers": Input("decompose", "layers"),
        "spec": Input("decompose", "spec"),
        "sensitivity": Input("filter", "sensitivity"),
        "space": Input("filter", "space"),
        "search_history": Input("search", "history"),
        "search_ranks": Input("search", "ranks"),
        "latency": Input("latency", "latency"),  # every model's measured latency (the first run's)
        # every stage's metrics (its wall time among them; the first run's), every method's models in every run
        **{f"{name}_metrics": Input(name, "metrics", collected=True) for name in SEARCH_STAGES},
        **{
            key: read
            for method, stage in METHOD_STAGES.items()
            for key, read in _evaluations(method, stage, collected=True).items()
        },
    },
    params=(
        "seed",
        "runs",
        *dict.fromkeys(budgets_key(method.budgets) for method in RETRAINED.values()),
        *(budgets_key(base.budget) for base in BASES.values() if base.pinned),  # the run whose cost a base carries
        "decompose.targets",
    ),
)

_ABLATION_SEARCHES = [stage for ablation in ABLATIONS.values() for stage in ablation_stages(ablation)]
_ABLATION_RETRAINS = {name: retrain_stage(method) for name, method in ABLATION_METHODS.items()}


def _search_cost(ablation: Ablation | None) -> list[str]:
    """The stages whose seconds are FLORA's search cost (``None``) or an ablation's: filter, supernet (none
    without one) and search, each the ablation's own where it runs it anew."""
    modules = ("filter", "supernet", "search") if ablation is None or ablation.supernet else ("filter", "search")
    return [ablation.stage(module) if ablation and module in ablation.redoes else module for module in modules]


#: Per method of the ablation table (FLORA first), the stages whose seconds are its search cost.
ABLATION_COSTS = {"flora": _search_cost(None), **{name: _search_cost(a) for name, a in ABLATIONS.items()}}

_ABLATIONS_REPORT = _stage(
    "ablations",
    "ablations",
    folder="ablations/report",
    replicated=False,  # one table over every run
    outputs={
        **_table("ablations"),
        "figure": Output("ablations.png", "plot", category="Ablations", caption="report/ablations.rst"),
        "summary": Output("summary.json", "metrics"),
    },
    inputs={
        "dense_predictions": Input("pretrain", "predictions"),
        **_evaluations("flora", METHOD_STAGES["flora"]),
        **{
            key: read
            for name, stage in _ABLATION_RETRAINS.items()
            for key, read in _evaluations(name, stage.name).items()
        },
        **{f"{stage}_metrics": Input(stage, "metrics") for stages in ABLATION_COSTS.values() for stage in stages},
    },
    params=("seed", "runs", budgets_key(METHODS["flora"].budgets)),
)
#: The stages only the ablations target runs (``snakemake ablations``, ``dvc repro ablations``).
ABLATION_STAGES = [*_ABLATION_SEARCHES, *_ABLATION_RETRAINS.values(), _ABLATIONS_REPORT]

STAGES: dict[str, Stage] = {
    stage.name: stage for stage in (*_SEARCHES, *_RETRAINS, _LATENCY, _REPORT, *ABLATION_STAGES)
}

#: Keys a stage may read without tracking them, because they do not change its results
#: (a stage whose results they do change tracks them: the latency stage tracks threads).
UNTRACKED = {
    "compute.threads": "CPU threads: speed",
    "compute.allocator": "how malloc reuses freed memory: speed",
    "runs": "how many runs of the pipeline there are: where each run's results lie, not what they are",
    "compute.workers": "loader processes: speed (each training image's augmentation has its own seed)",
    "compute.processes": "torchrun processes: the global batch and schedule stay the same",
    "compute.teacher_cache": "speed: a hit is the teacher's logits for the same image, equal up to rounding",
    "data.eval_batch_size": "evaluation batching",
    **{  # every section of a training run (one with a batch size)
        f"{key.removesuffix('.batch_size')}.micro_batch": "memory: gradients accumulate to the same global batch"
        for stage in STAGES.values()
        for key in stage.params
        if key.endswith(".batch_size")
    },
    **{
        budgets_key(stage.foreach): "which budgets run; a per-budget stage only checks that its own is listed"
        for stage in STAGES.values()
        if stage.foreach
    },
}

#: DVC plots that combine columns of one file (declared at the top level of dvc.yaml).
COMBINED_PLOTS = {
    "supernet_val_top1": {
        "title": "Supernet, val top-1 of the smallest and the largest subnet",
        "x": "epoch",
        "y": {"results/supernet/history.csv": ["val_top1_smallest", "val_top1_largest"]},
    }
}


def stage_for(module: str, method: str | None = None, base: str = "dense", ablation: str | None = None) -> Stage:
    """The stage a command runs: ``retrain --method flora`` is ``retrain_flora``, with ``--base slim``
    ``retrain_flora_on_slim``, with ``--ablation whole_space`` ``retrain_flora_whole_space``."""
    name = BASES[base].stage(f"{module}_{method}" if method else module)
    return STAGES[ABLATIONS[ablation].stage(name) if ablation else name]


def param_value(params: Mapping[str, Any], key: str) -> Any:
    """The value at a dotted key of a params mapping (``"retrain.lr"``)."""
    value: Any = params
    for part in key.split("."):
        value = value[part]
    return value


def tracked_params(stage: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The stage's tracked keys and their values (what both engines compare to rerun it)."""
    return {key: param_value(params, key) for key in STAGES[stage].params}


def idle_stages(budgets: Mapping[str, Any]) -> frozenset[str]:
    """The stages that do not run under the params' ``budgets`` section (a plain mapping): each per-budget stage
    whose list is empty (``budgets.slim_latency: []``: no ViT-Slim under latency budgets), and each stage that only
    idle stages need. A stage runs when no stage needs it (the report, a method's retrain stage with budgets) or a
    running stage needs it; reading its artifacts if it runs (``Input.collected``) is not needing it."""
    empty = {name for name, stage in STAGES.items() if stage.foreach and not budgets[stage.foreach]}
    needed_by: dict[str, set[str]] = {name: set() for name in STAGES}
    for stage in STAGES.values():
        for read in stage.inputs.values():
            if not read.collected:
                needed_by[read.stage].add(stage.name)
    running = {name for name, readers in needed_by.items() if not readers and name not in empty}
    pending = list(running)
    while pending:
        for read in STAGES[pending.pop()].inputs.values():
            if not read.collected and read.stage not in running and read.stage not in empty:
                running.add(read.stage)
                pending.append(read.stage)
    return frozenset(STAGES) - running


@cache
def chain(stage: str) -> int:
    """The longest chain of stages that still waits for ``stage``, itself included."""
    readers = [s.name for s in STAGES.values() if any(r.stage == stage for r in s.inputs.values())]
    return 1 + max((chain(reader) for reader in readers), default=0)


def priority(stage: str) -> int:
    """Which jobs start first when jobs compete: a stage that times models before every other (it needs the machine
    to itself, which a busy run gives only when every job ends at once: left to the end, its chain ran on one core),
    then the longest chain of stages still waiting."""
    return chain(stage) + (len(STAGES) if STAGES[stage].resources.alone else 0)


def choosing_stages(method: str) -> tuple[list[tuple[str, str | None]], str | None]:
    """The stages whose cost a method's models carry (the dense model's training aside): those run once, each
    with the budgets key of the one run it takes of a per-budget stage, and the stage it runs per budget."""
    once: dict[str, str | None] = {}
    per_budget = None
    pending = [STAGES[METHOD_STAGES[method]]]
    while pending:
        consumer = pending.pop()
        for reference in consumer.inputs.values():
            found = resolve(consumer, reference, STAGES)
            name = found.producer.name
            if name == BASES["dense"].model or name in once or name == per_budget:
                continue
            if found.case is Case.SAME:
                per_budget = name
            else:
                once[name] = found.budgets if found.case is Case.PINNED else None
            pending.append(found.producer)
    order = list(STAGES)
    return sorted(once.items(), key=lambda item: order.index(item[0])), per_budget
