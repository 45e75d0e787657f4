"""Latency tables: the measured time of every low-rank layer option, of every pruned width, and of the fixed parts.

A *latency table* holds, for one device, thread count, batch size and precision, the
median time of each target layer of a model at each rank of its grid (a factorised
pair ``Linear(in, r) -> Linear(r, out)``) and dense, each timed alone on an input of
the real batch and token count, and the time of the rest of the model (its *fixed
part*: the dense model less its dense target layers, per round). A rank
configuration's predicted latency is then a sum, like its MACs: the fixed part plus
one entry per target layer (``LatencyTable.predict_ms``). A rank that was not timed
is interpolated between the neighbouring timed ranks; a rank at or above break-even
is the dense layer, as the materialised model has it. Kernels run a rank that is not a
multiple of their vector width slower than both multiples around it (on an AVX-512
CPU, rank 223 of DeiT-B's ``fc2`` takes 19% longer than rank 224), which interpolation
misses; with a ``multiple``, each layer shape is also timed at every rank of one
*window* from a multiple to the next (``misalignment_window``), and the time a rank's
remainder adds over the line between the window's ends (its *misalignment*) is added to
the interpolation at every rank with that remainder.

Pruned widths work alike (``WidthTable``): each prunable *part* of a block (its
attention at a number of channels kept, its MLP at a number of hidden units kept) is
timed at a grid of widths, and the rest of the model is the *pruned fixed part*: the
dense model less its parts in full, and each uniformly pruned model (every part cut to
one ratio) less its parts at their widths. The rest of a pruned model runs faster than
the dense model's (measured, `bench/width_prediction.py`), so the pruned fixed part is
kept at each *share*, the parts' time as a fraction of their time in full. A
structure's prediction is each part at its width, interpolated between timed widths,
plus the pruned fixed part at its parts' share, interpolated between the uniform models'.

Timings run in interleaved rounds (every module once per round) after warm-up rounds,
so that a burst of machine noise hits all of them alike; each keeps its median and
quartiles. No file I/O here: the table is a ``pandas.DataFrame`` its stage writes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from .lowrank import break_even_rank, factorised_is_cheaper, factorised_pair
from .macs import LinearCost

#: The table's columns after its key (``device`` ... ``timm``, one value per table).
COLUMNS = (
    "part",
    "layer",
    "in_features",
    "out_features",
    "tokens",
    "rank",
    "rank_multiple",
    "width",
    "share",
    "median_ms",
    "q1_ms",
    "q3_ms",
    "repeats",
)
#: ``part`` of a row: one option of a target layer, the fixed part, or the dense model as a whole.
LAYER, FIXED, MODEL = "layer", "fixed", "model"
#: ``part`` of a pruning row: a block's attention or MLP at one kept width, or a model less those parts (at
#: ``share``: its parts' time as a fraction of their time in full).
ATTENTION, MLP, PRUNED_FIXED = "attention", "mlp", "pruned_fixed"


def precision_of(device: torch.device, amp: bool) -> torch.dtype:
    """The precision inference runs in: bfloat16 autocast on CUDA with ``amp``, else float32."""
    return torch.bfloat16 if amp and device.type == "cuda" else torch.float32


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: A wrapper of the round indices, e.g. a progress bar.
Rounds = Callable[[range], Iterable[int]]


@torch.no_grad()
def time_rounds(
    runs: Mapping[Hashable, tuple[nn.Module, torch.Tensor]],
    repeats: int,
    warmup: int = 3,
    dtype: torch.dtype = torch.float32,
    rounds: Rounds = iter,
    shuffle: int | None = None,
) -> dict[Hashable, np.ndarray]:
    """Milliseconds of each module's forward pass on its input in each of ``repeats`` interleaved rounds, after
    ``warmup`` untimed rounds, in the order of ``runs`` or, with a ``shuffle`` seed, each round in its own order.
    A module that follows a different kind of module runs slower (on the CPU, up to 0.1 ms for one of 0.15 ms): a
    fixed order gives that cost to the same modules every round. Modules and inputs share one device; ``dtype``
    other than float32 runs under autocast."""
    device = next(iter(runs.values()))[1].device
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    timings: dict[Hashable, list[float]] = {key: [] for key in runs}
    keys = list(runs)
    generator = None if shuffle is None else np.random.default_rng(shuffle)
    with autocast:
        for index in rounds(range(warmup + repeats)):
            order = range(len(keys)) if generator is None else generator.permutation(len(keys))
            for key in (keys[i] for i in order):
                module, inputs = runs[key]
                _synchronise(device)
                started = time.perf_counter()
                module(inputs)
                _synchronise(device)
                if index >= warmup:
                    timings[key].append(1000 * (time.perf_counter() - started))
    return {key: np.asarray(values) for key, values in timings.items()}


def layer_module(layer: LinearCost, rank: int | None, device: torch.device) -> nn.Module:
    """The plain module a materialised model holds for ``layer`` at ``rank``: a factorised pair below
    break-even, else (``None``, full rank, at or above break-even) the dense ``nn.Linear``."""
    if rank is not None and factorised_is_cheaper(layer.in_features, layer.out_features, rank):
        return factorised_pair(layer.in_features, layer.out_features, rank, device=device)
    return nn.Linear(layer.in_features, layer.out_features, device=device)


@dataclass(frozen=True)
class PartOptions:
    """A prunable part of one block (``ATTENTION`` or ``MLP``) and its module at each width it is timed at; the
    largest width is the part as the dense model has it. Its input: ``tokens`` tokens of ``dim`` channels."""

    kind: str
    dim: int
    tokens: int
    modules: Mapping[int, nn.Module]

    @property
    def full(self) -> int:
        return max(self.modules)


def _row(
    part: str,
    layer: str,
    dims: tuple[int | None, int | None, int | None],
    rank: int | None,
    values: np.ndarray,
    width: int | None = None,
    share: float | None = None,
    multiple: int | None = None,
) -> dict:
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    numbers = (round(median, 5), round(q1, 5), round(q3, 5), len(values))
    return dict(zip(COLUMNS, (part, layer, *dims, rank, multiple, width, share, *numbers), strict=True))


def _dims(shape: LinearCost) -> tuple[int, int, int]:
    return shape.in_features, shape.out_features, shape.tokens


def misalignment_window(in_features: int, out_features: int, grid: Iterable[int], multiple: int) -> list[int]:
    """The ranks ``g, g + 1, ..., g + multiple`` that time a layer's misalignment: ``g`` the multiple of ``multiple``
    nearest the middle of the layer's factorised ``grid`` whose window lies below break-even; none where
    ``multiple`` is below 2 or the layer is too narrow for a window."""
    if multiple < 2:
        return []
    starts = [
        start
        for start in range(multiple, break_even_rank(in_features, out_features), multiple)
        if factorised_is_cheaper(in_features, out_features, start + multiple)
    ]
    if not starts:
        return []
    factorised = [rank for rank in grid if factorised_is_cheaper(in_features, out_features, rank)]
    middle = float(np.median(factorised)) if factorised else starts[-1] / 2
    start = min(starts, key=lambda start: (abs(start - middle), start))
    return list(range(start, start + multiple + 1))


def misalignment(timed: Mapping[int | None, float], multiple: int) -> dict[int, float]:
    """Milliseconds a rank's remainder modulo ``multiple`` adds over the line between the multiples around it, by
    remainder (0: none), from a window of ``timed`` ranks (``misalignment_window``); empty without one."""
    if multiple < 2:
        return {}
    for start in sorted(rank for rank in timed if rank is not None and rank % multiple == 0):
        window = range(start, start + multiple + 1)
        if all(rank in timed for rank in window):
            low, high = timed[start], timed[start + multiple]
            return {k: timed[start + k] - (low + k * (high - low) / multiple) for k in range(multiple)}
    return {}


def _part_key(part: PartOptions, width: int) -> tuple[str, int, int, int]:
    return part.kind, part.dim, part.tokens, width


def measure_table(
    model: nn.Module,
    layers: Mapping[str, LinearCost],
    ranks: Mapping[str, Sequence[int]],
    images: torch.Tensor,
    repeats: int,
    warmup: int = 3,
    dtype: torch.dtype = torch.float32,
    rounds: Rounds = iter,
    parts: Mapping[str, PartOptions] | None = None,
    pruned_models: Sequence[tuple[nn.Module, Mapping[str, int]]] = (),
    multiple: int = 0,
) -> pd.DataFrame:
    """The latency table of ``model`` (dense) on a batch ``images`` on their device.

    ``layers`` are the target layers' shapes (``trace_costs(model, ...).layers``, one
    image's tokens), ``ranks`` each one's ranks to time (the dense layer is always
    timed; ranks at or above break-even are left to it), and with ``multiple`` the ranks
    of its ``misalignment_window`` too. ``parts`` are the prunable
    parts by path (``blocks.0.attn``), each with its modules at the widths to time;
    ``pruned_models`` whole models with every part at one of those widths (by path), for
    the pruned fixed part at their share. Layers and parts of the same shape are timed
    once and share their rows. Returns one row per (layer, rank), with ``rank`` empty for
    the dense layer and ``rank_multiple`` the ``multiple``, then one per (part, width),
    then the fixed part's, the pruned fixed part's (with parts: the dense model's at share
    1, then each pruned model's) and the dense model's rows.
    """
    device, batch, parts = images.device, images.shape[0], parts or {}
    model = model.eval().to(device)
    layer_options: dict[tuple[LinearCost, int | None], nn.Module] = {}
    for name, shape in layers.items():  # layers of the same shape share their modules and input
        layer_options.setdefault((shape, None), layer_module(shape, None, device))
        window = misalignment_window(shape.in_features, shape.out_features, ranks.get(name, ()), multiple)
        for rank in [*ranks.get(name, ()), *window]:
            if factorised_is_cheaper(shape.in_features, shape.out_features, rank):
                layer_options.setdefault((shape, rank), layer_module(shape, rank, device))
    part_options = {  # parts of the same shape share theirs
        _part_key(part, width): module.eval().to(device)
        for part in parts.values()
        for width, module in part.modules.items()
    }
    sizes = {(shape.tokens, shape.in_features) for shape in layers.values()}
    sizes |= {(part.tokens, part.dim) for part in parts.values()}
    inputs = {size: torch.randn(batch, *size, device=device) for size in sizes}
    runs: dict[Hashable, tuple[nn.Module, torch.Tensor]] = {
        key: (module, inputs[key[0].tokens, key[0].in_features]) for key, module in layer_options.items()
    }
    runs |= {key: (module, inputs[key[2], key[1]]) for key, module in part_options.items()}
    runs |= {("pruned", index): (pruned.eval().to(device), images) for index, (pruned, _) in enumerate(pruned_models)}
    timed = time_rounds({**runs, MODEL: (model, images)}, repeats, warmup, dtype, rounds)
    fixed = timed[MODEL] - sum(timed[shape, None] for shape in layers.values())
    rows = [
        _row(LAYER, name, _dims(shape), rank, timed[option, rank], multiple=multiple)
        for name, shape in layers.items()
        for option, rank in layer_options
        if option == shape
    ]
    rows += [
        _row(part.kind, name, (part.dim, None, part.tokens), None, timed[_part_key(part, width)], width)
        for name, part in parts.items()
        for width in sorted(part.modules)
    ]
    rows.append(_row(FIXED, "", (None,) * 3, None, fixed))
    if parts:
        full = {name: part.full for name, part in parts.items()}
        models = [(timed[MODEL], full), *((timed["pruned", i], w) for i, (_, w) in enumerate(pruned_models))]
        full_ms = sum(np.median(timed[_part_key(part, part.full)]) for part in parts.values())
        for model_ms, widths in models:
            part_ms = [timed[_part_key(parts[name], width)] for name, width in widths.items()]
            share = round(float(sum(np.median(values) for values in part_ms) / full_ms), 5)
            rows.append(_row(PRUNED_FIXED, "", (None,) * 3, None, model_ms - sum(part_ms), share=share))
    return pd.DataFrame([*rows, _row(MODEL, "", (None,) * 3, None, timed[MODEL])])


@dataclass(frozen=True)
class LatencyTable:
    """A latency table read back: the fixed part, and each target layer's timed ranks (``None``: dense) with
    their medians and, where the frame has them, their quartiles; with a ``multiple``, each layer's misalignment
    by remainder (``misalignment``), where its window was timed."""

    fixed_ms: float
    layers: Mapping[str, LinearCost]
    options: Mapping[str, Mapping[int | None, float]]
    quartiles: Mapping[str, Mapping[int | None, tuple[float, float]]] = field(default_factory=dict)
    multiple: int = 0
    misalignments: Mapping[str, Mapping[int, float]] = field(init=False)

    def __post_init__(self) -> None:
        misalignments = {name: misalignment(timed, self.multiple) for name, timed in self.options.items()}
        object.__setattr__(self, "misalignments", misalignments)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> LatencyTable:
        """The table of one key's rows (``measure_table``'s frame, or the rows of one device of the CSV), with the
        ``multiple`` its layer rows were measured with (``rank_multiple``; none, or 0: ranks off the grid
        interpolated plainly)."""
        fixed = frame.loc[frame["part"] == FIXED, "median_ms"]
        if len(fixed) != 1:
            raise ValueError(f"expected one row of the fixed part, found {len(fixed)}")
        measured = frame.loc[frame["part"] == LAYER, "rank_multiple"] if "rank_multiple" in frame else pd.Series()
        multiples = set(measured.dropna())
        if len(multiples) > 1:
            raise ValueError(f"layer rows measured with rank multiples {sorted(map(int, multiples))}; expected one")
        multiple = int(multiples.pop()) if multiples else 0
        layers, options, quartiles = {}, {}, {}
        spread = {"q1_ms", "q3_ms"} <= set(frame.columns)
        for row in frame[frame["part"] == LAYER].itertuples():
            layers[row.layer] = LinearCost(int(row.in_features), int(row.out_features), int(row.tokens))
            rank = None if pd.isna(row.rank) else int(row.rank)
            options.setdefault(row.layer, {})[rank] = float(row.median_ms)
            if spread:
                quartiles.setdefault(row.layer, {})[rank] = (float(row.q1_ms), float(row.q3_ms))
        missing = [name for name, timed in options.items() if None not in timed]
        if missing:
            raise ValueError(f"no dense timing of layer {missing[0]!r}")
        return cls(float(fixed.iloc[0]), layers, options, quartiles, multiple)

    def layer_ms(self, name: str, rank: int | None) -> float:
        """Predicted milliseconds of target layer ``name`` at ``rank`` (``None``: dense): its timing, else the
        neighbouring timed ranks interpolated less their misalignment, plus the rank's own."""
        shape, timed = self.layers[name], self.options[name]
        if rank is None or not factorised_is_cheaper(shape.in_features, shape.out_features, rank):
            return timed[None]
        if rank in timed:
            return timed[rank]
        added = self.misalignments.get(name) or {}

        def misaligned(r: int) -> float:
            return added[r % self.multiple] if added else 0.0

        factorised = sorted(r for r in timed if r is not None)
        values = [timed[r] - misaligned(r) for r in factorised]
        # the dense layer stands at break-even: the rank from which the materialised model holds it
        even = break_even_rank(shape.in_features, shape.out_features)
        if not factorised or factorised[-1] < even:
            factorised, values = [*factorised, even], [*values, timed[None]]
        return float(np.interp(rank, factorised, values)) + misaligned(rank)

    def timed(self, ranks: Mapping[str, int]) -> bool:
        """Whether the table timed every layer of a rank config at its rank (ranks at or above break-even: dense),
        so that ``predict_ms`` interpolates nothing."""
        return all(
            not factorised_is_cheaper(self.layers[name].in_features, self.layers[name].out_features, rank)
            or rank in self.options[name]
            for name, rank in ranks.items()
        )

    def _quartiles(self, name: str, rank: int | None) -> tuple[float, float]:
        """Lower and upper quartile of a timed option; the prediction for both where none were kept."""
        return self.quartiles.get(name, {}).get(rank) or (self.layer_ms(name, rank),) * 2

    def fastest_width(self, name: str, rank: int | None) -> int | None:
        """The fastest form of target layer ``name`` at ``rank`` by this table: the rank itself, a timed rank above
        it (the pair padded with zero components: the same function), or ``None``, the dense weight.

        Another form replaces the rank only when it is faster beyond the spread of both timings (its upper
        quartile below the rank's lower quartile); the fastest such form by median wins. ``None`` and ranks at or
        above break-even are dense.
        """
        shape = self.layers[name]
        if rank is None or not factorised_is_cheaper(shape.in_features, shape.out_features, rank):
            return None
        floor = self._quartiles(name, rank)[0]
        above = [r for r in self.options[name] if r is not None and r > rank]
        faster = [width for width in [*sorted(above), None] if self._quartiles(name, width)[1] < floor]
        return min(faster, key=lambda width: self.layer_ms(name, width), default=rank)

    def fastest_widths(self, ranks: Mapping[str, int]) -> dict[str, int | None]:
        """``fastest_width`` of every layer of a rank config (for ``materialise(..., widths=...)``)."""
        return {name: self.fastest_width(name, rank) for name, rank in ranks.items()}

    def predict_ms(self, ranks: Mapping[str, int]) -> float:
        """Predicted milliseconds per batch of the model at a rank config (target layers not in it: dense).

        Raises ``ValueError`` naming a layer the table does not hold.
        """
        unknown = sorted(set(ranks) - set(self.layers))
        if unknown:
            raise ValueError(f"layer {unknown[0]!r} is not a target layer of this latency table")
        return self.fixed_ms + sum(self.layer_ms(name, ranks.get(name)) for name in self.layers)

    @property
    def dense_ms(self) -> float:
        """Predicted milliseconds per batch of the dense model."""
        return self.predict_ms({})


