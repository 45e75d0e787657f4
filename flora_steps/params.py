"""The typed schema of ``params.yaml``, shared by every stage and by the Snakefile.

Every key is required (``params.yaml`` is the one place defaults live), unknown
keys are rejected (with a "did you mean" hint), a boolean is never taken for a
number, cross-field rules are checked, and every problem is reported as one line
naming the key (``ParamsError.problems``).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import ParamsError, UserError, first_line
from .pipeline.catalogue import STAGES
from .pipeline.methods import BASES, METHODS

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(gt=0, lt=1)]
Seed = Annotated[int, Field(ge=0, lt=2**32)]  # what NumPy, torch and scikit-learn all accept


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML's ``true`` is not 1: only fields declared ``bool`` take booleans."""
        if cls.model_fields[info.field_name].annotation is bool:
            return value
        if any(isinstance(item, bool) for item in (value if isinstance(value, list) else [value])):
            raise ValueError(f"a boolean is not accepted here, got {value!r}")
        return value


class ComputeParams(Section):
    """Where and how the stages run."""

    device: Literal["auto", "cpu", "cuda"]
    threads: NonNegativeInt  # torch CPU threads; 0 leaves PyTorch's default
    allocator: Literal["heap", "system"]  # heap: glibc's malloc keeps freed memory for reuse; system: its defaults
    workers: NonNegativeInt | None  # DataLoader workers per process; 0: the main process; None: CPUs given - 1
    processes: PositiveInt  # processes a distributed stage starts under torchrun, one per GPU
    amp: bool  # bfloat16 autocast on CUDA (ignored on CPU)
    teacher_cache: NonNegativeInt  # distinct input images whose teacher logits are remembered; 0: none


class ModelParams(Section):
    """The base model: a timm model name (or the embedded ``vit_digits``) and its weights."""

    name: str
    checkpoint: Path | None  # local weights file (timm/PyTorch .pth/.bin or .safetensors)
    hub: bool  # fetch timm's pretrained weights (needs internet)
    num_classes: PositiveInt
    kwargs: dict[str, Any]  # extra keyword arguments for timm.create_model

    @model_validator(mode="after")
    def _one_weight_source(self) -> ModelParams:
        if self.checkpoint is not None and self.hub:
            raise ValueError("give either checkpoint or hub: true, not both")
        return self


class DataParams(Section):
    """The data set and its fixed, stratified train/val/test splits."""

    dataset: Literal["digits", "imagenet", "cifar10"]
    root: Path | None  # data directory (imagenet: ImageFolder with train/ and val/; cifar10: python batches)
    val_fraction: Fraction  # share of the training images held out for validation
    test_fraction: Fraction  # digits only: share of all images held out for test
    split_seed: Seed
    eval_batch_size: PositiveInt
    crop_pct: Annotated[float, Field(gt=0, le=1)] | None  # real data: eval centre crop / resize; None: the model's
    shift: NonNegativeInt  # digits only: random-shift augmentation, in pixels
    train_transform: dict[str, Any]  # real data only: extra arguments for timm.data.create_transform
    skip_unreadable: bool  # imagenet: leave out unreadable images (counted in the log) instead of stopping

    @model_validator(mode="after")
    def _root_for_real_data(self) -> DataParams:
        if self.dataset != "digits" and self.root is None:
            raise ValueError(f"dataset {self.dataset} needs root: the data directory")
        return self


class TrainingParams(Section):
    """What every training run sets (``flora_steps.runtime.training.fit``): AdamW, warmup + cosine, clipping."""

    epochs: NonNegativeInt
    batch_size: PositiveInt
    lr: PositiveFloat
    min_lr: NonNegativeFloat
    weight_decay: NonNegativeFloat
    warmup_epochs: NonNegativeInt
    grad_clip: PositiveFloat | None  # max gradient norm; None: no clipping
    micro_batch: PositiveInt | None  # images per process per forward/backward; null: batch_size / processes


class PretrainParams(TrainingParams):
    """Training (or fine-tuning) of the base model; ``epochs: 0`` only imports and evaluates."""

    label_smoothing: Annotated[float, Field(ge=0, lt=1)]


class DecomposeParams(Section):
    """Which layers are factorised by SVD."""

    targets: Annotated[list[str], Field(min_length=1)]  # glob patterns on module paths


