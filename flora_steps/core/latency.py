"""Latency tables: the measured time of every low-rank layer option and of a model's fixed part.

A *latency table* holds, for one device, thread count, batch size and precision, the
median time of each target layer of a model at each rank of its grid (a factorised
pair ``Linear(in, r) -> Linear(r, out)``) and dense, each timed alone on an input of
the real batch and token count, and the time of the rest of the model (its *fixed
part*: the dense model less its dense target layers, per round). A rank
configuration's predicted latency is then a sum, like its MACs: the fixed part plus
one entry per target layer (``LatencyTable.predict_ms``). A rank that was not timed
is interpolated between the neighbouring timed ranks; a rank at or above break-even
is the dense layer, as the materialised model has it.

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
COLUMNS = ("part", "layer", "in_features", "out_features", "tokens", "rank", "median_ms", "q1_ms", "q3_ms", "repeats")
#: ``part`` of a row: one option of a target layer, the fixed part, or the dense model as a whole.
LAYER, FIXED, MODEL = "layer", "fixed", "model"


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
) -> dict[Hashable, np.ndarray]:
    """Milliseconds of each module's forward pass on its input in each of ``repeats`` interleaved rounds, after
    ``warmup`` untimed rounds. Modules and inputs share one device; ``dtype`` other than float32 runs under
    autocast."""
    device = next(iter(runs.values()))[1].device
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    timings: dict[Hashable, list[float]] = {key: [] for key in runs}
    with autocast:
        for index in rounds(range(warmup + repeats)):
            for key, (module, inputs) in runs.items():
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


def _row(part: str, layer: str, shape: LinearCost | None, rank: int | None, values: np.ndarray) -> dict:
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    dims = (shape.in_features, shape.out_features, shape.tokens) if shape else (None, None, None)
    return dict(
        zip(COLUMNS, (part, layer, *dims, rank, round(median, 5), round(q1, 5), round(q3, 5), len(values)), strict=True)
    )


def measure_table(
    model: nn.Module,
    layers: Mapping[str, LinearCost],
    ranks: Mapping[str, Sequence[int]],
    images: torch.Tensor,
    repeats: int,
    warmup: int = 3,
    dtype: torch.dtype = torch.float32,
    rounds: Rounds = iter,
) -> pd.DataFrame:
    """The latency table of ``model`` (dense) on a batch ``images`` on their device.

    ``layers`` are the target layers' shapes (``trace_costs(model, ...).layers``, one
    image's tokens), ``ranks`` each one's ranks to time (the dense layer is always
    timed; ranks at or above break-even are left to it). Layers of the same shape are
    timed once and share their rows. Returns one row per (layer, rank), with ``rank``
    empty for the dense layer, then the fixed part's and the dense model's rows.
    """
    device, batch = images.device, images.shape[0]
    model = model.eval().to(device)
    options: dict[tuple[LinearCost, int | None], nn.Module] = {}
    for name, shape in layers.items():  # layers of the same shape share their modules and input
        options.setdefault((shape, None), layer_module(shape, None, device))
        for rank in ranks.get(name, ()):
            if factorised_is_cheaper(shape.in_features, shape.out_features, rank):
                options.setdefault((shape, rank), layer_module(shape, rank, device))
    inputs = {
        shape: torch.randn(batch, shape.tokens, shape.in_features, device=device) for shape in set(layers.values())
    }
    runs: dict[Hashable, tuple[nn.Module, torch.Tensor]] = {
        key: (module, inputs[key[0]]) for key, module in options.items()
    }
    timed = time_rounds({**runs, MODEL: (model, images)}, repeats, warmup, dtype, rounds)
    fixed = timed[MODEL] - sum(timed[shape, None] for shape in layers.values())
    rows = [
        _row(LAYER, name, shape, rank, timed[option, rank])
        for name, shape in layers.items()
        for option, rank in options
        if option == shape
    ]
    return pd.DataFrame([*rows, _row(FIXED, "", None, None, fixed), _row(MODEL, "", None, None, timed[MODEL])])


@dataclass(frozen=True)
class LatencyTable:
    """A latency table read back: the fixed part, and each target layer's timed ranks (``None``: dense) with
    their medians and, where the frame has them, their quartiles."""

    fixed_ms: float
    layers: Mapping[str, LinearCost]
    options: Mapping[str, Mapping[int | None, float]]
    quartiles: Mapping[str, Mapping[int | None, tuple[float, float]]] = field(default_factory=dict)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> LatencyTable:
        """The table of one key's rows (``measure_table``'s frame, or the rows of one device of the CSV)."""
        fixed = frame.loc[frame["part"] == FIXED, "median_ms"]
        if len(fixed) != 1:
            raise ValueError(f"expected one row of the fixed part, found {len(fixed)}")
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
        return cls(float(fixed.iloc[0]), layers, options, quartiles)

    def layer_ms(self, name: str, rank: int | None) -> float:
        """Predicted milliseconds of target layer ``name`` at ``rank`` (``None``: dense)."""
        shape, timed = self.layers[name], self.options[name]
        if rank is None or not factorised_is_cheaper(shape.in_features, shape.out_features, rank):
            return timed[None]
        if rank in timed:
            return timed[rank]
        factorised = sorted(r for r in timed if r is not None)
        # the dense layer stands at break-even: the rank from which the materialised model holds it
        even = break_even_rank(shape.in_features, shape.out_features)
        points = [*factorised, even] if not factorised or factorised[-1] < even else factorised
        values = [timed[r] for r in factorised] + ([timed[None]] if len(points) > len(factorised) else [])
        return float(np.interp(rank, points, values))

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
