"""The pipeline layout: dvc.yaml generated from it, code dependencies, tracked params, pinned environments."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, SMOKE, run_command, run_recorded, write_params

from flora_steps.params import load_params
from flora_steps.pipeline import schema
from flora_steps.pipeline.catalogue import STAGES, UNTRACKED, chain, idle_stages, param_value, priority
from flora_steps.pipeline.code import code_files
from flora_steps.pipeline.dvc_yaml import render


def test_committed_dvc_yaml_is_the_generated_one() -> None:
    default = load_params(ROOT / "params.yaml").model_dump(mode="json")
    generated = render(default["runs"], idle_stages(default["budgets"]))
    assert (ROOT / "dvc.yaml").read_text() == generated, "dvc.yaml is stale: run `flora dvc-yaml`"


def test_every_output_of_every_stage_lies_in_its_own_folder() -> None:
    folders = [stage.folder for stage in STAGES.values()]
    assert len(set(folders)) == len(folders)
    for stage in STAGES.values():
        for key in (*stage.outputs, "log", "benchmark"):
            assert stage.path(key, "0.5").parent == stage.directory("0.5")
        for reference in stage.inputs.values():
            assert reference.output in STAGES[reference.stage].outputs, (stage.name, reference)


def test_stages_that_time_models_start_first_then_the_longest_chains() -> None:
    alone = {name for name, stage in STAGES.items() if stage.resources.alone}
    assert {"latency_table", "latency_table_ofb", "latency"} <= alone
    assert min(priority(name) for name in alone) > max(priority(name) for name in STAGES if name not in alone)
    assert chain("report") == 1 and chain("latency") == 2 and chain("pretrain") > chain("filter") > chain("supernet")
    assert priority("filter") > priority("supernet") > priority("search")


def test_tracked_params_are_keys_of_the_params_schema() -> None:
    params = load_params(ROOT / "params.yaml").model_dump(mode="json")
    for stage in STAGES.values():
        for key in (*stage.params, *stage.file_params):
            param_value(params, key)  # raises KeyError for a key that is not in params.yaml
    for key in UNTRACKED:
        param_value(params, key)


#: Run in one interpreter: import the heavy libraries once, then import each stage module in a
#: forked child, which reports the package source files that the import ran.
IMPORTS_PER_STAGE = """
import os, sys
import matplotlib.figure, pandas, pydantic, safetensors.torch, timm, torch, torchvision, tqdm, yaml
assert not any(name.startswith("flora_steps") for name in sys.modules)
for module in sys.argv[1:]:
    reader, writer = os.pipe()
    if os.fork() == 0:
        __import__(f"flora_steps.stages.{module}")
        files = [m.__file__ for m in list(sys.modules.values()) if "/flora_steps/" in (getattr(m, "__file__", None) or "")]
        os.write(writer, " ".join(files).encode())
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        print(module, pipe.read())
    os.wait()
"""


@pytest.fixture(scope="module")
def stage_imports() -> dict[str, set[str]]:
    """Package source files that importing ``flora_steps.<module>`` really runs, relative to the repository."""
    modules = sorted({stage.module for stage in STAGES.values()})
    result = run_command(
        [sys.executable, "-c", IMPORTS_PER_STAGE, *modules],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": "."},
    )
    assert result.returncode == 0, result.stderr
    found = {}
    for line in result.stdout.splitlines():
        module, *files = line.split()
        found[module] = {str(Path(file).resolve().relative_to(ROOT)) for file in files}
    return found


@pytest.mark.parametrize("module", sorted({stage.module for stage in STAGES.values()}))
def test_code_dependencies_are_exactly_what_the_stage_imports(module: str, stage_imports) -> None:
    assert {str(path) for path in code_files(module)} == stage_imports[module]


def test_only_the_reports_depend_on_the_comparison_maths() -> None:
    """Editing how the reports compare methods reruns the reports, never a stage that trains or searches."""
    maths = {f"flora_steps/report/{name}.py" for name in ("tradeoff", "stats", "tables", "figures", "ablations")}
    for stage in STAGES.values():
        if stage.module not in ("report", "ablations"):
            assert not maths & {str(path) for path in code_files(stage.module)}, stage.name


#: Keys a stage tracks but does not read on the digits smoke profile: they matter for real data only.
REAL_DATA_ONLY = {"data.root", "data.train_transform", "data.crop_pct", "data.skip_unreadable"}


def test_each_stage_reads_only_keys_it_tracks_or_that_do_not_change_results(
    smoke_pipeline: Path, params_reads: dict[str, set[str]], tmp_path: Path, monkeypatch
) -> None:
    """What every stage read in the session's smoke runs (params that record every key read), and the report."""
    (tmp_path / "results").mkdir()
    for folder in (smoke_pipeline / "results").iterdir():
        (tmp_path / "results" / folder.name).symlink_to(folder)
    monkeypatch.chdir(tmp_path)
    params_file = write_params(tmp_path / "params.yaml", yaml.safe_load(SMOKE.read_text()))
    run_recorded(STAGES["report"], [], params_file, params_reads)
    assert set(params_reads) == set(STAGES)
    for name, seen in params_reads.items():
        tracked = set(STAGES[name].params)
        allowed = set(UNTRACKED) | set(STAGES[name].overrides)  # an ablation's overrides: the same whatever the file
        assert seen - tracked <= allowed, (name, sorted(seen - tracked - allowed))
        assert tracked - seen <= REAL_DATA_ONLY, (name, sorted(tracked - seen))


