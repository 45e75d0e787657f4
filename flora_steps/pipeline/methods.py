"""Every method the report compares, one record each, and the base models FLORA compresses.

Tables, figures, the report, the params checks, ``retrain`` and both engines derive
what they do per method from these records: adding a baseline is one record here,
one params section (its ``budgets`` list and its own settings), its maths module and,
if it searches, its stage (``catalogue.py``). Nothing here imports anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

#: How ``retrain`` builds a method's model before fine-tuning it (``stages/retrain.py``, ``BUILDERS``):
#: ``searched_ranks`` the rank config its search found, on the source's weights; ``uniform_ranks`` one rank ratio
#: on every target layer, the largest that fits the budget; ``sliced`` the source model sliced by its masks at the
#: budget; ``as_searched`` the source's model as its search left it (already at the budget).
Build = Literal["searched_ranks", "uniform_ranks", "sliced", "as_searched"]


@dataclass(frozen=True)
class Base:
    """A model FLORA compresses: the dense base model, or a model another method already compressed.

    FLORA's stages are described once and run on every base; on a base other than the
    dense one their names end in ``_on_<base>`` and their folders sit under ``on_<base>/``.
    Budgets stay fractions of the dense model's MACs.
    """

    name: str
    model: str  # the stage whose model is the base (its metrics count the training the base had)
    budgets: str  # the list of the params' budgets section with FLORA's budgets on this base
    budget: str | None = None  # the budgets key of the base model's own budget
    pinned: bool = False  # the pruning method searches per budget: its base comes from its run at ``budget``

    def stage(self, name: str) -> str:
        """A FLORA stage's name on this base: ``search``, or ``search_on_slim``."""
        return name if self.name == "dense" else f"{name}_on_{self.name}"

    def folder(self, folder: str) -> str:
        """A FLORA stage's results folder on this base: ``search/{budget}``, or ``on_slim/search/{budget}``."""
        return folder if self.name == "dense" else f"on_{self.name}/{folder}"


BASES = {
    base.name: base
    for base in (
        Base("dense", "pretrain", "search"),
        # the pruning method's model at its base budget, fine-tuned (``stages/base.py``)
        Base("slim", "base_on_slim", "slim_flora", "slim_base"),  # ViT-Slim's searched model, sliced at slim_base
        Base("ofb", "base_on_ofb", "ofb_flora", "ofb_base", pinned=True),  # OFB's model searched at ofb_base
    )
}


@dataclass(frozen=True)
class Method:
    """One method of the report: what it is called and drawn as, how its models are made and compared.

    ``budgets`` is its list in the params' budgets section: one fine-tuned model per
    budget. ``epochs`` is the ``retrain`` key of its fine-tuning epochs, whose ``null``
    means ``supernet.epochs + retrain.epochs`` (equal training); ``None`` takes
    ``retrain.epochs``. ``inherits`` is the stage whose training its model inherits
    (counted in its total). ``baselines`` are the methods whose curves it is compared
    with: one panel of the headline figure each.
    """

    name: str
    label: str  # in the figure's legend and the docs
    short: str  # in the figure's panel titles
    style: Mapping[str, Any] = field(default_factory=dict)  # matplotlib marker style
    build: Build | None = None  # None: the dense base model, which is not retrained
    origin: str = ""  # where its model comes from, in words (``metrics.json``'s ``source``)
    source: str | None = None  # the stage whose model ``retrain`` starts from
    budgets: str | None = None
    epochs: str | None = None
    inherits: str | None = None
    baselines: tuple[str, ...] = ()
    base: str = "dense"  # the model FLORA compresses (``BASES``), for FLORA's methods
    command: str = ""  # ``retrain --method``: the name, or ``flora`` for FLORA on any base
    searched_by: str | None = None  # the search stage whose rank config it takes (``build`` searched_ranks)
    ablation: str | None = None  # one of the paper's ablations of FLORA (``ABLATIONS``): not in the main report
    cost: Literal["macs", "latency"] = "macs"  # what its budgets limit: MACs, or latency the latency table predicts
    compared_at_latency: tuple[str, ...] = ()  # methods whose top-1-vs-measured-latency curve it is compared with

    @property
    def retrained(self) -> bool:
        return self.build is not None

    @property
    def option(self) -> str:
        """Its ``retrain --method`` value."""
        return self.command or self.name


def _flora(name: str, base: Base, label: str, short: str, style: Mapping[str, Any], **compared: Any) -> Method:
    """FLORA on ``base``: the subnet its search found, with its supernet's weights."""
    return Method(
        name,
        label,
        short,
        style,
        build="searched_ranks",
        origin="supernet weights, searched ranks",
        source=base.stage("supernet"),
        budgets=base.budgets,
        inherits=base.stage("supernet"),
        base=base.name,
        command="flora",
        searched_by=base.stage("search"),
        **compared,
    )


