"""The latency table as the stages read it: the rows of the device a stage runs on, and budgets in latency."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pandas as pd
import torch

from ..core.latency import LatencyTable, StructureTable, WidthTable, precision_of
from ..errors import UserError
from ..params import Params
from .artifacts import read_csv
from .machine import key_difference, table_key
from .progress import progress


@dataclass(frozen=True)
class TimingDevice:
    """One device a latency table is measured on, with what its timings need and are keyed by."""

    device: torch.device
    precision: torch.dtype
    key: dict  # ``machine.table_key``: device name, threads, batch, precision, library versions
    images: torch.Tensor  # ``retrain.latency_batch`` random images of the model's input shape, on ``device``
    rounds: Callable  # a progress bar over the interleaved rounds

    def keyed(self, rows: pd.DataFrame) -> pd.DataFrame:
        """``rows`` with the key's columns in front."""
        return pd.concat([pd.DataFrame([self.key] * len(rows)), rows], axis=1)


def timing_devices(device: torch.device, params: Params, shape: tuple[int, ...], desc: str) -> Iterator[TimingDevice]:
    """The devices a latency table times: the CPU (with ``compute.threads``), and ``device`` too when it is CUDA
    (in the precision of ``compute.amp`` there)."""
    batch = params.retrain.latency_batch
    for each in [torch.device("cpu")] + ([device] if device.type == "cuda" else []):
        precision = precision_of(each, params.compute.amp)
        yield TimingDevice(
            each,
            precision,
            table_key(each, batch, precision),
            torch.randn((batch, *shape), device=each),
            partial(progress, desc=f"{desc} {each.type}"),
        )


def device_rows(table: pd.DataFrame, path: Path, key: dict, stage: str = "latency_table") -> pd.DataFrame:
    """The latency table's rows of ``key``'s device; one line when they were measured under another key (naming
    ``stage``, the stage that writes the table)."""
    rows = table[table["device"] == key["device"]].reset_index(drop=True)
    if rows.empty:
        raise UserError(f"{path}: no timings on {key['device']}; rerun the {stage} stage on this machine")
    difference = key_difference(rows.iloc[0].to_dict(), key)
    if difference is not None:
        raise UserError(
            f"{path}: measured with {difference}; rerun the {stage} stage here "
            f"(snakemake -R {stage}, dvc repro -f {stage})"
        )
    return rows


def device_table(table: pd.DataFrame, path: Path, key: dict, stage: str = "latency_table") -> LatencyTable:
    """The latency table's rows of ``key``'s device, read back (``device_rows``)."""
    return _rank_table(device_rows(table, path, key, stage), path, stage)


def _rank_table(rows: pd.DataFrame, path: Path, stage: str = "latency_table") -> LatencyTable:
    """``rows`` read back as a rank table; one line when they are not one."""
    try:
        return LatencyTable.from_frame(rows)
    except ValueError as error:
        raise UserError(f"{path}: {error}; rerun the {stage} stage") from None


def read_latency_table(path: Path, device: torch.device, params: Params, stage: str = "latency_table") -> LatencyTable:
    """The table at ``path`` for ``device`` as this process would time it (``retrain.latency_batch``, the precision
    of ``compute.amp`` there); ``stage``: the stage that writes it, for the error."""
    return device_table(read_csv(path), path, _key(device, params), stage)


def read_width_table(path: Path, device: torch.device, params: Params) -> WidthTable:
    """The pruned widths of the table at ``path`` for ``device`` (as ``read_latency_table``); one line when it has
    none."""
    try:
        return WidthTable.from_frame(device_rows(read_csv(path), path, _key(device, params)))
    except ValueError as error:
        raise UserError(f"{path}: {error}: its model has no blocks ViT-Slim can prune") from None


def read_tables(path: Path, device: torch.device, params: Params) -> tuple[LatencyTable, WidthTable | None]:
    """Both predictions of the table at ``path`` for ``device``: from ranks, and from pruned widths (``None`` when
    it times none)."""
    rows = device_rows(read_csv(path), path, _key(device, params))
    try:
        widths = WidthTable.from_frame(rows)
    except ValueError:
        widths = None
    return _rank_table(rows, path), widths


def read_structure_table(path: Path, device: torch.device, params: Params) -> StructureTable | None:
    """OFB's latency table at ``path`` for ``device`` (as ``read_latency_table``); ``None`` when it is empty (a model
    OFB cannot prune)."""
    table = read_csv(path)
    if table.empty:
        return None
    return StructureTable.from_frame(device_rows(table, path, _key(device, params), "latency_table_ofb"))


def _key(device: torch.device, params: Params) -> dict:
    return table_key(device, params.retrain.latency_batch, precision_of(device, params.compute.amp))


@dataclass(frozen=True)
class LatencyBudget:
    """Budgets in predicted latency on one device: fractions of the latency the table predicts for its model
    (the dense model's; for FLORA on a pruned model, that model's), or milliseconds per batch."""

    table: LatencyTable | WidthTable | StructureTable  # ranks', pruned widths' or OFB's structures' predictions
    unit: str  # ``budgets.latency_unit``: fraction | ms
    model: str = "the dense model"  # what fractions are of, in words

    def limit(self, budget: float) -> float:
        """The milliseconds per batch a budget allows."""
        return budget * self.table.dense_ms if self.unit == "fraction" else budget

    def band(self, budget: float, band: float) -> tuple[float, float]:
        """The legal band in milliseconds: ``band`` is a fraction of the dense model's latency, as for MACs."""
        high = self.limit(budget)
        return high - band * self.table.dense_ms, high

    def describe(self, milliseconds: float) -> str:
        """Milliseconds in words: ``2.21 ms (0.754 of the dense model's)``."""
        return f"{milliseconds:.4g} ms ({milliseconds / self.table.dense_ms:.3f} of {self.model}'s)"


def latency_budget(
    path: Path, device: torch.device, params: Params, widths: bool = False, model: str = "the dense model"
) -> LatencyBudget:
    """Budgets in the latency the table predicts on ``device`` (the compute device: CUDA when the stage runs there),
    from its ranks or, with ``widths``, its pruned widths (each a fraction of its own prediction of its ``model``)."""
    table = read_width_table(path, device, params) if widths else read_latency_table(path, device, params)
    return LatencyBudget(table, params.budgets.latency_unit, model)


def ofb_latency_budget(path: Path, device: torch.device, params: Params) -> LatencyBudget:
    """Budgets in the latency OFB's table predicts on ``device``; one line when OFB cannot prune the model."""
    table = read_structure_table(path, device, params)
    if table is None:
        raise UserError(f"{path}: empty: OFB cannot prune this model (see the latency_table_ofb stage's log)")
    return LatencyBudget(table, params.budgets.latency_unit)
