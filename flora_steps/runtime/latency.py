"""The latency table as the stages read it: the rows of the device a stage runs on, and budgets in latency."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from ..core.latency import LatencyTable, precision_of
from ..errors import UserError
from ..params import Params
from .artifacts import read_csv
from .machine import key_difference, table_key


def device_table(table: pd.DataFrame, path: Path, key: dict) -> LatencyTable:
    """The latency table's rows of ``key``'s device, read back; one line when they were measured under another key."""
    rows = table[table["device"] == key["device"]].reset_index(drop=True)
    if rows.empty:
        raise UserError(f"{path}: no timings on {key['device']}; rerun the latency_table stage on this machine")
    difference = key_difference(rows.iloc[0].to_dict(), key)
    if difference is not None:
        raise UserError(
            f"{path}: measured with {difference}; rerun the latency_table stage here "
            "(snakemake -R latency_table, dvc repro -f latency_table)"
        )
    return LatencyTable.from_frame(rows)


def read_latency_table(path: Path, device: torch.device, params: Params) -> LatencyTable:
    """The table at ``path`` for ``device`` as this process would time it (``retrain.latency_batch``, the precision
    of ``compute.amp`` there)."""
    key = table_key(device, params.retrain.latency_batch, precision_of(device, params.compute.amp))
    return device_table(read_csv(path), path, key)


@dataclass(frozen=True)
class LatencyBudget:
    """Budgets in predicted latency on one device: fractions of the dense model's, or milliseconds per batch."""

    table: LatencyTable
    unit: str  # ``budgets.latency_unit``: fraction | ms

    def limit(self, budget: float) -> float:
        """The milliseconds per batch a budget allows."""
        return budget * self.table.dense_ms if self.unit == "fraction" else budget

    def band(self, budget: float, band: float) -> tuple[float, float]:
        """The legal band in milliseconds: ``band`` is a fraction of the dense model's latency, as for MACs."""
        high = self.limit(budget)
        return high - band * self.table.dense_ms, high

    def describe(self, milliseconds: float) -> str:
        """Milliseconds in words: ``2.21 ms (0.754 of the dense model's)``."""
        return f"{milliseconds:.4g} ms ({milliseconds / self.table.dense_ms:.3f} of the dense model's)"


def latency_budget(path: Path, device: torch.device, params: Params) -> LatencyBudget:
    """Budgets in the latency the table predicts on ``device`` (the compute device: CUDA when the stage runs there)."""
    return LatencyBudget(read_latency_table(path, device, params), params.budgets.latency_unit)