class LocalSupernetParams(TrainingParams):
    """Block-local supernet training before candidate scoring (the released code's search-space search)."""

    share: Annotated[float, Field(gt=0, le=1)]  # share of the train split each block's local supernet trains on


class FilterParams(Section):
    """Candidate filtering: rank grids and the keep rule (see flora_steps/filter.py)."""

    ratios: Annotated[list[Annotated[float, Field(gt=0, le=1)]], Field(min_length=1)]  # of each layer's full rank
    images: PositiveInt  # size of the fixed filter subset of the train split
    keep_ratio: Annotated[float, Field(gt=0, le=1)]  # share of each MACs bin's tuples kept
    bins: PositiveInt  # equal-width MACs bins per block, each keeping its best keep_ratio share
    local: LocalSupernetParams  # block-local supernets trained before scoring (epochs 0: score the SVD weights)


class SupernetParams(TrainingParams):
    """Low-rank supernet training with knowledge distillation (see flora_steps/supernet.py).

    ``batch_size`` is the global batch, split over torchrun processes.
    """

    epochs: PositiveInt
    sampling: Literal["lowrank", "uniform"]  # lowrank: p ∝ 1 / prod(rank / full rank), the paper's rule
    init: Literal["svd", "random"]  # svd: the factors start from the SVD (weight inheritance); random: fresh
    temperature: PositiveFloat  # distillation temperature
    hard_label_weight: Annotated[float, Field(ge=0, le=1)]  # 0: pure distillation, as in the paper


def _written_as_float(value: Any) -> Any:
    """Budgets name results folders, and DVC spells a YAML ``1`` as ``1``, not ``1.0``: only floats are accepted."""
    if isinstance(value, int):
        raise ValueError(f"write {value!r} as {float(value)!r} (a budget is a fraction written with a decimal point)")
    return value


Budget = Annotated[float, BeforeValidator(_written_as_float), Field(gt=0, le=1)]
#: A latency budget: a fraction of the dense model's latency, or milliseconds (``budgets.latency_unit``).
LatencyBudget = Annotated[float, BeforeValidator(_written_as_float), Field(gt=0)]


#: The budgets lists in latency (``budgets.latency_unit``): those of the methods priced by a latency table.
LATENCY_BUDGETS = tuple(dict.fromkeys(method.budgets for method in METHODS.values() if method.cost == "latency"))


class BudgetParams(Section):
    """MACs budgets as fractions of the dense model's MACs: which searches and baselines run."""

    search: Annotated[list[Budget], Field(min_length=1)]  # FLORA: one search and one retrain per budget
    uniform: Annotated[list[Budget], Field(min_length=1)]  # uniform-rank baseline; includes every search budget
    slim: Annotated[list[Budget], Field(min_length=1)]  # ViT-Slim baseline: one sliced and retrained model per budget
    slim_base: Budget  # ViT-Slim's searched model sliced at this budget is what FLORA compresses further
    slim_flora: Annotated[list[Budget], Field(min_length=1)]  # FLORA on that model: one search and retrain per budget
    ofb: Annotated[list[Budget], Field(min_length=1)]  # OFB baseline: one search, one retrained model per budget
    ofb_base: Budget  # OFB's model searched at this budget (one of ofb) is what FLORA compresses further
    ofb_flora: Annotated[list[Budget], Field(min_length=1)]  # FLORA on that model: one search and retrain per budget
    latency: Annotated[list[LatencyBudget], Field(min_length=1)]  # FLORA and its control under latency budgets
    # the other methods under latency budgets; an empty list runs none of that method's stages
    uniform_latency: list[LatencyBudget]  # SVD uniform
    slim_latency: list[LatencyBudget]  # ViT-Slim
    ofb_latency: list[LatencyBudget]  # OFB
    slim_flora_latency: list[LatencyBudget]  # FLORA on ViT-Slim's model: shares of that model's latency
    ofb_flora_latency: list[LatencyBudget]  # FLORA on OFB's model: shares of that model's latency
    latency_unit: Literal["fraction", "ms"]  # latency budgets: fractions of the dense model's latency, or ms per batch

    @model_validator(mode="after")
    def _budgets_agree(self) -> BudgetParams:
        missing = sorted(set(self.search) - set(self.uniform))
        if missing:
            raise ValueError(f"uniform must include every search budget (missing {missing})")
        for name, values in self:
            if isinstance(values, list) and len(set(values)) != len(values):
                raise ValueError(f"{name} lists a budget twice")
        for name in LATENCY_BUDGETS:
            if self.latency_unit == "fraction" and max(getattr(self, name), default=0) > 1:
                raise ValueError(
                    f"{name}: {max(getattr(self, name))} is above 1: with latency_unit fraction a budget is a share of "
                    "the dense model's latency (latency_unit ms: milliseconds per batch)"
                )
        for base in BASES.values():
            if base.budget is None:
                continue
            at, label = getattr(self, base.budget), METHODS[base.name].short
            if base.pinned and at not in getattr(self, METHODS[base.name].budgets):
                runs = METHODS[base.name].budgets
                raise ValueError(
                    f"{base.budget}: {at} must be one of {runs} {getattr(self, runs)} (FLORA takes that search's model)"
                )
            above = sorted(b for b in getattr(self, base.budgets) if b >= at)
            if above:
                raise ValueError(
                    f"{base.budgets}: {above} not below {base.budget} {at}: FLORA can only make {label}'s model smaller"
                )
        return self