@dataclass(frozen=True)
class WidthTable:
    """A latency table's pruning rows read back: the pruned fixed part at each share (the parts' time as a fraction
    of their time in full), and each prunable part's timed widths (by path, e.g. ``blocks.0.attn``) with their
    medians."""

    fixed: Mapping[float, float]
    options: Mapping[str, Mapping[int, float]]

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> WidthTable:
        """The pruning rows of one key's table; ``ValueError`` when it has none (a model without prunable blocks,
        or a table measured before they were timed)."""
        fixed = frame[frame["part"] == PRUNED_FIXED]
        if fixed.empty or "share" not in frame.columns or fixed["share"].isna().any():
            raise ValueError("the latency table times no pruned widths")
        options: dict[str, dict[int, float]] = {}
        for row in frame[frame["part"].isin((ATTENTION, MLP))].itertuples():
            options.setdefault(row.layer, {})[int(row.width)] = float(row.median_ms)
        return cls(dict(zip(fixed["share"].astype(float), fixed["median_ms"].astype(float), strict=True)), options)

    def part_ms(self, name: str, width: int | None) -> float:
        """Predicted milliseconds of part ``name`` at ``width`` (``None``: full), linear between timed widths; below
        the narrowest timed width, that width's time."""
        timed = self.options[name]
        if width is None:
            return timed[max(timed)]
        widths = sorted(timed)
        return float(np.interp(width, widths, [timed[w] for w in widths]))

    def fixed_ms(self, share: float = 1.0) -> float:
        """The pruned fixed part of a model whose parts take ``share`` of their time in full, linear between the
        timed shares (the nearest one beyond them)."""
        shares = sorted(self.fixed)
        return float(np.interp(share, shares, [self.fixed[s] for s in shares]))

    def predict_ms(self, widths: Mapping[str, int]) -> float:
        """Predicted milliseconds per batch of the model with each part of ``widths`` at its width (others: full).

        Raises ``ValueError`` naming a part the table does not hold.
        """
        unknown = sorted(set(widths) - set(self.options))
        if unknown:
            raise ValueError(f"part {unknown[0]!r} is not a prunable part of this latency table")
        parts = sum(self.part_ms(name, widths.get(name)) for name in self.options)
        return self.fixed_ms(parts / self.full_parts_ms) + parts

    @property
    def full_parts_ms(self) -> float:
        """Predicted milliseconds of every part in full."""
        return sum(self.part_ms(name, None) for name in self.options)

    @property
    def dense_ms(self) -> float:
        """Predicted milliseconds per batch of the model at full width."""
        return self.predict_ms({})


