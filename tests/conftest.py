"""Shared fixtures: the repository root, the smoke profile, and a scratch working directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import flora_steps.runtime.models  # noqa: F401  (registers vit_digits with timm)
import pytest
import yaml
from flora_steps.pipeline.catalogue import STAGES, param_value
from flora_steps.pipeline.schema import budget_name

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory) -> None:
    """Caches (the image check's) go to a scratch folder, not the user's home."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def smoke_params() -> dict:
    """The smoke profile as a plain dict, to be modified by a test."""
    return yaml.safe_load(SMOKE.read_text())


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory (stages write ``results/`` relative to it)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def smoke_results(tmp_path_factory) -> Path:
    """``results/`` after pretrain, decompose and filter on the smoke profile (run once; treat as read-only)."""
    from flora_steps.cli import main

    directory = tmp_path_factory.mktemp("smoke")
    params = write_params(directory / "params.yaml", yaml.safe_load(SMOKE.read_text()))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)
        for stage in ("pretrain", "decompose", "filter"):
            assert main([stage, "--params", str(params)]) == 0, stage
    return directory / "results"


@pytest.fixture(scope="session")
def smoke_pipeline(smoke_results: Path, tmp_path_factory) -> Path:
    """A project folder with params.yaml = smoke profile, after every stage up to retrain (run once)."""
    from flora_steps.cli import main

    directory = tmp_path_factory.mktemp("pipeline")
    (directory / "results").mkdir()
    for stage in ("pretrain", "decompose", "filter"):
        (directory / "results" / stage).symlink_to(smoke_results / stage)
    params = yaml.safe_load(SMOKE.read_text())
    params_file = str(write_params(directory / "params.yaml", params))
    commands = [  # every other stage but the report, in the layout's order (producers first), every budget
        [stage.module, *stage.arguments(budget)]
        for stage in STAGES.values()
        if stage.name not in ("pretrain", "decompose", "filter", "report")
        for budget in ([budget_name(b) for b in params["budgets"][stage.foreach]] if stage.foreach else [""])
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)
        for command in commands:
            assert main([*command, "--params", params_file]) == 0, command
    return directory


def kill_after_first_epoch(monkeypatch: pytest.MonkeyPatch, at: int = 1) -> list[int]:
    """Make the training loop's ``save_checkpoint`` save and then raise ``KeyboardInterrupt`` at save ``at``, once.

    As if the job were killed right after its first checkpoint (or its ``at``-th, when
    a stage trains several seeds in turn). Returns the epochs saved so far, a list
    that keeps growing over later runs.
    """
    import flora_steps.runtime.training as module

    real_save = module.save_checkpoint
    saves: list[int] = []

    def save_then_die(path, state):
        real_save(path, state)
        saves.append(state["epoch"])
        if len(saves) == at and not hasattr(save_then_die, "killed"):
            save_then_die.killed = True
            raise KeyboardInterrupt

    monkeypatch.setattr(module, "save_checkpoint", save_then_die)
    return saves


def set_key(params: dict, dotted: str, value) -> dict:
    """Set the value at a dotted key (``"retrain.lr"``) of a params dict; returns the dict."""
    *parents, last = dotted.split(".")
    node = params
    for key in parents:
        node = node[key]
    node[last] = value
    return params


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def copy_project(destination: Path) -> Path:
    """Copy what the workflows need (package, wiring, params, profiles) into ``destination``."""
    for name in ("flora_steps", "configs", "report"):
        shutil.copytree(ROOT / name, destination / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("Snakefile", "dvc.yaml", "params.yaml", "environment.yml", ".dvcignore"):
        shutil.copy(ROOT / name, destination / name)
    return destination
