"""Bad params give one clear line naming the key and what was expected; no stack trace."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_command, set_key, write_params

from flora_steps.cli import main
from flora_steps.errors import UserError
from flora_steps.params import load_params


def test_every_profile_validates() -> None:
    profiles = [ROOT / "params.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]
    assert len(profiles) >= 5
    for path in profiles:
        load_params(path)


def drop_key(params: dict, dotted: str) -> dict:
    *parents, last = dotted.split(".")
    node = params
    for key in parents:
        node = node[key]
    del node[last]
    return params


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: set_key(p, "pretrain.lrr", 0.1), "pretrain.lrr: unknown key (did you mean 'lr'?)"),
        (lambda p: set_key(p, "extra_section", {}), "extra_section: unknown key"),
        (lambda p: set_key(p, "pretrain.epochs", "many"), "pretrain.epochs: input should be a valid integer"),
        (
            lambda p: set_key(p, "pretrain.epochs", -1),
            "pretrain.epochs: input should be greater than or equal to 0, got -1",
        ),
        (lambda p: set_key(p, "pretrain.lr", 0), "pretrain.lr: input should be greater than 0, got 0"),
        (lambda p: set_key(p, "data.val_fraction", 1.5), "data.val_fraction: input should be less than 1, got 1.5"),
        (
            lambda p: set_key(p, "data.dataset", "mnist"),
            "data.dataset: input should be 'digits', 'imagenet' or 'cifar10'",
        ),
        (lambda p: set_key(p, "compute.device", "tpu"), "compute.device: input should be 'auto', 'cpu' or 'cuda'"),
        (lambda p: set_key(p, "decompose.targets", []), "decompose.targets: list should have at least 1 item"),
        (lambda p: drop_key(p, "pretrain.batch_size"), "pretrain.batch_size: missing key"),
        (lambda p: set_key(p, "data", {**p["data"], "dataset": "imagenet"}), "data: dataset imagenet needs root"),
        (
            lambda p: set_key(p, "model", {**p["model"], "checkpoint": "w.pth", "hub": True}),
            "model: give either checkpoint or hub",
        ),
        (
            lambda p: set_key(p, "budgets.search", [0.5, 1.2]),
            "budgets.search.1: input should be less than or equal to 1",
        ),
        (lambda p: set_key(p, "budgets.uniform", [0.0, 0.5]), "budgets.uniform.0: input should be greater than 0"),
        (
            lambda p: set_key(p, "budgets.uniform", [0.8]),
            "budgets: uniform must include every search budget (missing [0.5])",
        ),
        (
            lambda p: set_key(p, "budgets.slim_flora", [0.4, 0.5]),
            "budgets: slim_flora: [0.5] not below slim_base 0.5: FLORA can only make ViT-Slim's model smaller",
        ),
        (
            lambda p: set_key(p, "budgets.slim", [0.4, 0.5]),
            "budgets.slim: the lowest budget (0.4) must lie at or below the lowest budgets.slim_flora minus "
            "search.band (0.38)",
        ),
        (lambda p: set_key(p, "budgets.slim_base", 1), "budgets.slim_base: write 1 as 1.0"),
        (lambda p: set_key(p, "search.top_k", 20), "search: top_k (20) must not exceed population (10)"),
        (lambda p: set_key(p, "pretrain.epochs", True), "pretrain.epochs: a boolean is not accepted here, got True"),
        (lambda p: set_key(p, "filter.ratios", [0.5, True]), "filter.ratios: a boolean is not accepted here"),
        (lambda p: set_key(p, "seed", -1), "seed: input should be greater than or equal to 0, got -1"),
        (lambda p: set_key(p, "seed", 2**40), "seed: input should be less than 4294967296"),
        (lambda p: set_key(p, "data.split_seed", -1), "data.split_seed: input should be greater than or equal to 0"),
        (
            lambda p: set_key(p, "search.band", 0.5),
            "search.band: 0.5 must be below every budget of budgets.search, ofb, slim_flora and ofb_flora (smallest 0.35)",
        ),
        (lambda p: set_key(p, "model.num_classes", 5), "model.num_classes: 5, but data.dataset digits has 10 classes"),
        (
            lambda p: set_key(p, "pretrain", {**{k: v for k, v in p["pretrain"].items() if k != "lr"}, "lrr": 0.1}),
            "pretrain.lrr: unknown key (did you mean 'lr'?)",
        ),
    ],
)
def test_bad_params_name_the_key(tmp_path: Path, smoke_params: dict, change, message: str) -> None:
    path = write_params(tmp_path / "params.yaml", change(smoke_params))
    with pytest.raises(UserError) as error:
        load_params(path)
    text = str(error.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


def test_unreadable_params_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="params file not found"):
        load_params(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("pretrain: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_params(broken)
    broken.write_text("- a list\n")
    with pytest.raises(UserError, match="expected a mapping of sections"):
        load_params(broken)
    with pytest.raises(UserError, match="is a directory, expected a params YAML file"):
        load_params(tmp_path)
    broken.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(UserError, match="not UTF-8 text, expected a params YAML file"):
        load_params(broken)


def test_a_misspelt_key_is_reported_once_with_its_hint(tmp_path: Path, smoke_params: dict) -> None:
    smoke_params["pretrain"]["lrr"] = smoke_params["pretrain"].pop("lr")
    with pytest.raises(UserError) as error:
        load_params(write_params(tmp_path / "params.yaml", smoke_params))
    assert error.value.problems == [f"{tmp_path / 'params.yaml'}: pretrain.lrr: unknown key (did you mean 'lr'?)"]


def test_check_lists_every_problem_one_line_each_and_never_traces_back(
    workdir: Path, smoke_params: dict, capsys
) -> None:
    """In this process: ``main`` returns 2 instead of raising (test_check_command runs the real command)."""
    smoke_params["pretrain"]["lrr"] = smoke_params["pretrain"].pop("lr")
    smoke_params["seed"] = -1
    smoke_params["retrain"]["epochs"] = True
    path = write_params(workdir / "params.yaml", smoke_params)
    assert main(["check", "--params", str(path)]) == 2
    assert sorted(capsys.readouterr().err.splitlines()) == [
        f"flora check: error: {path}: pretrain.lrr: unknown key (did you mean 'lr'?)",
        f"flora check: error: {path}: retrain.epochs: a boolean is not accepted here, got True",
        f"flora check: error: {path}: seed: input should be greater than or equal to 0, got -1",
    ]
    for bad in (workdir, workdir / "binary.yaml"):
        if bad.name == "binary.yaml":
            bad.write_bytes(bytes(range(256)))
        assert main(["check", "--params", str(bad)]) == 2
        assert len(capsys.readouterr().err.splitlines()) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"embed_dim": 63}, "dim should be divisible by num_heads"),
        ({"no_such_argument": 1}, "unexpected keyword argument 'no_such_argument'"),
    ],
)
def test_check_builds_the_model_to_try_its_kwargs(workdir: Path, smoke_params: dict, capsys, kwargs, message) -> None:
    path = write_params(workdir / "params.yaml", set_key(smoke_params, "model.kwargs", kwargs))
    assert main(["check", "--params", str(path)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert (
        line.startswith(f"flora check: error: {path}: model.kwargs: {kwargs} not accepted by vit_digits")
        and message in line
    )


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_command(
        [sys.executable, "-m", "flora_steps.cli", *args],
        cwd=cwd,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


def test_stage_with_bad_params_prints_one_line_and_writes_nothing(tmp_path: Path, smoke_params: dict) -> None:
    path = write_params(tmp_path / "params.yaml", set_key(smoke_params, "pretrain.batch_size", 0))
    result = run_cli("pretrain", "--params", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"flora pretrain: error: {path}: pretrain.batch_size: input should be greater than or equal to 1, got 0"
    ]
    assert not (tmp_path / "results").exists()  # a rejected run writes nothing


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("model.checkpoint", "missing.pth", "model.checkpoint: file not found: missing.pth"),
        ("model.name", "vit_nonexistent", "model.name: unknown timm model 'vit_nonexistent'"),
        ("data", {"dataset": "cifar10", "root": "no/such/dir"}, "data.root: directory not found: no/such/dir"),
    ],
)
def test_missing_paths_stop_the_stage_with_one_line(
    workdir: Path, smoke_params: dict, capsys, key, value, message
) -> None:
    if isinstance(value, dict):
        value = {**smoke_params["data"], **value}
    path = write_params(workdir / "params.yaml", set_key(smoke_params, key, value))
    assert main(["pretrain", "--params", str(path)]) == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert error_lines == [f"flora pretrain: error: {message}"]
    assert not (workdir / "results" / "pretrain" / "model.safetensors").exists()


def test_check_command(tmp_path: Path) -> None:
    assert run_cli("check", "--params", str(ROOT / "configs" / "smoke.yaml"), cwd=tmp_path).returncode == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: x\n")
    result = run_cli("check", "--params", str(bad), cwd=tmp_path)
    assert result.returncode == 2 and "seed: input should be a valid integer" in result.stderr


#: Run by a fresh interpreter: ``main`` with the given arguments, then the heavy libraries it had to import.
LOADED_AFTER = """
import sys
from flora_steps.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
print(code, sorted(name for name in ("torch", "timm", "sklearn", "pandas") if name in sys.modules))
"""


@pytest.mark.parametrize("arguments", [["--help"], ["retrain", "--help"], ["check", "--params", "bad.yaml"]])
def test_help_and_a_rejected_params_file_answer_without_loading_torch(tmp_path: Path, arguments: list[str]) -> None:
    (tmp_path / "bad.yaml").write_text("seed: x\n")
    result = run_command(
        [sys.executable, "-c", LOADED_AFTER, *arguments],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    code, loaded = result.stdout.strip().splitlines()[-1].split(" ", 1)
    assert (code, loaded) == ("0" if "--help" in arguments else "2", "[]"), result.stderr


def test_params_page_documents_every_param() -> None:
    def leaves(data: dict, prefix: str = "") -> list[str]:
        keys = []
        for key, value in data.items():
            dotted = f"{prefix}{key}"
            is_section = isinstance(value, dict) and key not in ("kwargs", "train_transform")
            keys += leaves(value, f"{dotted}.") if is_section else [dotted]
        return keys

    page = (ROOT / "docs" / "params.md").read_text()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert [key for key in leaves(params) if f"`{key}`" not in page] == []


@pytest.mark.parametrize(
    ("profile", "epochs", "grid"), [("deit_b", 150, [96, 192, 288, 384, 480]), ("deit_s", 300, [64, 128, 192, 256])]
)
def test_imagenet_profiles_follow_the_papers_supernet_settings(profile: str, epochs: int, grid: list[int]) -> None:
    """SPEC §1: lr 2.5e-5 x global batch / 512, 5 warm-up epochs, cosine to 5e-7, clip 5.0, RandAugment, erasing 0.25."""
    from flora_steps.core.space import rank_grid

    params = load_params(ROOT / "configs" / f"{profile}_imagenet.yaml")
    supernet = params.supernet
    assert supernet.lr == pytest.approx(2.5e-5 * supernet.batch_size / 512)
    assert (supernet.epochs, supernet.warmup_epochs, supernet.min_lr, supernet.grad_clip) == (epochs, 5, 5e-7, 5.0)
    assert params.data.train_transform == {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25}
    assert params.compute.device == "cuda" and supernet.hard_label_weight == 0.0
    width = {"deit_b": 768, "deit_s": 384}[profile]
    assert rank_grid(width, 3 * width, params.filter.ratios)[:-1] == grid  # below break-even, then dense