class SlimParams(TrainingParams):
    """ViT-Slim's mask search on the base model (see flora_steps/slim.py): masks and weights train together.

    The released code uses a constant learning rate: ``min_lr`` equal to ``lr`` and no warm-up.
    """

    epochs: PositiveInt
    mask_lr: PositiveFloat  # the masks' learning rate (released: the weights', 5e-4), on lr's schedule
    mask_weight_decay: NonNegativeFloat  # AdamW decay of the masks (released: 1e-3, one AdamW for everything)
    released_steps: PositiveInt | None  # mask_lr is for a search of this many steps; rescaled to this one's
    attention_weight: NonNegativeFloat  # L1 weight on the attention head-channel masks (released: 2e-4)
    mlp_weight: NonNegativeFloat  # L1 weight on the MLP hidden-unit masks (released: 5e-5)
    temperature: PositiveFloat  # distillation temperature
    hard_label_weight: Annotated[float, Field(ge=0, le=1)]  # 0: pure distillation from the base model


Ratios = Annotated[list[Annotated[float, Field(gt=0, le=1)]], Field(min_length=1)]
Schedule = Annotated[list[Annotated[float, Field(ge=0, le=1)]], Field(min_length=2, max_length=2)]


class OFBParams(TrainingParams):
    """OFB's search on the base model, once per budget (see flora_steps/ofb.py); released values in comments.

    Candidate widths are ratios of each module's full size, rounded to whole units.
    """

    epochs: PositiveInt
    score_lr: PositiveFloat  # learning rate of the unit scores S, in the weights' AdamW, undecayed (released: lr)
    arch_lr: PositiveFloat  # learning rate of the width logits α, in their own AdamW (released: 2.5e-4 x batch/256)
    arch_betas: Annotated[list[Annotated[float, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)]
    arch_weight_decay: NonNegativeFloat  # AdamW decay of the width logits (released: 1e-3)
    released_steps: PositiveInt | None  # score_lr and arch_lr are for a search of this many steps; rescaled
    temperature: PositiveFloat  # distillation temperature
    hard_label_weight: Annotated[float, Field(ge=0, le=1)]  # 0: pure distillation from the base model
    head_ratios: Ratios  # attention heads kept (released: every even head count)
    head_dim_ratios: Ratios  # channels per head kept (released: 16, 24, ..., 64 of 64)
    mlp_ratios: Ratios  # MLP hidden units kept (released: 0.25, 0.375, ..., 1)
    embed_ratios: Ratios  # embedding width kept, shared by all blocks (released: C/2 ... C by 12 channels)
    ramp_epochs: NonNegativeFloat  # score_weight and mask_ratio move from first to second value over these epochs
    score_weight: Schedule  # λ, the weight of σ(S) in the bi-mask (released: 0.99 -> 0.1)
    mask_ratio: Schedule  # PMIM: share of patch tokens masked (released: 0.05 -> 0.25)
    reconstruction_weight: NonNegativeFloat  # PMIM loss, scaled to the task loss's value (released: 1); 0: off
    macs_weight: NonNegativeFloat  # weight of ((E[MACs] - target) / dense MACs)^2 (released: 5)
    onehot_weight: NonNegativeFloat  # weight of each module's adaptive one-hot loss (released: 0.5)
    attention_weight: NonNegativeFloat  # L1 on σ(S) of attention units (released: 0.5 x 4e-4)
    mlp_weight: NonNegativeFloat  # L1 on σ(S) of MLP units (released: 0.5 x 1e-4)
    embed_weight: NonNegativeFloat  # L1 on σ(S) of embedding channels (released: 0.5 x 1e-4)
    prune_threshold: Annotated[float, Field(gt=0, lt=1)]  # a candidate dies at probability <= this / K (released: 0.2)
    prunes_per_epoch: PositiveInt  # progressive pruning checks per epoch (released: 3)
    target_window: Annotated[int, Field(ge=3)]  # PMIM target: local normalisation window, odd (released: 47 at 224 px)
    cut_to_budget: bool  # not released: narrow a model above its budget by importance into the search.band
    table_embed_widths: Annotated[int, Field(ge=2)]  # embedding widths latency_table_ofb times (linear between)

    @field_validator("target_window")
    @classmethod
    def _odd_window(cls, window: int) -> int:
        if window % 2 == 0:
            raise ValueError(f"must be odd (a window centred on each pixel), got {window}")
        return window


class SearchParams(Section):
    """Evolutionary search under a MACs budget (see flora_steps/search.py); defaults are the paper's."""

    band: Annotated[float, Field(gt=0, lt=1)]  # legal: MACs in [budget - band, budget], fractions of dense
    population: Annotated[int, Field(ge=2)]
    top_k: Annotated[int, Field(ge=2)]
    mutations: NonNegativeInt
    mutation_prob: Annotated[float, Field(gt=0, le=1)]
    crossovers: NonNegativeInt
    generations: PositiveInt
    val_images: PositiveInt | None  # evolution's fitness on this many val images; null: all but the held-out ones
    held_out: PositiveInt  # val images that choose nothing: the chosen subnet's reported val top-1

    @model_validator(mode="after")
    def _top_k_fits(self) -> SearchParams:
        if self.top_k > self.population:
            raise ValueError(f"top_k ({self.top_k}) must not exceed population ({self.population})")
        return self


class RetrainParams(TrainingParams):
    """Fine-tuning of each FLORA subnet, uniform-rank control and SVD uniform baseline, with distillation.

    ``epochs`` is the fine-tuning of the models taken from the supernet (FLORA and the
    control); ``epochs: 0`` evaluates the inherited / truncated weights only. Every
    model is fine-tuned once per seed of ``seeds``.
    """

    seeds: Annotated[list[Seed], Field(min_length=1)]  # one fine-tuning per seed; tables give mean, std, interval
    uniform_epochs: NonNegativeInt | None  # SVD uniform; null: supernet.epochs + epochs (equal training)
    base_epochs: NonNegativeInt  # fine-tuning of a pruning method's model at its base budget, before FLORA
    slim_epochs: NonNegativeInt | None  # ViT-Slim; null: base_epochs + supernet.epochs + epochs (FLORA on its model)
    ofb_epochs: NonNegativeInt | None  # OFB; null: base_epochs + supernet.epochs + epochs (FLORA on its model)
    temperature: PositiveFloat
    hard_label_weight: Annotated[float, Field(ge=0, le=1)]
    uniform_rank_multiple: PositiveInt  # uniform baseline ranks are multiples of this (8 aligns matmuls)
    latency_batch: PositiveInt  # images per forward pass when timing inference (the latency stage)
    latency_repeats: PositiveInt  # timed rounds of the latency stage (median and quartiles kept)
    table_repeats: PositiveInt  # timed rounds of the latency_table stage
    table_rank_multiple: NonNegativeInt  # latency_table times each layer at every rank of one window between multiples

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"lists a seed twice: {seeds}")
        return seeds


