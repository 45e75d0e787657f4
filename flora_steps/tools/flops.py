"""Print MACs and parameters of a model, dense or with a rank config.

Needs no weights, data or training: the model is built on PyTorch's `meta`
device and traced once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import timm
import torch

from ..core import trace_costs
from ..errors import UserError
from ..runtime.artifacts import read_rank_config
from ..runtime.context import run_as_program
from ..runtime.models import input_shape, is_known_model


def count(model_name: str, ranks: dict[str, int], num_classes: int | None = None) -> dict:
    """MACs and parameters of ``model_name`` with ``ranks`` (layers not listed are dense)."""
    if not is_known_model(model_name):
        raise UserError(f"--model: unknown timm model '{model_name}'")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False, **kwargs)
    shape = input_shape(model)
    costs = trace_costs(model, shape)
    try:
        costs.check_ranks(ranks)
    except ValueError as error:
        raise UserError(f"--ranks: {error}") from None
    macs, params = costs.macs(ranks), costs.params(ranks)
    return {
        "model": model_name,
        "input_size": list(shape),
        "factorised_layers": len(ranks),
        "macs": macs,
        "params": params,
        "dense_macs": costs.dense_macs,
        "dense_params": costs.dense_params,
        "macs_ratio": macs / costs.dense_macs,
    }


def format_report(result: dict) -> str:
    def scaled(value: int, units: str) -> str:
        for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if value >= factor:
                return f"{value / factor:.3f} {prefix}{units}"
        return f"{value} {units}"

    size = "x".join(map(str, result["input_size"]))
    return (
        f"model        {result['model']} (input {size}, {result['factorised_layers']} factorised layers)\n"
        f"MACs         {scaled(result['macs'], 'MACs')}  ({100 * result['macs_ratio']:.1f}% of dense "
        f"{scaled(result['dense_macs'], 'MACs')})\n"
        f"parameters   {scaled(result['params'], '')}  (dense {scaled(result['dense_params'], '')})"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="timm model name or vit_digits (default: the rank config's model)")
    parser.add_argument("--ranks", type=Path, help="rank-config JSON; layers not listed stay dense")
    parser.add_argument("--num-classes", type=int, help="classifier size (default: the model's own)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    ranks: dict[str, int] = {}
    model_name = args.model
    if args.ranks is not None:
        config = read_rank_config(args.ranks)
        if model_name is not None and model_name != config.model:
            raise UserError(f"--ranks: {args.ranks} is for model {config.model}, not {model_name}")
        model_name, ranks = config.model, config.ranks
    if model_name is None:
        raise UserError("give --model NAME or --ranks FILE")
    result = count(model_name, ranks, args.num_classes)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flora_steps.tools.flops", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except UserError as error:
        print(f"flora flops: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    run_as_program(main)
