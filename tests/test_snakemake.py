"""Snakemake: the smoke profile end to end, what reruns after an edit or a param change, dry runs, resources."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, copy_project, run_command
from workflow import (
    ABLATIONS_ONLY,
    PROFILES,
    downstream,
    edit_each_module,
    importers,
    in_default,
    planned_jobs,
    snakemake,
    snakemake_here,
)

from flora_steps.pipeline.catalogue import STAGES
from flora_steps.pipeline.code import PACKAGE, code_files


@pytest.fixture(scope="module")
def project(smoke_pipeline: Path, tmp_path_factory) -> Path:
    """A project with the session's smoke results (``smoke_pipeline``: every stage but the report, run in one
    process with the same commands) in the smoke profile's own results folder. The copies keep their times, so
    every producer's outputs stay older than its consumers'."""
    project = copy_project(tmp_path_factory.mktemp("project"))
    shutil.copytree(smoke_pipeline / "results", project / "results/smoke", ignore=shutil.ignore_patterns("ablations"))
    return project


#: What ``--forcerun search`` runs through Snakemake: the search, what reads its ranks, the report.
#: The machine's latency tables: FLORA's and ViT-Slim's, OFB's, and those of FLORA's pruned bases.
TABLES = {"latency_table", "latency_table_ofb", "latency_table_on_slim", "latency_table_on_ofb"}
#: FLORA's stages under latency budgets, on each pruned model as on the dense one.
LATENCY_FLORA = ("filter_latency", "supernet_flora_latency", "search_flora_latency", "retrain_flora_latency")
SEARCH_AND_AFTER = {"search", "retrain_flora", "latency", "report"}


def test_snakemake_takes_the_smoke_results_and_runs_the_rest(project: Path) -> None:
    """Every job's declared outputs are there but the report's; Snakemake records them as its own (``--touch``:
    its metadata of code, params and inputs, for every job), then runs the search and everything after it as shell jobs.

    The whole smoke profile runs once per session (``smoke_pipeline``); both engines run the same commands
    (test_dvc.py::test_both_engines_run_the_same_commands)."""
    config = ["--config", "params=configs/smoke.yaml"]
    assert planned_jobs(snakemake_here("-n", "--cores", "2", *config, cwd=project).stdout) == {"report"}
    snakemake_here("--touch", "--forceall", "--cores", "1", *config, cwd=project)
    done = snakemake("--cores", "2", "--forcerun", "search", *config, cwd=project)
    assert planned_jobs(done.stdout + done.stderr) == SEARCH_AND_AFTER
    results = project / "results/smoke"
    for path in (
        "search/0.5/ranks.json",
        "search/0.5/benchmark.tsv",
        "retrain/flora/0.5/benchmark.tsv",
        "latency/latency.csv",
        "latency/benchmark.tsv",
        "report/comparison.md",
        "report/search_costs.md",
    ):
        assert (results / path).is_file(), path
    assert not (project / "results/pretrain").exists()  # params.yaml's results are not touched
    # a stage module's own lines reach its log, not only the library's (``python -m`` names it ``__main__``)
    assert "chosen subnet" in (results / "search/0.5/log.txt").read_text()
    assert "seed 1: test top-1" in (results / "retrain/flora/0.5/log.txt").read_text()
    dry = snakemake_here("-n", "--cores", "2", *config, cwd=project)
    assert "Nothing to be done" in dry.stdout + dry.stderr


def test_snakemake_report_has_the_figures_and_tables(project: Path) -> None:
    snakemake("--report", "report.html", "--config", "params=configs/smoke.yaml", cwd=project)
    html = (project / "report.html").read_text()
    for name in ("tradeoff.png", "sampling.png", "results.csv", "spectra.png"):
        assert name in html, name


RETRAINS = {stage.name for stage in STAGES.values() if stage.module == "retrain"}
BASES = {stage.name for stage in STAGES.values() if stage.module == "base"}


@contextmanager
def changed_profile(project: Path, section: str, key: str, value) -> Iterator[list[str]]:
    """The smoke profile with one value changed, in place (its results folder stays the same), then restored."""
    path = project / "configs/smoke.yaml"
    original = path.read_text()
    changed = yaml.safe_load(original)
    changed[section][key] = value
    path.write_text(yaml.safe_dump(changed))
    try:
        yield ["--config", "params=configs/smoke.yaml"]
    finally:
        path.write_text(original)


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        (
            "decompose",
            "targets",
            ["*.attn.qkv"],
            in_default(
                downstream({"decompose", "decompose_on_slim", "decompose_on_ofb"} | TABLES - {"latency_table_ofb"})
            ),
        ),
        # every retrain and both bases' fine-tuning (so FLORA on them), latency, report
        ("retrain", "lr", 0.001, in_default(downstream(RETRAINS | BASES))),
        ("retrain", "seeds", [0, 2], in_default(downstream(RETRAINS | BASES))),
        (
            "retrain",
            "uniform_rank_multiple",
            2,
            {"retrain_control", "retrain_uniform", "retrain_control_latency", "retrain_uniform_latency"}
            | {"latency", "report"},
        ),
        ("retrain", "uniform_epochs", 5, {"retrain_uniform", "retrain_uniform_latency", "latency", "report"}),
        ("retrain", "latency_repeats", 5, {"latency", "report"}),  # timings and the report's latency tables only
        ("retrain", "table_repeats", 5, in_default(downstream(TABLES))),  # and what the tables price
        ("retrain", "table_rank_multiple", 8, in_default(downstream(TABLES - {"latency_table_ofb"}))),  # ranks'
        ("ofb", "table_embed_widths", 3, in_default(downstream({"latency_table_ofb"}))),  # OFB's alone
        (
            "slim",
            "mlp_weight",
            0.0001,
            in_default(downstream({"slim"})),
        ),  # ViT-Slim's search, its models, FLORA on them
        # one more
        ("budgets", "slim_flora", [0.4, 0.45], {"search_on_slim", "retrain_flora_on_slim", "latency", "report"}),
        ("ofb", "macs_weight", 10.0, in_default(downstream({"ofb", "ofb_latency"}))),  # every OFB search and after
        ("data", "eval_batch_size", 100, set()),
        ("compute", "threads", 3, in_default(downstream(TABLES))),
        ("compute", "allocator", "system", in_default(downstream(TABLES))),
    ],
)
def test_snakemake_reruns_only_what_a_changed_param_touches(project: Path, section, key, value, expected) -> None:
    with changed_profile(project, section, key, value) as config:
        dry = snakemake_here("-n", "--cores", "2", *config, cwd=project)
    assert planned_jobs(dry.stdout + dry.stderr) == expected


def test_snakemake_times_again_on_another_machine(project: Path, tmp_path: Path, monkeypatch) -> None:
    """A GPU appears (a stand-in ``nvidia-smi``; the smoke profile's compute.device is auto): the latency table,
    what it prices and the latency stage rerun, nothing else does."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'Fake GPU 80GB'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    dry = snakemake_here("-n", "--cores", "2", "--config", "params=configs/smoke.yaml", cwd=project)
    assert planned_jobs(dry.stdout + dry.stderr) == in_default(downstream(TABLES))


def test_gpu_stages_declare_a_gpu_so_that_one_runs_at_a_time(project: Path) -> None:
    config = ["--config", "params=configs/deit_b_imagenet.yaml"]
    dry = snakemake_here("-n", "--forceall", "--cores", "16", "--resources", "gpu=1", *config, cwd=project)
    rule, gpu_rules, other_rules = None, set(), set()
    for line in dry.stdout.splitlines():
        if line.startswith(("rule ", "localrule ")):
            rule = line.split()[1].rstrip(":")
        elif line.strip().startswith("resources:"):
            (gpu_rules if "gpu=1" in line else other_rules).add(rule)
    assert gpu_rules == {
        "pretrain",
        "filter",
        "supernet",
        "slim",
        "search",
        "retrain_flora",
        "retrain_control",
        "retrain_uniform",
        "retrain_slim",
        "base_on_slim",
        "filter_on_slim",
        "supernet_on_slim",
        "search_on_slim",
        "retrain_flora_on_slim",
        "ofb",
        "retrain_ofb",
        "base_on_ofb",
        "filter_on_ofb",
        "supernet_on_ofb",
        "search_on_ofb",
        "retrain_flora_on_ofb",
        "filter_latency",
        "supernet_flora_latency",
        "search_flora_latency",
        "retrain_control_latency",
        "retrain_uniform_latency",
        "retrain_slim_latency",
        "retrain_flora_latency",
        "ofb_latency",
        "retrain_ofb_latency",
        *(f"{stage}_on_{base}" for base in ("slim", "ofb") for stage in LATENCY_FLORA),
        *TABLES,
        "latency",
    }
    assert other_rules == {"decompose", "decompose_on_slim", "decompose_on_ofb", "report", "all"}


def test_the_slurm_profile_dry_runs_with_per_rule_resources(project: Path) -> None:
    """Needs the optional Slurm executor plugin (requirements-slurm.txt); skipped without it."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    config = ["--config", "params=configs/deit_b_imagenet.yaml"]
    dry = snakemake_here("-n", "--profile", str(ROOT / "cluster/slurm"), *config, cwd=project)
    resources = {}
    for line in dry.stdout.splitlines():
        if line.startswith("rule "):
            rule = line.split()[1].rstrip(":")
        elif line.strip().startswith("resources:"):
            resources[rule] = line
    assert "mem_mb=64000" in resources["supernet"] and "gpu=1" in resources["supernet"]
    assert "cpus_per_task=8" in resources["supernet"] and "gpu=1" in resources["retrain_flora"]
    assert "mem_mb=32000" in resources["filter"] and "runtime=240" in resources["filter"]
    assert "gpu=1" not in resources["decompose"]


def test_a_params_path_with_a_space_reaches_the_shell_quoted(project: Path) -> None:
    shutil.copy(project / "configs/smoke.yaml", project / "configs/my smoke.yaml")
    shutil.copytree(project / "results/smoke", project / "results/my smoke", symlinks=True)  # its own results
    config = ["--config", "params=configs/my smoke.yaml"]
    snakemake("--cores", "1", "--forcerun", "report", *config, cwd=project)
    assert "params from configs/my smoke.yaml" in (project / "results/my smoke/report/log.txt").read_text()


def test_editing_a_module_reruns_exactly_the_stages_that_use_it_in_snakemake(project: Path) -> None:
    config = ["--config", "params=configs/smoke.yaml"]
    (project / "flora_steps/core/__pycache__").mkdir(exist_ok=True)  # as a test run leaves behind
    (project / "flora_steps/core/__pycache__/stale.pyc").write_bytes(b"")
    assert planned_jobs(snakemake_here("-n", "--cores", "2", *config, cwd=project).stdout) == set()

    def check(module: str):
        dry = snakemake_here("-n", "--cores", "2", *config, cwd=project)
        return planned_jobs(dry.stdout + dry.stderr), in_default(downstream(importers(module)))

    assert edit_each_module(project, check) == {}
    assert len(list((project / "flora_steps").rglob("*.py"))) == len(list(PACKAGE.rglob("*.py")))
    # every module is an input of exactly the rules of the stages that import it
    summary = snakemake_here("--detailed-summary", "--cores", "1", *config, cwd=project).stdout.splitlines()
    columns = summary[0].split("\t")
    for row in (dict(zip(columns, line.split("\t"), strict=False)) for line in summary[1:]):
        code = {path for path in row["input-file(s)"].split(",") if path.startswith("flora_steps/")}
        assert code == {str(path) for path in code_files(STAGES[row["rule"]].module)}, row["rule"]


def test_each_profile_has_its_own_results_folder_in_snakemake(project: Path) -> None:
    dry = snakemake_here("-n", "--forceall", "--cores", "2", "--config", "params=configs/hybrid.yaml", cwd=project)
    lines = [line.split("output:")[1] for line in dry.stdout.splitlines() if line.strip().startswith("output:")]
    planned = [path.strip() for line in lines for path in line.split(",")]
    assert planned and all(path.startswith("results/hybrid/") for path in planned), planned[:5]


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_dry_runs_with_snakemake(project: Path, profile: str) -> None:
    result = snakemake_here("-n", "--forceall", "--cores", "2", "--config", f"params=configs/{profile}", cwd=project)
    assert "rule pretrain:" in result.stdout + result.stderr


def test_snakemake_with_bad_params_stops_with_one_line_per_problem(project: Path) -> None:
    bad = (project / "configs/smoke.yaml").read_text().replace("seed: 0", "seed: zero")
    (project / "configs/bad.yaml").write_text(bad.replace("  lr: ", "  lrr: ", 1))
    (project / "configs/binary.yaml").write_bytes(bytes(range(256)))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for params, expected in (
        (
            "configs/bad.yaml",
            [
                "error: configs/bad.yaml: seed: input should be a valid integer, unable to parse string as an "
                "integer, got 'zero'",
                "error: configs/bad.yaml: data.split_seed: input should be a valid integer, unable to parse string "
                "as an integer, got 'zero'",
                "error: configs/bad.yaml: pretrain.lrr: unknown key (did you mean 'lr'?)",
            ],
        ),
        ("configs", ["error: configs: is a directory, expected a params YAML file"]),
        ("configs/binary.yaml", ["error: configs/binary.yaml: not UTF-8 text, expected a params YAML file"]),
    ):
        result = run_command(
            [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--config", f"params={params}"],
            cwd=project,
            env=env,
        )
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == expected


def test_with_several_runs_every_stage_after_the_dense_model_runs_once_per_run(project: Path) -> None:
    """``runs: 3``: one rule per run of each replicated stage, writing under ``runs/<k>/``; the dense model, the
    timings and the report once, the report reading every run's predictions."""
    (project / "configs/runs.yaml").write_text(
        (project / "configs/smoke.yaml").read_text().replace("\nruns: 1 ", "\nruns: 3 ", 1)
    )
    dry = snakemake_here("-n", "-p", "--forceall", "--cores", "2", "--config", "params=configs/runs.yaml", cwd=project)
    jobs = planned_jobs(dry.stdout)
    replicated = {name for name, stage in STAGES.items() if stage.replicated and name not in ABLATIONS_ONLY}
    once = {"pretrain", *TABLES, "latency", "report"}
    assert jobs == {f"{name}_run{run}" for name in replicated for run in range(3)} | once
    report = dry.stdout.split("rule report:")[1].split("rule ")[0]
    for run in range(3):
        assert f"results/runs/runs/{run}/retrain/flora/0.5/predictions.csv" in report
    assert "results/runs/runs/0/search/0.5/history.csv" in report and "runs/1/search/0.5/history.csv" not in report
    assert "stages.search --params configs/runs.yaml --budget 0.5 --run 2" in dry.stdout
    assert "stages.pretrain --params configs/runs.yaml --run" not in dry.stdout  # the dense model: once


def test_the_ablations_are_a_target_of_their_own_over_every_run(project: Path) -> None:
    """``snakemake ablations``: FLORA and each ablation's stages in every run, and the ablations table once (the
    default target runs none of them: ``test_with_several_runs_every_stage_after_the_dense_model_runs_once_per_run``)."""
    config = ["--config", "params=configs/runs.yaml"]
    (project / "configs/runs.yaml").write_text(
        (project / "configs/smoke.yaml").read_text().replace("\nruns: 1 ", "\nruns: 2 ", 1)
    )
    dry = snakemake_here("ablations", "-n", "-p", "--forceall", "--cores", "2", *config, cwd=project)
    jobs = planned_jobs(dry.stdout)
    own = {name for name in ABLATIONS_ONLY if STAGES[name].replicated}
    flora = {"decompose", "filter", "supernet", "search", "retrain_flora"}
    assert jobs == {f"{name}_run{run}" for name in own | flora for run in range(2)} | {"pretrain", "ablations"}
    assert "stages.supernet --params configs/runs.yaml --ablation uniform_sampling --run 1" in dry.stdout
    assert "results/runs/runs/1/ablations/svd_weights/retrain/0.5/predictions_inherited.csv" in dry.stdout
