"""What the workflow tests share: running Snakemake and DVC, the jobs a dry run plans, editing modules."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, run_command

from flora_steps.params import load_params
from flora_steps.pipeline import dvc_yaml
from flora_steps.pipeline.catalogue import ABLATION_STAGES, STAGES, idle_stages
from flora_steps.pipeline.code import code_files

#: Every params profile of configs/.
PROFILES = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))


def use_profile(project: Path, profile: str) -> None:
    """Make ``configs/<profile>`` the project's ``params.yaml`` and regenerate its ``dvc.yaml``, as ``flora
    dvc-yaml`` does (its runs, and no stage for a method whose budgets list is empty)."""
    shutil.copy(project / "configs" / profile, project / "params.yaml")
    params = load_params(project / "params.yaml")
    dvc_yaml.write(project / "dvc.yaml", params.runs, idle_stages(params.model_dump(mode="json")["budgets"]))


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = run_command(command, cwd=cwd, env=env)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def snakemake(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "snakemake", *args], cwd)


def snakemake_here(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``snakemake <args>`` in ``cwd`` by Snakemake's own ``main`` in this process, for dry runs and summaries: a
    fraction of a second here, seconds as a command (its start-up). Real runs go through ``snakemake``."""
    from snakemake.cli import main

    stdout, stderr, code = io.StringIO(), io.StringIO(), None
    with contextlib.chdir(cwd), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            main(list(args))
        except SystemExit as exit_:
            code = exit_.code
    result = subprocess.CompletedProcess(["snakemake", *args], code, stdout.getvalue(), stderr.getvalue())
    assert code == 0, f"snakemake {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], cwd)


#: The stages only the ablations target runs (``snakemake ablations``, ``dvc repro ablations``).
ABLATIONS_ONLY = {stage.name for stage in ABLATION_STAGES}


def in_default(stages: set[str]) -> set[str]:
    """The stages of ``stages`` that the default target runs."""
    return stages - ABLATIONS_ONLY


#: What the DVC projects of the tests reproduce: Snakemake's default target (plain ``dvc repro`` adds the ablations).
DEFAULT_TARGETS = ("report", "latency")


def dvc_status(project: Path) -> set[str]:
    """The stages of the default target that ``dvc status`` finds changed (the ablations never ran in the tests'
    DVC projects), without their ``@budget``, by DVC's Python API in this process: the same answer without a
    ``dvc`` command's start-up on every call."""
    from dvc.repo import Repo

    with contextlib.chdir(project), Repo() as repo:
        return in_default({name.split("@")[0] for name in repo.status()})


def dvc_stages(project: Path) -> dict[str, list[str]]:
    """Every stage of ``project``'s dvc.yaml as ``dvc stage list --all`` names it, with its outputs."""
    from dvc.repo import Repo

    with contextlib.chdir(project), Repo() as repo:
        return {stage.addressing: [out.def_path for out in stage.outs] for stage in repo.index.stages}


def dvc_dry_run(project: Path, *targets: str) -> list[str]:
    """The commands ``dvc repro --dry --force [targets]`` would run in ``project``, in order."""
    from dvc.repo import Repo

    with contextlib.chdir(project), Repo() as repo:
        return [stage.cmd for stage in repo.reproduce(list(targets) or None, dry=True, force=True)]


def planned_jobs(output: str) -> set[str]:
    """The rules a Snakemake dry run would run, from its job-stats table (without ``all``)."""
    table = output.split("Job stats:")[1].split("total")[0] if "Job stats:" in output else ""
    rows = [line.split()[0] for line in table.splitlines() if line.strip() and not line.startswith(("job ", "-"))]
    return set(rows) - {"all"}


def downstream(stages: set[str]) -> set[str]:
    """``stages`` and every stage that reads their outputs, directly or not."""
    found = set(stages)
    while True:
        more = {s.name for s in STAGES.values() if any(r.stage in found for r in s.inputs.values())} - found
        if not more:
            return found
        found |= more


def edit_each_module(project: Path, check, only: tuple[str, ...] | None = None) -> dict[str, tuple[set[str], set[str]]]:
    """Append a comment to a package module, call ``check(module)``, then restore it exactly; for one module of
    each set of stages that import the same modules (every module of such a set reruns the same stages; the
    edit tests also check that every module is a code input of exactly the stages that import it), or for the
    modules ``only`` names.

    Returns the modules where ``check`` returned (found, expected) that differ.
    """
    wrong, seen = {}, set()
    for path in sorted((project / "flora_steps").rglob("*.py")):
        module = str(path.relative_to(project))
        if frozenset(importers(module)) in seen or (only is not None and module not in only):
            continue
        seen.add(frozenset(importers(module)))
        text, times = path.read_bytes(), os.stat(path)
        path.write_bytes(text + b"\n# edited\n")
        try:
            found, expected = check(module)
        finally:
            path.write_bytes(text)
            os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
        if found != expected:
            wrong[module] = (found, expected)
    return wrong


def importers(module: str) -> set[str]:
    """The stages whose code includes ``module``."""
    return {stage.name for stage in STAGES.values() if Path(module) in code_files(stage.module)}