class Params(Section):
    """All of ``params.yaml``."""

    seed: Seed
    runs: PositiveInt  # runs of everything after the dense model; run k seeds with seed + k (report: across runs)
    compute: ComputeParams
    model: ModelParams
    data: DataParams
    pretrain: PretrainParams
    decompose: DecomposeParams
    filter: FilterParams
    supernet: SupernetParams
    slim: SlimParams
    ofb: OFBParams
    budgets: BudgetParams
    search: SearchParams
    retrain: RetrainParams

    @model_validator(mode="after")
    def _sections_agree(self) -> Params:
        """Rules across sections; each message starts with the key to change."""
        problems = []
        banded = [
            stage.foreach
            for stage in STAGES.values()
            if stage.foreach and "search.band" in stage.params and stage.cost == "macs"
        ]
        smallest = min(b for name in banded for b in getattr(self.budgets, name))
        if self.search.band >= smallest:
            *first, last = dict.fromkeys(banded)
            names = f"{', '.join(first)} and {last}" if first else last
            problems.append(
                f"search.band: {self.search.band} must be below every budget of budgets.{names} (smallest {smallest}), "
                "or the legal MACs band starts at or below 0"
            )
        curves = {
            (METHODS[baseline].budgets, method.budgets): method.short
            for method in METHODS.values()
            for baseline in method.baselines
        }
        for (curve, points), method in curves.items():
            lowest_legal = min(getattr(self.budgets, points)) - self.search.band
            lowest = min(getattr(self.budgets, curve))
            if lowest > lowest_legal + 1e-9:
                problems.append(
                    f"budgets.{curve}: the lowest budget ({lowest}) must lie at or below the lowest budgets.{points} "
                    f"minus search.band ({lowest_legal:.4g}), so that every point of {method} lies within the "
                    f"{curve} curve it is compared with"
                )
        known_classes = {"digits": 10, "cifar10": 10}.get(self.data.dataset)
        if known_classes is not None and self.model.num_classes != known_classes:
            problems.append(
                f"model.num_classes: {self.model.num_classes}, but data.dataset {self.data.dataset} "
                f"has {known_classes} classes"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self


def _describe(error: dict[str, Any], known: dict[tuple, list[str]]) -> list[str]:
    """One line per problem of a pydantic error, starting with the dotted key."""
    location = ".".join(str(part) for part in error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        parent, key = tuple(error["loc"][:-1]), str(error["loc"][-1])
        close = difflib.get_close_matches(key, known.get(parent, []), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return [f"{location}: unknown key{hint}"]
    if kind == "missing":
        return [f"{location}: missing key"]
    if kind == "value_error":
        lines = error["msg"].removeprefix("Value error, ").splitlines()
        return [f"{location}: {line}" if location else line for line in lines]
    message = error["msg"][0].lower() + error["msg"][1:]
    return [f"{location}: {message}, got {error['input']!r}"]


def _misspelt(errors: list[dict[str, Any]], known: dict[tuple, list[str]]) -> list[dict[str, Any]]:
    """Drop a "missing key" error when an unknown key beside it is its misspelling (reported with the hint)."""
    unknown = {tuple(e["loc"]) for e in errors if e["type"] == "extra_forbidden"}

    def explained(error: dict[str, Any]) -> bool:
        *parent, key = error["loc"]
        siblings = [loc[-1] for loc in unknown if list(loc[:-1]) == parent]
        return any(difflib.get_close_matches(str(s), known.get(tuple(parent), []), n=1) == [key] for s in siblings)

    return [e for e in errors if not (e["type"] == "missing" and explained(e))]


def _known_keys(model: type[BaseModel], prefix: tuple = ()) -> dict[tuple, list[str]]:
    keys = {prefix: list(model.model_fields)}
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            keys.update(_known_keys(info.annotation, (*prefix, name)))
    return keys


def validate_params(data: Any, source: str = "params") -> Params:
    """Validate a params mapping; raise ``ParamsError`` listing every problem, one line each."""
    if not isinstance(data, dict):
        raise ParamsError(source, [f"expected a mapping of sections, got {type(data).__name__}"])
    try:
        return Params.model_validate(data)
    except ValidationError as error:
        known = _known_keys(Params)
        errors = _misspelt(error.errors(include_url=False), known)
        raise ParamsError(source, [line for e in errors for line in _describe(e, known)]) from None


def with_values(params: Params, values: Mapping[str, Any]) -> Params:
    """``params`` with the value at each dotted key of ``values`` replaced (an ablation's overrides), validated."""
    if not values:
        return params
    data = params.model_dump(mode="json")
    for key, value in values.items():
        *sections, name = key.split(".")
        section = data
        for part in sections:
            section = section[part]
        if name not in section:
            raise KeyError(f"{key}: not a params key")
        section[name] = value
    return validate_params(data, "params with the ablation's overrides")


def load_params(path: str | Path) -> Params:
    """Read and validate a params YAML file; any unreadable file is one ``UserError`` line."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: params file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a params YAML file") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text, expected a params YAML file") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read the params file ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML ({first_line(error)})") from None
    return validate_params(data, str(path))
