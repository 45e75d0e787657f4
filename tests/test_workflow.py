"""Snakefile and dvc.yaml: the same stages and commands, the smoke profile end to end, dry runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, copy_project

PROFILES = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))


def run(command: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def snakemake(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "snakemake", *args], cwd)


def dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], cwd)


def snakefile_rules() -> dict[str, dict]:
    """Each rule's shell command and output/log files, read from the Snakefile text."""
    rules = {}
    for block in re.split(r"^rule ", (ROOT / "Snakefile").read_text(), flags=re.M)[1:]:
        name = block.split(":", 1)[0]
        shell = re.search(r'shell:\s*\n\s*"([^"]+)"', block)
        files = set(re.findall(r'"((?:results|flora_steps)/[^"]+)"', block.split("params:")[0]))
        inputs = (
            set(re.findall(r'"((?:results|flora_steps)/[^"]+)"', block.split("output:")[0]))
            if "output:" in block
            else files
        )
        rules[name] = {"cmd": shell.group(1) if shell else None, "files": files - inputs, "inputs": inputs}
    return rules


def dvc_stages() -> dict[str, dict]:
    """Each stage's command, outputs, inputs and params; ``foreach`` items written as Snakemake's ``{budget}``."""
    text = (ROOT / "dvc.yaml").read_text().replace("${item}", "{budget}")
    stages = {}
    for name, stage in yaml.safe_load(text)["stages"].items():
        if "foreach" in stage:
            stage = stage["do"]
        files = set()
        for key in ("outs", "metrics", "plots"):
            for entry in stage.get(key, []):
                files.add(entry if isinstance(entry, str) else next(iter(entry)))
        deps = {d for d in stage["deps"] if d.startswith(("results/", "flora_steps/"))}
        stages[name] = {"cmd": stage["cmd"], "files": files, "inputs": deps, "params": stage["params"]}
    return stages


def same_inputs(snakemake_inputs: set[str], dvc_deps: set[str]) -> bool:
    """Each Snakemake input is a DVC dep or lies in a DVC dep folder, and every DVC dep is used."""

    def within(path: str, dep: str) -> bool:
        return path == dep or path.startswith(dep + "/")

    return all(any(within(p, d) for d in dvc_deps) for p in snakemake_inputs) and all(
        any(within(p, d) for p in snakemake_inputs) for d in dvc_deps
    )


def test_snakefile_and_dvc_yaml_wire_the_same_stages() -> None:
    rules, stages = snakefile_rules(), dvc_stages()
    assert set(rules) - {"all"} == set(stages)
    for name, stage in stages.items():
        rule = rules[name]
        command = rule["cmd"].replace("{PARAMS_FILE}", "params.yaml").replace("{wildcards.budget}", "{budget}")
        assert command == stage["cmd"]
        module, _, method = name.partition("_")
        assert stage["cmd"].startswith(f"python -m flora_steps.{module} --params params.yaml")
        if method:
            assert f"--method {method} --budget {{budget}}" in stage["cmd"]
        benchmark = {path for path in rule["files"] if path.endswith("benchmark.tsv")}
        assert len(benchmark) == 1 and rule["files"] - benchmark == stage["files"], name
        assert same_inputs(rule["inputs"], stage["inputs"]), name
        folder = f"results/{module}/{method}/" if method else f"results/{module}/"
        assert all(path.startswith(folder) for path in stage["files"]), name
    snakefile = (ROOT / "Snakefile").read_text()
    for name, stage in stages.items():
        block = snakefile.split(f"rule {name}:")[1].split("\nrule ")[0]
        tracked = re.search(r"tracked\(([^)]*)\)", block).group(1)
        assert [s.strip().strip('"') for s in tracked.split(",")] == stage["params"]


def test_pinned_environments_agree() -> None:
    requirements = {
        line.strip()
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line and not line.startswith("#")
    }
    conda = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert set(pip) == requirements
    assert "torch==2.14.1" in requirements and "torchvision==0.29.1" in requirements


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return copy_project(tmp_path_factory.mktemp("project"))


