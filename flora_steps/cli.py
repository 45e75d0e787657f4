"""The ``flora`` console script: one subcommand per stage, plus ``flops``, ``export`` and ``check``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__, decompose, export, flops, pretrain, report, retrain, search, supernet
from . import filter as filter_stage
from .errors import UserError
from .params import load_params
from .stage import add_params_argument, run_from_args

#: Pipeline stages in order: subcommand name -> module with ``run(params)``.
STAGES = {
    "pretrain": pretrain,
    "decompose": decompose,
    "filter": filter_stage,
    "supernet": supernet,
    "search": search,
    "retrain": retrain,
    "report": report,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flora",
        description="Compress Vision Transformers with low-rank factorisation and one-shot rank search.",
    )
    parser.add_argument("--version", action="version", version=f"flora {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in STAGES.items():
        summary = module.__doc__.splitlines()[0]
        stage_parser = commands.add_parser(
            name, help=summary, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        add_params_argument(stage_parser)
        if hasattr(module, "add_arguments"):
            module.add_arguments(stage_parser)
    flops_parser = commands.add_parser("flops", help=flops.__doc__.splitlines()[0], description=flops.__doc__)
    flops.add_arguments(flops_parser)
    export_parser = commands.add_parser(
        "export",
        help=export.__doc__.splitlines()[0],
        description=export.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_arguments(export_parser)
    check_parser = commands.add_parser("check", help="validate a params file and exit")
    add_params_argument(check_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in STAGES:
        return run_from_args(args.command, STAGES[args.command].run, args)
    try:
        if args.command == "flops":
            return flops.run(args)
        if args.command == "export":
            return export.run(args)
        load_params(args.params)
        print(f"{args.params}: ok")
        return 0
    except UserError as error:
        print(f"flora {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
