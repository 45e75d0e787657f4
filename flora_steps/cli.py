"""The ``flora`` console script: one subcommand per stage, plus ``flops``, ``export``, ``check`` and ``dvc-yaml``.

Only the command that runs is imported: ``flora --help`` and a params file that
``flora check`` rejects answer in well under a second, without loading torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from . import __version__
from .errors import UserError
from .params import load_params
from .pipeline.catalogue import STAGES
from .pipeline.code import STAGES_PACKAGE, docstring
from .pipeline.commands import add_params_argument, add_stage_arguments
from .pipeline.schema import DEFAULT_PARAMS

#: Stage commands in pipeline order (``retrain`` runs every retrain stage, by ``--method``).
COMMANDS = list(dict.fromkeys(stage.module for stage in STAGES.values()))
#: Commands outside the pipeline (``flora_steps.tools``).
TOOLS = ("flops", "export")


def _command_module(command: str) -> str:
    return f"{__package__}.tools.{command}" if command in TOOLS else f"{STAGES_PACKAGE}.{command}"


def stage_module(name: str) -> ModuleType:
    """The module of a command, found by name: ``flora_steps.stages.<name>`` or ``flora_steps.tools.<name>``."""
    return importlib.import_module(_command_module(name))


def _add_command(commands: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    description = docstring(_command_module(name))  # read from the source: the module is imported only to run
    return commands.add_parser(
        name,
        help=description.splitlines()[0],
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command's parser; of the tools, only ``command``'s arguments (they are defined by its module)."""
    parser = argparse.ArgumentParser(
        prog="flora",
        description="Compress Vision Transformers with low-rank factorisation and one-shot rank search.",
    )
    parser.add_argument("--version", action="version", version=f"flora {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        add_stage_arguments(_add_command(commands, name), name)
    for name in TOOLS:
        tool = _add_command(commands, name)
        if name == command:
            stage_module(name).add_arguments(tool)
    add_params_argument(
        commands.add_parser(
            "check", help="validate a params file (every problem, one line each) and the model it names"
        )
    )
    dvc_parser = commands.add_parser(
        "dvc-yaml",
        help="write dvc.yaml from the pipeline's catalogue (flora_steps/pipeline/catalogue.py), for params.yaml's runs",
    )
    dvc_parser.add_argument("--output", type=Path, default=Path("dvc.yaml"), help="file to write (default: dvc.yaml)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(next((word for word in argv if not word.startswith("-")), None)).parse_args(argv)
    if args.command in COMMANDS:
        from .runtime.context import run_from_args

        return run_from_args(args.command, stage_module(args.command).run, args)
    try:
        if args.command in TOOLS:
            return stage_module(args.command).run(args)
        if args.command == "dvc-yaml":
            from .pipeline.catalogue import idle_stages
            from .pipeline.dvc_yaml import write

            default = load_params(DEFAULT_PARAMS)
            write(args.output, default.runs, idle_stages(default.model_dump(mode="json")["budgets"]))
            print(f"wrote {args.output}")
            return 0
        params = load_params(args.params)
        from .runtime.data import build_splits
        from .runtime.models import check_model, data_config

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


if __name__ == "__main__":
    raise SystemExit(main())
