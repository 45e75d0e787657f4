"""The command line of every stage, from the catalogue: ``--params``, and ``--method``, ``--base``, ``--ablation``,
``--budget``, ``--run``.

Both ``python -m flora_steps.stages.<module>`` and ``flora <module>`` build their
arguments here. Nothing heavy is imported, so ``flora --help`` and a rejected params
file answer without loading torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .catalogue import STAGES


def add_params_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")


def add_stage_arguments(parser: argparse.ArgumentParser, module: str) -> None:
    """``--params``, and ``--method``/``--base``/``--ablation``/``--budget`` where the module runs per method, base,
    ablation or budget."""
    add_params_argument(parser)
    stages = [stage for stage in STAGES.values() if stage.module == module]
    methods = list(dict.fromkeys(stage.method for stage in stages if stage.method))
    if methods and all(stage.method for stage in stages):
        parser.add_argument("--method", choices=methods, required=True, help=" or ".join(methods))
    elif methods:  # a search of another method than FLORA's own (FLORA under latency budgets)
        parser.add_argument(
            "--method", choices=methods, help=f"{' or '.join(methods)} (default: the stage under MACs budgets)"
        )
    bases = list(dict.fromkeys(stage.base for stage in stages))
    if len(bases) > 1 and "dense" in bases:
        parser.add_argument(
            "--base", choices=bases, default="dense", help="the model FLORA compresses (default: dense, the base model)"
        )
    elif len(bases) > 1:
        parser.add_argument("--base", choices=bases, required=True, help="the pruning method whose model to fine-tune")
    ablations = list(dict.fromkeys(stage.ablation for stage in stages if stage.ablation))
    if ablations:
        parser.add_argument(
            "--ablation", choices=ablations, help="one of FLORA's ablations (default: none, FLORA itself)"
        )
    if any(stage.foreach for stage in stages):
        parser.add_argument(
            "--budget",
            type=float,
            required=True,
            help="budget: a fraction of the dense model's MACs, e.g. 0.5 (a latency method's: budgets.latency_unit)",
        )
    if any(stage.replicated for stage in stages):
        parser.add_argument(
            "--run", type=int, help="the run of the pipeline, 0 to runs - 1 (only when the params have runs above 1)"
        )