#: The columns of a structure table (OFB's widths) after its key: ``part`` is ``ATTENTION`` (``width``: channels per
#: head), ``MLP`` (``width``: units), ``SKELETON`` (the model less every attention and MLP), ``RESIDUAL`` (a whole
#: model less its skeleton and parts) or ``MODEL`` (the dense model), each at an embedding width ``embed``.
STRUCTURE_COLUMNS = ("part", "layer", "embed", "heads", "width", "tokens", "median_ms", "q1_ms", "q3_ms", "repeats")
#: ``part`` of a structure table's row timing what no attention or MLP holds (patch embedding, norms, sums, head);
#: and of a row holding a whole model's time at an embedding width less its skeleton and parts timed alone.
SKELETON, RESIDUAL = "skeleton", "residual"


@dataclass(frozen=True)
class StructureOptions:
    """One block's attention, by (embedding width, heads, channels per head), and MLP, by (embedding width, units),
    each as a module to time on ``tokens`` tokens of its embedding width."""

    tokens: int
    attention: Mapping[tuple[int, int, int], nn.Module]
    mlp: Mapping[tuple[int, int], nn.Module]


def _structure_row(part: str, layer: str, embed: int, heads, width, tokens, values: np.ndarray) -> dict:
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    numbers = (round(median, 5), round(q1, 5), round(q3, 5), len(values))
    return dict(zip(STRUCTURE_COLUMNS, (part, layer, embed, heads, width, tokens, *numbers), strict=True))