def _flora_latency(name: str, base: Base, label: str, short: str, style: Mapping[str, Any], **changes: Any) -> Method:
    """FLORA on ``base`` under latency budgets: its filter keeps tuples by the latency ``base``'s table predicts, its
    supernet trains on them, its search prices subnets by that table (``catalogue.latency_flora_stages``)."""
    supernet = base.stage("supernet_flora_latency")  # trained on the space filter_latency keeps by predicted latency
    return replace(
        _flora(name, base, label, short, style),
        origin="latency supernet weights, ranks searched under a latency budget",
        source=supernet,
        inherits=supernet,
        command="flora_latency",
        searched_by=base.stage("search_flora_latency"),
        cost="latency",
        **changes,
    )


def _under_latency(method: Method, name: str, label: str, origin: str, **changes: Any) -> Method:
    """``method`` with budgets in the latency the table predicts (``budgets.<name>``, the control's
    ``budgets.latency`` with FLORA's): hollow markers, and "(latency)" after its panel title."""
    return replace(
        method,
        name=name,
        label=label,
        short=f"{method.short} (latency)",
        origin=origin,
        cost="latency",
        **{"style": {**method.style, "fillstyle": "none"}, "budgets": name, **changes},
    )


_UNIFORM = Method(
    "uniform",
    "uniform rank, from SVD",
    "SVD uniform",
    {"color": "tab:blue", "marker": "o", "markersize": 4},
    build="uniform_ranks",
    origin="SVD of the base model, uniform rank ratio",
    source="decompose",
    budgets="uniform",
    epochs="retrain.uniform_epochs",
)

_CONTROL = Method(
    "control",
    "uniform rank, from the supernet (control)",
    "control",
    {"color": "tab:green", "marker": "s", "markersize": 4},
    build="uniform_ranks",
    origin="supernet weights, uniform rank ratio",
    source="supernet",
    budgets="uniform",
    inherits="supernet",
)

_SLIM = Method(
    "slim",
    "ViT-Slim: sliced channels and units",
    "ViT-Slim",
    {"color": "tab:purple", "marker": "v", "markersize": 4},
    build="sliced",
    origin="ViT-Slim's searched model, sliced to the budget",
    source="slim",
    budgets="slim",
    epochs="retrain.slim_epochs",
    inherits="slim",
)

_OFB = Method(
    "ofb",
    "OFB: searched heads, channels, units and width",
    "OFB",
    {"color": "tab:brown", "marker": "^", "markersize": 4},
    build="as_searched",
    origin="OFB's model searched and sliced at the budget",
    source="ofb",
    budgets="ofb",
    epochs="retrain.ofb_epochs",
    inherits="ofb",
)

#: In the order the tables and the figure list them.
METHODS = {
    method.name: method
    for method in (
        Method("dense", "dense", "dense", {"color": "black", "marker": "D"}),
        _UNIFORM,
        _CONTROL,
        _flora(
            "flora",
            BASES["dense"],
            "FLORA: searched ranks, from the supernet",
            "FLORA",
            {"color": "tab:red", "marker": "*", "markersize": 10},
            baselines=("control", "uniform"),
        ),
        _under_latency(
            _CONTROL,
            "control_latency",
            "uniform rank under a latency budget, from the supernet",
            "FLORA's latency supernet weights, uniform rank ratio under a latency budget",
            style={**_CONTROL.style, "color": "darkgreen", "fillstyle": "none"},
            source="supernet_flora_latency",
            inherits="supernet_flora_latency",
            budgets="latency",  # FLORA's latency budgets: its control at each
        ),
        _under_latency(
            _UNIFORM,
            "uniform_latency",
            "uniform rank under a latency budget, from SVD",
            "SVD of the base model, uniform rank ratio under a latency budget",
        ),
        _flora_latency(
            "flora_latency",
            BASES["dense"],
            "FLORA under latency budgets: searched ranks, from the supernet",
            "FLORA (latency)",
            {"color": "darkred", "marker": "*", "markersize": 10, "fillstyle": "none"},
            budgets="latency",
            compared_at_latency=("flora",),  # FLORA searched under MACs budgets, at the same measured latency
        ),
        _SLIM,
        _under_latency(  # ViT-Slim's search, sliced where the latency table predicts its widths meet the budget
            _SLIM,
            "slim_latency",
            "ViT-Slim under a latency budget: sliced channels and units",
            "ViT-Slim's searched model, sliced to the latency budget",
        ),
        _flora(
            "slim_flora",
            BASES["slim"],
            "FLORA on a ViT-Slim model",
            "FLORA on ViT-Slim",
            {"color": "tab:orange", "marker": "P", "markersize": 8},
            baselines=("slim",),
        ),
        _flora_latency(
            "slim_flora_latency",
            BASES["slim"],
            "FLORA on a ViT-Slim model under latency budgets",
            "FLORA on ViT-Slim (latency)",
            {"color": "tab:orange", "marker": "P", "markersize": 8, "fillstyle": "none"},
            budgets="slim_flora_latency",
            compared_at_latency=("slim_flora",),
        ),
        _OFB,
        _under_latency(  # OFB's search with the latency its table predicts as the cost
            _OFB,
            "ofb_latency",
            "OFB under a latency budget: searched heads, channels, units and width",
            "OFB's model searched and sliced under the latency budget",
            source="ofb_latency",
            inherits="ofb_latency",
        ),
        _flora(
            "ofb_flora",
            BASES["ofb"],
            "FLORA on an OFB model",
            "FLORA on OFB",
            {"color": "tab:pink", "marker": "X", "markersize": 8},
            baselines=("ofb",),
        ),
        _flora_latency(
            "ofb_flora_latency",
            BASES["ofb"],
            "FLORA on an OFB model under latency budgets",
            "FLORA on OFB (latency)",
            {"color": "tab:pink", "marker": "X", "markersize": 8, "fillstyle": "none"},
            budgets="ofb_flora_latency",
            compared_at_latency=("ofb_flora",),
        ),
    )
}
#: The compressed models: every method but the dense base model.
RETRAINED = {name: method for name, method in METHODS.items() if method.retrained}


