"""DVC: the smoke profile's results under dvc repro, the same commands as Snakemake, what reruns, experiments, dry runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import copy_project
from workflow import (
    DEFAULT_TARGETS,
    PROFILES,
    dvc,
    dvc_dry_run,
    dvc_stages,
    dvc_status,
    edit_each_module,
    importers,
    in_default,
    run,
    snakemake_here,
    use_profile,
)

from flora_steps.pipeline.catalogue import STAGES
from flora_steps.pipeline.code import code_files
from flora_steps.pipeline.schema import budget_name


@pytest.fixture(scope="module")
def dvc_project(smoke_pipeline: Path, tmp_path_factory) -> Path:
    """A git + DVC project with the smoke profile as params.yaml and the session's smoke results (``smoke_pipeline``:
    every stage but the report, run in one process with the same commands), recorded by ``dvc commit``; then
    ``dvc repro`` of Snakemake's default target runs the report, the stage that reads every other one's results.
    Snakemake takes the same results (test_snakemake.py); both engines run the same commands
    (``test_both_engines_run_the_same_commands``)."""
    project = copy_project(tmp_path_factory.mktemp("dvc_project"))
    use_profile(project, "smoke.yaml")
    shutil.copytree(smoke_pipeline / "results", project / "results", ignore=shutil.ignore_patterns("ablations"))
    run(["git", "init", "-q"], project)
    dvc("init", "-q", cwd=project)
    dvc("config", "core.analytics", "false", cwd=project)
    # every stage the timings depend on, which is every stage but the ablations' and the report, in one walk of the
    # graph (naming each stage takes DVC a walk per name: 67 s against 8). Committing a stage's outputs writes
    # .gitignore files into folders its consumers depend on, and DVC commits a few producers after the latency
    # stage: commit that one again.
    dvc("commit", "--force", "--with-deps", "latency", cwd=project)
    dvc("commit", "--force", "latency", cwd=project)
    done = dvc("repro", *DEFAULT_TARGETS, cwd=project)
    assert [line for line in done.stdout.splitlines() if line.startswith("Running stage")] == [
        "Running stage 'report':"
    ]
    return project


def test_both_engines_run_the_same_commands(dvc_project: Path, tmp_path: Path) -> None:
    project = copy_project(tmp_path)  # a dry run: no results needed
    printed = snakemake_here(
        "-n",
        "-p",
        "--forceall",
        "--cores",
        "2",
        "--config",
        "params=configs/smoke.yaml",
        cwd=project,
    )
    snakemake_commands = {
        line.split("Shell command:")[1].strip().replace("configs/smoke.yaml", "params.yaml")
        for line in (printed.stdout + printed.stderr).splitlines()
        if "Shell command: python" in line
    }
    listed = dvc_stages(dvc_project)
    stages = yaml.safe_load((dvc_project / "dvc.lock").read_text())["stages"]
    dvc_commands = {stage["cmd"] for stage in stages.values()}
    assert snakemake_commands == dvc_commands
    assert "retrain_uniform@0.4" in listed and "retrain_control@0.4" in listed


#: Modules read by every stage, by one stage, by the reports. Which stages an edit reruns follows from each stage's
#: code dependencies, checked below for every stage (and, edit by edit, for every module through Snakemake).
EDITED = ("flora_steps/errors.py", "flora_steps/stages/supernet.py", "flora_steps/report/tables.py")


def test_editing_a_module_reruns_exactly_the_stages_that_use_it_in_dvc(dvc_project: Path) -> None:
    def check(module: str):
        return dvc_status(dvc_project), in_default(importers(module))

    assert edit_each_module(dvc_project, check, only=EDITED) == {}
    # every module is a dependency of exactly the stages that import it
    stages = yaml.safe_load((dvc_project / "dvc.yaml").read_text())["stages"]
    for name, entry in stages.items():
        deps = (entry.get("do") or entry)["deps"]
        assert {d for d in deps if d.startswith("flora_steps/")} == {str(p) for p in code_files(STAGES[name].module)}


def test_dvc_reruns_only_what_a_changed_param_touches(dvc_project: Path) -> None:
    original = (dvc_project / "params.yaml").read_text()
    try:
        for section, key, value, expected in (
            ("data", "eval_batch_size", 100, set()),
            ("retrain", "latency_repeats", 5, {"latency"}),
            (
                "retrain",
                "table_repeats",
                5,
                {"latency_table", "latency_table_ofb", "latency_table_on_slim", "latency_table_on_ofb"},
            ),
            ("retrain", "table_rank_multiple", 8, {"latency_table", "latency_table_on_slim", "latency_table_on_ofb"}),
            ("ofb", "table_embed_widths", 3, {"latency_table_ofb"}),
            (
                "retrain",
                "uniform_rank_multiple",
                2,
                {"retrain_control", "retrain_uniform", "retrain_control_latency", "retrain_uniform_latency"},
            ),
            ("retrain", "uniform_epochs", 5, {"retrain_uniform", "retrain_uniform_latency"}),
            (
                "supernet",
                "init",
                "random",
                {"supernet", "supernet_on_slim", "supernet_on_ofb", "supernet_flora_latency"}
                | {"supernet_flora_latency_on_slim", "supernet_flora_latency_on_ofb"},
            ),
            ("slim", "mlp_weight", 0.0001, {"slim"}),  # DVC lists a stage whose own deps changed
        ):
            params = yaml.safe_load(original)
            params[section][key] = value
            (dvc_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            assert dvc_status(dvc_project) == expected, key
    finally:
        (dvc_project / "params.yaml").write_text(original)


def test_dvc_experiments_keep_runs_apart(dvc_project: Path, tmp_path: Path) -> None:
    """DVC's way to run another setting without losing the committed run: ``dvc exp run --set-param``."""
    project = tmp_path / "experiments"
    shutil.copytree(dvc_project, project, symlinks=True)
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for command in (["git", "add", "-A"], ["git", "commit", "-qm", "baseline"]):
        subprocess.run(command, cwd=project, check=True, env={**os.environ, **env}, capture_output=True)
    setting = ("--set-param", "retrain.latency_repeats=5")
    done = dvc("exp", "run", "--name", "repeats5", *setting, "latency", cwd=project)
    ran = [line for line in done.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == ["Running stage 'latency':"]
    shown = json.loads(dvc("exp", "show", "--json", cwd=project).stdout)
    repeats = {
        (experiment.get("name") or "baseline"): experiment["data"]["params"]["params.yaml"]["data"]["retrain"][
            "latency_repeats"
        ]
        for entry in shown
        for experiment in [entry, *[e for run in entry.get("experiments") or [] for e in run["revs"]]]
    }
    assert repeats["repeats5"] == 5 and 3 in repeats.values()


def test_a_whole_budget_has_one_name_in_both_engines(dvc_project: Path, tmp_path: Path) -> None:
    project = copy_project(tmp_path)
    params = yaml.safe_load((project / "configs/smoke.yaml").read_text())
    params["budgets"]["uniform"] = [0.4, 0.5, 0.8, 1.0]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(dvc_project / ".dvc", project / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
    run(["git", "init", "-q"], project)
    listed = dvc_stages(project)
    assert all(
        path.startswith("results/retrain/uniform/1.0/") for path in listed[f"retrain_uniform@{budget_name(1.0)}"]
    )
    dry = snakemake_here("-n", "--forceall", "--cores", "1", cwd=project)
    assert "results/retrain/uniform/1.0/metrics.json" in dry.stdout


def test_dvc_finds_the_smoke_pipeline_up_to_date(dvc_project: Path) -> None:
    assert (dvc_project / "results/decompose/model.safetensors").is_file()
    assert (dvc_project / "results/retrain/flora/0.5/metrics.json").is_file()
    assert (dvc_project / "results/retrain/uniform/0.4/metrics.json").is_file()
    # FLORA on ViT-Slim's fine-tuned model (results/on_slim/base/), which reads ViT-Slim's search
    assert (dvc_project / "results/on_slim/retrain/flora/0.4/metrics.json").is_file()
    assert dvc_status(dvc_project) == set()
    again = dvc("repro", *DEFAULT_TARGETS, cwd=dvc_project)
    assert "didn't change, skipping" in again.stdout
    shown = dvc("plots", "show", "-o", "plots", cwd=dvc_project)
    page = (dvc_project / "plots/index.html").read_text()
    assert "index.html" in shown.stdout and "tradeoff.png" in page and "supernet_val_top1" in page


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_dry_runs_with_dvc(dvc_project: Path, profile: str, tmp_path: Path) -> None:
    project = copy_project(tmp_path)
    use_profile(project, profile)
    shutil.copytree(dvc_project / ".dvc", project / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
    run(["git", "init", "-q"], project)
    assert dvc_dry_run(project)[0] == "python -m flora_steps.stages.pretrain --params params.yaml"


def test_the_ablations_run_the_same_commands_in_both_engines(dvc_project: Path, tmp_path: Path) -> None:
    """``dvc repro ablations`` (the fixture ran Snakemake's default target only) and ``snakemake ablations``."""
    project = copy_project(tmp_path)
    config = ("--config", "params=configs/smoke.yaml")
    printed = snakemake_here("ablations", "-n", "-p", "--forceall", "--cores", "2", *config, cwd=project)
    snakemake_commands = {
        line.split("Shell command:")[1].strip().replace("configs/smoke.yaml", "params.yaml")
        for line in (printed.stdout + printed.stderr).splitlines()
        if "Shell command: python" in line
    }
    dvc_commands = dvc_dry_run(dvc_project, "ablations")
    assert set(dvc_commands) == snakemake_commands and len(dvc_commands) == len(snakemake_commands)
    assert dvc_commands[-1] == "python -m flora_steps.stages.ablations --params params.yaml"
    assert "python -m flora_steps.stages.supernet --params params.yaml --ablation random_init" in dvc_commands
