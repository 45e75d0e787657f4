"""The ``flora`` console script: one subcommand per stage, plus ``flops``, ``export``, ``check`` and ``dvc-yaml``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import NoReturn

from . import __version__
from .errors import UserError
from .params import load_params
from .pipeline.catalogue import STAGES
from .pipeline.code import STAGES_PACKAGE
from .runtime.context import add_params_argument, add_stage_arguments, run_as_program, run_from_args

#: Stage commands in pipeline order (``retrain`` runs every retrain stage, by ``--method``).
COMMANDS = list(dict.fromkeys(stage.module for stage in STAGES.values()))
#: Commands outside the pipeline (``flora_steps.tools``).
TOOLS = ("flops", "export")


def stage_module(name: str) -> ModuleType:
    """The module of a command, found by name: ``flora_steps.stages.<name>`` or ``flora_steps.tools.<name>``."""
    return importlib.import_module(f"{__package__}.tools.{name}" if name in TOOLS else f"{STAGES_PACKAGE}.{name}")


def _add_command(commands: argparse._SubParsersAction, name: str, module: ModuleType) -> argparse.ArgumentParser:
    return commands.add_parser(
        name,
        help=module.__doc__.splitlines()[0],
        description=module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flora",
        description="Compress Vision Transformers with low-rank factorisation and one-shot rank search.",
    )
    parser.add_argument("--version", action="version", version=f"flora {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        add_stage_arguments(_add_command(commands, name, stage_module(name)), name)
    for name in TOOLS:
        module = stage_module(name)
        module.add_arguments(_add_command(commands, name, module))
    add_params_argument(
        commands.add_parser(
            "check", help="validate a params file (every problem, one line each) and the model it names"
        )
    )
    dvc_parser = commands.add_parser(
        "dvc-yaml", help="write dvc.yaml from the pipeline's catalogue (flora_steps/pipeline/catalogue.py)"
    )
    dvc_parser.add_argument("--output", type=Path, default=Path("dvc.yaml"), help="file to write (default: dvc.yaml)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in COMMANDS:
        return run_from_args(args.command, stage_module(args.command).run, args)
    try:
        if args.command in TOOLS:
            return stage_module(args.command).run(args)
        if args.command == "dvc-yaml":
            from .pipeline.dvc_yaml import write

            write(args.output)
            print(f"wrote {args.output}")
            return 0
        from .runtime.data import build_splits
        from .runtime.models import check_model, data_config

        params = load_params(args.params)
        try:
            model = check_model(params.model.name, params.model.num_classes, params.model.kwargs)
            data = params.data
            if data.dataset == "digits" or (data.root is not None and data.root.is_dir()):
                build_splits(data, data_config(model), params.model.num_classes)
            else:
                print(f"{args.params}: data.root {data.root} not found here: the data is checked where it is")
        except UserError as error:
            raise UserError(f"{args.params}: {error}") from None
        print(f"{args.params}: ok")
        return 0
    except UserError as error:
        for line in getattr(error, "problems", [str(error)]):
            print(f"flora {args.command}: error: {line}", file=sys.stderr)
        return 2


def console() -> NoReturn:
    """The ``flora`` console script: ``main`` as the whole process."""
    run_as_program(main)


if __name__ == "__main__":
    console()