def test_smoke_profile_through_snakemake(project: Path) -> None:
    config = ["--config", "params=configs/smoke.yaml"]
    snakemake("--cores", "2", *config, cwd=project)
    for path in (
        "pretrain/model.safetensors",
        "pretrain/benchmark.tsv",
        "decompose/spectra.png",
        "decompose/log.txt",
        "search/0.5/ranks.json",
        "search/0.5/benchmark.tsv",
        "retrain/flora/0.5/model.safetensors",
        "retrain/uniform/0.5/metrics.json",
        "retrain/uniform/0.8/log.txt",
    ):
        assert (project / "results" / path).is_file(), path
    dry = snakemake("-n", "--cores", "2", *config, cwd=project)
    assert "Nothing to be done" in dry.stdout + dry.stderr


def test_snakemake_report_has_the_figures_and_tables(project: Path) -> None:
    snakemake("--report", "report.html", "--config", "params=configs/smoke.yaml", cwd=project)
    html = (project / "report.html").read_text()
    for name in ("tradeoff.png", "sampling.png", "results.csv", "spectra.png"):
        assert name in html, name


def test_snakemake_reruns_only_what_a_changed_param_touches(project: Path) -> None:
    changed = yaml.safe_load((project / "configs/smoke.yaml").read_text())
    changed["decompose"]["targets"] = ["*.attn.qkv"]
    (project / "configs/changed.yaml").write_text(yaml.safe_dump(changed))
    dry = snakemake("-n", "--cores", "2", "--config", "params=configs/changed.yaml", cwd=project)
    jobs = dry.stdout + dry.stderr
    assert re.search(r"rule decompose:", jobs) and not re.search(r"rule pretrain:", jobs)


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_dry_runs_with_snakemake(project: Path, profile: str) -> None:
    result = snakemake("-n", "--forceall", "--cores", "2", "--config", f"params=configs/{profile}", cwd=project)
    assert "rule pretrain:" in result.stdout + result.stderr


def test_snakemake_with_bad_params_stops_with_one_line(project: Path) -> None:
    (project / "configs/bad.yaml").write_text(
        (project / "configs/smoke.yaml").read_text().replace("seed: 0", "seed: zero")
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--config", "params=configs/bad.yaml"],
        cwd=project,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode != 0
    assert "error: configs/bad.yaml: seed: input should be a valid integer" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory) -> Path:
    project = copy_project(tmp_path_factory.mktemp("dvc_project"))
    shutil.copy(project / "configs/smoke.yaml", project / "params.yaml")
    run(["git", "init", "-q"], project)
    dvc("init", "-q", cwd=project)
    dvc("config", "core.analytics", "false", cwd=project)
    return project


def test_smoke_profile_through_dvc_repro(dvc_project: Path) -> None:
    dvc("repro", cwd=dvc_project)
    assert (dvc_project / "results/decompose/model.safetensors").is_file()
    assert (dvc_project / "results/retrain/flora/0.5/metrics.json").is_file()
    assert (dvc_project / "results/retrain/uniform/0.8/metrics.json").is_file()
    assert "up to date" in dvc("status", cwd=dvc_project).stdout
    again = dvc("repro", cwd=dvc_project)
    assert "didn't change, skipping" in again.stdout
    shown = dvc("plots", "show", "-o", "plots", cwd=dvc_project)
    page = (dvc_project / "plots/index.html").read_text()
    assert "index.html" in shown.stdout and "tradeoff.png" in page and "supernet_val_top1" in page


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_dry_runs_with_dvc(dvc_project: Path, profile: str, tmp_path: Path) -> None:
    project = copy_project(tmp_path)
    shutil.copy(project / "configs" / profile, project / "params.yaml")
    shutil.copytree(dvc_project / ".dvc", project / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
    run(["git", "init", "-q"], project)
    result = dvc("repro", "--dry", "--force", cwd=project)
    assert "python -m flora_steps.pretrain --params params.yaml" in result.stdout
