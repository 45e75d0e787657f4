# FLORA pipeline, Snakemake wiring. Every rule runs one stage command of the
# flora_steps package; dvc.yaml wires the very same commands for `dvc repro`.
#
#   snakemake --cores 8                                   # params.yaml (embedded default)
#   snakemake --cores 8 --config params=configs/smoke.yaml   # another params profile
#   snakemake --cores 8 --use-conda                       # per-rule conda env (environment.yml)
#   snakemake --profile cluster/slurm                     # on a Slurm cluster
#
# What each rule writes, reads, tracks and runs comes from flora_steps/layout.py
# (the one description of the pipeline): outputs by name, inputs as the outputs of
# the rules that make them, the params keys the stage reads (changing one reruns
# it), and its code: every package module the stage imports, so editing a module
# reruns exactly the stages that use it. This file adds what only Snakemake needs:
# threads, resources, conda, report flags.

import shlex
import sys
from pathlib import Path

from flora_steps.errors import UserError
from flora_steps.layout import STAGES, budget_name, code_files, param_value, tracked_params
from flora_steps.params import load_params

PARAMS_FILE = config.get("params", "params.yaml")
try:
    PARAMS = load_params(PARAMS_FILE).model_dump(mode="json")
except UserError as error:  # every problem of the params file, one line each
    sys.exit("\n".join(f"error: {line}" for line in getattr(error, "problems", [str(error)])))


BUDGETS = {name: [budget_name(b) for b in values] for name, values in PARAMS["budgets"].items() if isinstance(values, list)}
# a stage job takes the CPU threads it uses: compute.threads, or every core it is given (0: PyTorch's default)
THREADS = PARAMS["compute"]["threads"] or 8
# a stage that runs on compute.device takes one GPU unless that is the CPU: `--resources gpu=1` runs one at a time
GPU = 0 if PARAMS["compute"]["device"] == "cpu" else 1
# a distributed stage (filter, supernet, slim, ofb, search, retrain) starts compute.processes processes under
# torchrun itself, one per GPU
PROCESSES = PARAMS["compute"]["processes"]
# on a cluster, a GPU job gets this many CPUs per GPU for its loader workers (Slurm's cpus_per_task);
# compute.workers: null turns them into workers. Change with --config cpus_per_gpu=16
CPUS_PER_GPU = int(config.get("cpus_per_gpu", 8))


wildcard_constraints:
    budget=r"\d*\.\d+",


def outputs(stage):
    """The stage's output files by name; those flagged in the layout also go into `snakemake --report`."""
    files = {}
    for key, output in STAGES[stage].outputs.items():
        path = str(STAGES[stage].path(key))
        files[key] = report(path, category=output.category, caption=output.caption) if output.category else path
    return files


def inputs(stage):
    """The stage's code files and its inputs as the outputs of the rules that make them.

    A rule that runs once and reads a per-budget rule's output gets that output for every budget, unless
    the input names the one budget it reads (a params key, e.g. budgets.ofb_base).
    """
    files = {"code": [str(path) for path in code_files(STAGES[stage].module)]}
    for key, reference in STAGES[stage].inputs.items():
        made = getattr(getattr(rules, reference.stage).output, reference.output)
        producer = STAGES[reference.stage]
        if producer.foreach and reference.budget:  # one run of a per-budget rule, named by a params key
            made = expand(made, budget=budget_name(param_value(PARAMS, reference.budget)))
        elif producer.foreach and not STAGES[stage].foreach:
            made = expand(made, budget=BUDGETS[producer.foreach.split(".")[1]])
        files[key] = made
    for key in STAGES[stage].file_params:  # e.g. model.checkpoint: a local weights file, once it is there
        value = param_value(PARAMS, key)  # (a missing one is the stage's error, and must not stop dry runs)
        if value is not None and Path(value).is_file():
            files[key.replace(".", "_")] = value
    return files


def log_file(stage):
    return str(STAGES[stage].path("log"))


def benchmark_file(stage):
    return str(STAGES[stage].path("benchmark"))


def options(stage):
    """The stage's command-line options after ``--params``, for a job's wildcards (its budget).

    A function given to ``params:``: a rule made in a loop formats ``shell:`` only when a job runs, so
    the shell string must not depend on the loop's ``stage``.
    """
    return lambda wildcards: shlex.join(STAGES[stage].arguments(getattr(wildcards, "budget", "")))


def every_run(stage, output):
    """One output of a stage for each of its runs (every budget of a per-budget stage)."""
    made = getattr(getattr(rules, stage).output, output)
    return expand(made, budget=BUDGETS[STAGES[stage].foreach.split(".")[1]]) if STAGES[stage].foreach else made


#: Memory and time of each stage command on a small machine (cluster/slurm/config.yaml sets them per rule)
RESOURCES = {
    "pretrain": {"mem_mb": 4000, "runtime": 60},
    "decompose": {"mem_mb": 4000, "runtime": 30},
    "filter": {"mem_mb": 8000, "runtime": 120},
    "supernet": {"mem_mb": 8000, "runtime": 720},
    "slim": {"mem_mb": 8000, "runtime": 720},
    "slim_base": {"mem_mb": 4000, "runtime": 30},
    "ofb": {"mem_mb": 8000, "runtime": 720},
    "search": {"mem_mb": 8000, "runtime": 240},
    "retrain": {"mem_mb": 8000, "runtime": 720},
    "latency": {"mem_mb": 8000, "runtime": 60},
    "report": {"mem_mb": 2000, "runtime": 10},
}
#: stage commands that never use compute.device
CPU_ONLY = ("decompose", "report")


def gpus(stage):
    """GPUs a job takes: none for CPU-only commands, compute.processes for a distributed stage, else one."""
    if STAGES[stage].module in CPU_ONLY:
        return 0
    return GPU * (PROCESSES if STAGES[stage].distributed else 1)


def priority(stage):
    """The uniform-rank baselines wait when jobs compete: every other stage lies on a longer path (FLORA's,
    and ViT-Slim's with FLORA on its model)."""
    return 0 if STAGES[stage].method in ("control", "uniform") else 1


# One rule per stage of the layout (FLORA's stages once per base model: the dense one, ViT-Slim's and OFB's)
for stage in STAGES:

    rule:
        name:
            stage
        input:
            **inputs(stage),
        output:
            **outputs(stage),
        log:
            log_file(stage),
        benchmark:
            benchmark_file(stage)
        params:
            tracked=tracked_params(stage, PARAMS),
            module=STAGES[stage].module,
            options=options(stage),
        priority: priority(stage)
        threads: 1 if STAGES[stage].module == "report" else THREADS
        resources:
            **({} if gpus(stage) == 0 else {"gpu": gpus(stage), "cpus_per_task": CPUS_PER_GPU * gpus(stage)}),
            **RESOURCES[STAGES[stage].module],
        conda:
            "environment.yml"
        shell:
            "python -m flora_steps.{params.module} --params {PARAMS_FILE:q} {params.options}"


rule all:
    default_target: True
    input:
        [every_run(stage, "metrics") for stage in STAGES if "metrics" in STAGES[stage].outputs],
        rules.report.output.summary,