def measure_structure_table(
    model: nn.Module,
    blocks: Mapping[str, StructureOptions],
    skeletons: Mapping[int, nn.Module],
    images: torch.Tensor,
    repeats: int,
    warmup: int = 3,
    dtype: torch.dtype = torch.float32,
    rounds: Rounds = iter,
    models: Mapping[int, tuple[nn.Module, Mapping[str, tuple[int, int, int]]]] | None = None,
) -> pd.DataFrame:
    """The structure table of ``model`` (dense, embedding width ``model.embed_dim``) on a batch ``images``.

    ``blocks`` gives each block's options (blocks sharing one ``StructureOptions`` object
    are timed once and share their rows' values), ``skeletons`` the model less its
    attentions and MLPs at each embedding width, ``models`` a whole model at some of
    those widths with each block's (heads, channels per head, units), all of them
    options of ``blocks``. Everything runs in interleaved rounds with the dense model.
    Returns a row per block, embedding width and attention cell or MLP width, one per
    skeleton, the residual at each width of ``models`` and the dense model's (the model's
    median less its skeleton's and its parts' timed alone; quartiles of the differences
    round by round), and the dense model's.

    Each round runs in its own order: in a fixed one, the first option of each embedding
    width ran up to 0.25 ms slower. Side by side on the default's model (two tables each),
    the median error of OFB's models' predicted share of the dense model's latency was
    29-31% in a fixed order with the residual of the dense model alone, 8-9% with the
    residual at each width, 2-7% shuffled with it. The rank table keeps its fixed order,
    which predicts low-rank models better (1.5-2.2% against 3.8-7.6% shuffled).
    """
    device, batch = images.device, images.shape[0]
    shared = {id(options): options for options in blocks.values()}
    inputs: dict[tuple[int, int], torch.Tensor] = {}

    def tokens_of(options: StructureOptions, embed: int) -> torch.Tensor:
        return inputs.setdefault((options.tokens, embed), torch.randn(batch, options.tokens, embed, device=device))

    runs: dict[Hashable, tuple[nn.Module, torch.Tensor]] = {}
    for key, options in shared.items():
        for cell, module in options.attention.items():
            runs[key, ATTENTION, cell] = (module.eval().to(device), tokens_of(options, cell[0]))
        for cell, module in options.mlp.items():
            runs[key, MLP, cell] = (module.eval().to(device), tokens_of(options, cell[0]))
    runs |= {(SKELETON, embed): (module.eval().to(device), images) for embed, module in skeletons.items()}
    full = {name: (*max(options.attention)[1:], max(options.mlp)[1]) for name, options in blocks.items()}
    whole = {int(model.embed_dim): (model, full), **(models or {})}
    runs |= {(MODEL, embed): (module.eval().to(device), images) for embed, (module, _) in whole.items()}
    timed = time_rounds(runs, repeats, warmup, dtype, rounds, shuffle=0)
    rows = []
    for name, options in blocks.items():
        key = id(options)
        rows += [
            _structure_row(ATTENTION, name, embed, heads, head_dim, options.tokens, timed[key, ATTENTION, cell])
            for cell in sorted(options.attention)
            for embed, heads, head_dim in [cell]
        ]
        rows += [
            _structure_row(MLP, name, embed, None, units, options.tokens, timed[key, MLP, cell])
            for cell in sorted(options.mlp)
            for embed, units in [cell]
        ]
    rows += [
        _structure_row(SKELETON, "", embed, None, None, None, timed[SKELETON, embed]) for embed in sorted(skeletons)
    ]
    for embed in sorted(whole):
        pieces = [timed[SKELETON, embed]] + [
            timed[id(blocks[name]), kind, cell]
            for name, (heads, head_dim, units) in whole[embed][1].items()
            for kind, cell in ((ATTENTION, (embed, heads, head_dim)), (MLP, (embed, units)))
        ]
        row = _structure_row(RESIDUAL, "", embed, None, None, None, timed[MODEL, embed] - sum(pieces))
        # the median: the model's less its pieces' (each whole model's prediction is then its median; in shuffled
        # rounds the median of the differences strays from it); the quartiles: of the differences, round by round
        row["median_ms"] = round(float(np.median(timed[MODEL, embed]) - sum(np.median(piece) for piece in pieces)), 5)
        rows.append(row)
    rows.append(_structure_row(MODEL, "", int(model.embed_dim), None, None, None, timed[MODEL, int(model.embed_dim)]))
    return pd.DataFrame(rows)