def test_budgets_must_be_written_as_floats(tmp_path: Path) -> None:
    params = yaml.safe_load(SMOKE.read_text())
    params["budgets"]["uniform"] = [0.5, 0.8, 1]
    with pytest.raises(Exception, match=r"budgets.uniform.2: write 1 as 1.0"):
        load_params(write_params(tmp_path / "p.yaml", params))


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


def test_slurm_profile_sets_resources_and_threads_for_every_stage() -> None:
    profile = yaml.safe_load((ROOT / "cluster/slurm/config.yaml").read_text())
    assert set(profile["set-resources"]) == set(STAGES) == set(profile["set-threads"])


def test_layout_module_does_not_import_torch() -> None:
    """The Snakefile reads the layout; it must stay quick to import."""
    result = subprocess.run(
        [sys.executable, "-c", "import sys, flora_steps.pipeline.catalogue; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.stdout.strip() == "False", result.stderr
    assert schema.RESULTS == Path("results")


#: What each layer of the package may import (besides itself): arrows only point down, so there is no cycle.
LAYERS = {
    "errors": set(),
    "pipeline": set(),
    "params": {"errors", "pipeline"},
    "core": set(),
    "pruning": {"core"},
    "report": {"core", "pipeline"},
    "runtime": {"core", "pruning", "report", "pipeline", "params", "errors"},
    "stages": {"runtime", "report", "pruning", "core", "pipeline", "params", "errors"},
    "tools": {"runtime", "core", "errors"},
    "cli": {"stages", "tools", "runtime", "pipeline", "params", "errors"},
}


def test_the_package_layers_import_only_downwards() -> None:
    from flora_steps.pipeline.code import PACKAGE, _imports

    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        layer = relative.parts[0].removesuffix(".py")
        if layer == "__init__":
            continue
        for module in _imports(path):
            parts = module.split(".")
            if parts[0] != PACKAGE.name or len(parts) == 1 or parts[1] in ("__version__",):
                continue
            target = parts[1]
            if target != layer and target not in LAYERS[layer]:
                wrong.append(f"{relative} imports {module}")
    assert wrong == []


def test_dvc_yaml_for_several_runs_has_one_stage_per_run_of_each_replicated_stage() -> None:
    stages = yaml.safe_load(render(2))["stages"]
    replicated = [name for name, stage in STAGES.items() if stage.replicated]
    assert set(stages) == {f"{name}_run{run}" for name in replicated for run in (0, 1)} | {
        "pretrain",
        "latency_table",
        "latency_table_ofb",
        "latency_table_on_slim",
        "latency_table_on_ofb",
        "latency",
        "report",
        "ablations",
    }
    assert stages["search_run1"]["do"]["cmd"].endswith("--budget ${item} --run 1")
    assert "results/runs/1/supernet/model.safetensors" in stages["search_run1"]["do"]["deps"]
    assert "results/pretrain/model.safetensors" in stages["search_run1"]["do"]["deps"]  # the shared dense model
    report = stages["report"]["deps"]
    assert {"results/runs/0/retrain/flora", "results/runs/1/retrain/flora", "results/runs/0/search"} <= set(report)
    assert "results/runs/1/search" not in report  # its figures are the first run's
