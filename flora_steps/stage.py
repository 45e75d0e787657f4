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
from pathlib import Path

from pydantic import BaseModel
from tqdm.contrib.logging import logging_redirect_tqdm

from .errors import UserError
from .params import Params, load_params

RESULTS = Path("results")
log = logging.getLogger("flora")


def stage_dir(stage: str) -> Path:
    """``results/<stage>/``, created if missing."""
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


def add_params_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")


def run_stage(stage: str, run: Callable[[Params], None], params_path: Path) -> int:
    """Load params, log to ``results/<stage>/log.txt``, run the stage; user errors become one line."""
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


def stage_main(stage: str, description: str, run: Callable[[Params], None], argv: Sequence[str] | None = None) -> int:
    """Entry point for ``python -m flora_steps.<stage>``."""
    parser = argparse.ArgumentParser(prog=f"python -m flora_steps.{stage}", description=description)
    add_params_argument(parser)
    args = parser.parse_args(argv)
    return run_stage(stage, run, args.params)