def _interpolate(values: Mapping[int, float], embed: float) -> float:
    """Linear in the embedding width between timed widths (the nearest end outside them)."""
    widths = sorted(values)
    return float(np.interp(embed, widths, [values[w] for w in widths]))


@dataclass(frozen=True)
class StructureTable:
    """A structure table read back: the skeleton's time by embedding width, each block's attention by (heads,
    channels per head) and MLP by units, each by embedding width; linear in the embedding width between timed
    ones. A structure's prediction is its fixed part (the skeleton and the residual at its embedding width)
    plus every block's attention and MLP at its widths.

    The residual at a width is a whole model's time there less its skeleton and its
    parts timed alone (what running them together costs or saves), as the rank table's
    fixed part is the dense model less its layers: the dense model's prediction is its
    median. A narrower model's rest runs faster, so it is timed at several widths."""

    skeleton: Mapping[int, float]
    attention: Mapping[str, Mapping[tuple[int, int], Mapping[int, float]]]
    mlp: Mapping[str, Mapping[int, Mapping[int, float]]]
    embed_dim: int  # the dense model's
    model_ms: float  # the dense model, timed whole
    residual: Mapping[int, float] = field(default_factory=dict)  # by embedding width

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> StructureTable:
        """The table of one key's rows (``measure_structure_table``'s frame, or one device's rows of the CSV)."""
        model = frame[frame["part"] == MODEL]
        skeleton, residual = frame[frame["part"] == SKELETON], frame[frame["part"] == RESIDUAL]
        if len(model) != 1 or skeleton.empty or residual.empty:
            raise ValueError("expected the dense model's row, the skeleton's and the residual's rows")
        attention: dict[str, dict[tuple[int, int], dict[int, float]]] = {}
        mlp: dict[str, dict[int, dict[int, float]]] = {}
        for row in frame[frame["part"] == ATTENTION].itertuples():
            cell = (int(row.heads), int(row.width))
            attention.setdefault(row.layer, {}).setdefault(cell, {})[int(row.embed)] = float(row.median_ms)
        for row in frame[frame["part"] == MLP].itertuples():
            mlp.setdefault(row.layer, {}).setdefault(int(row.width), {})[int(row.embed)] = float(row.median_ms)
        widths = dict(zip(skeleton["embed"].astype(int), skeleton["median_ms"].astype(float), strict=True))
        rests = dict(zip(residual["embed"].astype(int), residual["median_ms"].astype(float), strict=True))
        return cls(widths, attention, mlp, int(model["embed"].iloc[0]), float(model["median_ms"].iloc[0]), rests)

    def attention_ms(self, block: str, embed: float, heads: int, head_dim: int) -> float:
        """Predicted milliseconds of ``block``'s attention with ``heads`` heads of ``head_dim`` channels."""
        timed = self.attention.get(block, {}).get((heads, head_dim))
        if timed is None:
            raise ValueError(f"{block}.attn with {heads} heads of {head_dim} channels is not in the latency table")
        return _interpolate(timed, embed)

    def mlp_ms(self, block: str, embed: float, units: int) -> float:
        """Predicted milliseconds of ``block``'s MLP with ``units`` hidden units."""
        timed = self.mlp.get(block, {}).get(units)
        if timed is None:
            raise ValueError(f"{block}.mlp with {units} hidden units is not in the latency table")
        return _interpolate(timed, embed)

    def predict_ms(self, embed: int, blocks: Mapping[str, tuple[int, int, int]]) -> float:
        """Predicted milliseconds per batch at embedding width ``embed`` with each block's (heads, channels per
        head, MLP units); every block of the table must be given. ``ValueError`` naming what it does not hold."""
        missing = sorted(set(self.attention) - set(blocks))
        if missing:
            raise ValueError(f"no widths given for block {missing[0]!r}")
        parts = sum(
            self.attention_ms(name, embed, heads, head_dim) + self.mlp_ms(name, embed, units)
            for name, (heads, head_dim, units) in blocks.items()
        )
        return self.fixed_ms(embed) + parts

    def fixed_ms(self, embed: float) -> float:
        """Predicted milliseconds of what no attention or MLP holds at embedding width ``embed``: the skeleton and
        the residual."""
        return _interpolate(self.skeleton, embed) + (_interpolate(self.residual, embed) if self.residual else 0.0)

    @property
    def full(self) -> dict[str, tuple[int, int, int]]:
        """Every block's widths in the dense model: its largest timed cells."""
        return {name: (*max(cells), max(self.mlp[name])) for name, cells in self.attention.items()}

    @property
    def dense_ms(self) -> float:
        """Predicted milliseconds per batch of the dense model."""
        return self.predict_ms(self.embed_dim, self.full)
