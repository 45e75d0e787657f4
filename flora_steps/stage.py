"""What every stage command shares: its results folder, its log file and its error handling."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from pydantic import BaseModel
from tqdm.contrib.logging import logging_redirect_tqdm

from .errors import UserError
from .params import Params, load_params

RESULTS = Path("results")
log = logging.getLogger("flora")


def stage_dir(stage: str) -> Path:
    """``results/<stage>/`` (``stage`` may have sub-folders, e.g. ``search/0.5``), created if missing."""
    path = RESULTS / stage
    path.mkdir(parents=True, exist_ok=True)
    return path


def fingerprint(*parts: BaseModel | int | str) -> str:
    """A short hash of params sections, to tell whether a checkpoint belongs to this run."""
    text = json.dumps([p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _configure_logging(stage: str) -> logging.FileHandler | None:
    """Log to stderr and ``results/<stage>/log.txt``; extra torchrun processes only warn, to stderr."""
    log.handlers.clear()
    log.propagate = False
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(f"flora {stage}: %(message)s"))
    log.addHandler(console)
    if os.environ.get("RANK", "0") != "0":
        log.setLevel(logging.WARNING)
        return None
    log.setLevel(logging.INFO)
    file = logging.FileHandler(stage_dir(stage) / "log.txt", mode="w")
    file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(file)
    return file


def budget_name(budget: float) -> str:
    """A budget as its results folder, Snakemake wildcard and DVC ``foreach`` item spell it: 0.5 -> ``0.5``."""
    return repr(float(budget))


def add_params_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")


def add_budget_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--budget", type=float, required=True, help="MACs budget as a fraction of the dense model's MACs, e.g. 0.5"
    )


def check_budget(budget: float, allowed: Sequence[float], key: str) -> None:
    """Raise ``UserError`` unless ``budget`` is one of the params' ``key`` budgets."""
    if budget not in allowed:
        raise UserError(f"--budget {budget}: not one of {key} {list(allowed)}")


def run_stage(stage: str, run: Callable[[Params], None], params_path: Path) -> int:
    """Load params, log to ``results/<stage>/log.txt``, run the stage; user errors become one line.

    ``stage`` may name a sub-folder (``search/0.5``) for stages that run once per budget.
    """
    file_handler = _configure_logging(stage)
    started = time.perf_counter()
    try:
        params = load_params(params_path)
        log.info("params from %s", params_path)
        with logging_redirect_tqdm([log]):
            run(params)
        log.info("done in %.1f s", time.perf_counter() - started)
        return 0
    except UserError as error:
        log.error("error: %s", error)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; a rerun resumes from the last checkpoint where the stage keeps one")
        return 130
    finally:
        if file_handler is not None:
            log.removeHandler(file_handler)
            file_handler.close()


def run_from_args(stage: str, run: Callable[..., None], args: argparse.Namespace) -> int:
    """Run a stage from its parsed arguments.

    ``--method`` and ``--budget``, where the stage has them, are passed on to ``run``
    and pick its results sub-folder: ``results/<stage>/[<method>/][<budget>/]``.
    """
    options = {key: getattr(args, key) for key in ("method", "budget") if getattr(args, key, None) is not None}
    folder = "/".join([stage, *[budget_name(v) if k == "budget" else v for k, v in options.items()]])
    return run_stage(folder, partial(run, **options), args.params)


def stage_main(
    stage: str,
    description: str,
    run: Callable[..., None],
    argv: Sequence[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """Entry point for ``python -m flora_steps.<stage>``; ``add_arguments`` adds the stage's own options."""
    parser = argparse.ArgumentParser(prog=f"python -m flora_steps.{stage}", description=description)
    add_params_argument(parser)
    if add_arguments is not None:
        add_arguments(parser)
    return run_from_args(stage, run, parser.parse_args(argv))