def comparisons() -> list[tuple[str, str]]:
    """Each comparison of the report: (method, baseline), in the records' order."""
    return [(method.name, baseline) for method in METHODS.values() for baseline in method.baselines]


def latency_comparisons() -> list[tuple[str, str]]:
    """Each comparison of the report at equal measured latency: (method, baseline), in the records' order."""
    return [(method.name, baseline) for method in METHODS.values() for baseline in method.compared_at_latency]


@dataclass(frozen=True)
class Ablation:
    """One of the paper's ablations: FLORA on the dense model with one of its parts taken out.

    Its stages are FLORA's from the first one it changes on (``redoes``, and the
    retrain), named ``<stage>_<name>`` in ``ablations/<name>/``, each run with
    ``overrides`` in place of the params' values; it shares FLORA's stages before that.
    ``supernet`` False: no supernet at all, its search and fine-tuning start from the
    SVD (``decompose``), fine-tuned as long as FLORA's supernet and fine-tuning together.
    It is searched at FLORA's budgets (``budgets.search``) and compared with FLORA at each.
    """

    name: str
    label: str  # in the ablation figure's legend and the docs
    short: str  # in the ablation table and figure
    style: Mapping[str, Any]
    redoes: tuple[str, ...]  # FLORA's stages (by command) it runs anew
    overrides: Mapping[str, Any] = field(default_factory=dict)  # params values its own stages run with
    moot: tuple[str, ...] = ()  # params key prefixes its stages no longer read, because of the overrides
    supernet: bool = True

    def stage(self, name: str) -> str:
        """A stage's name in this ablation: ``search`` -> ``search_whole_space``."""
        return f"{name}_{self.name}"

    def folder(self, folder: str) -> str:
        """A stage's folder in this ablation: ``search/{budget}`` -> ``ablations/whole_space/search/{budget}``."""
        return f"ablations/{self.name}/{folder}"

    @property
    def method(self) -> Method:
        """Its models as a method of the ablation table: FLORA's record, with this ablation's stages."""
        flora = METHODS["flora"]
        common = {"name": self.name, "label": self.label, "short": self.short, "style": self.style, "baselines": ()}
        common |= {"searched_by": self.stage("search"), "ablation": self.name}
        if not self.supernet:
            origin = "SVD of the base model, searched ranks"
            return replace(
                flora, **common, origin=origin, source="decompose", inherits=None, epochs="retrain.uniform_epochs"
            )
        supernet = self.stage("supernet")
        return replace(flora, **common, source=supernet, inherits=supernet)


#: The paper's ablations (``snakemake ablations``, ``dvc repro ablations``), in the order the table lists them.
ABLATIONS = {
    ablation.name: ablation
    for ablation in (
        Ablation(
            "whole_space",
            "without candidate filtering: the supernet and the search on the whole rank grid",
            "whole space",
            {"color": "tab:blue", "marker": "o"},
            redoes=("filter", "supernet", "search"),
            overrides={"filter.keep_ratio": 1.0, "filter.local.epochs": 0},  # keep every tuple: nothing to train
            moot=("filter.local.",),
        ),
        Ablation(
            "uniform_sampling",
            "uniform instead of low-rank-aware sampling (supernet training and the search's mutations)",
            "uniform sampling",
            {"color": "tab:green", "marker": "s"},
            redoes=("supernet", "search"),
            overrides={"supernet.sampling": "uniform"},
        ),
        Ablation(
            "random_init",
            "without weight inheritance: the supernet's factors initialised at random, not from the SVD",
            "random factors",
            {"color": "tab:purple", "marker": "v"},
            redoes=("supernet", "search"),
            overrides={"supernet.init": "random"},
        ),
        Ablation(
            "svd_weights",
            "without supernet training: searched and fine-tuned from the SVD weights",
            "no supernet",
            {"color": "tab:brown", "marker": "^"},
            redoes=("search",),
            supernet=False,
        ),
    )
}
#: Each ablation's models as a method (``Ablation.method``).
ABLATION_METHODS = {name: ablation.method for name, ablation in ABLATIONS.items()}
