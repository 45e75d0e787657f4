# FLORA pipeline, Snakemake wiring. Every rule runs one stage command of the
# flora_steps package; dvc.yaml wires the very same commands for `dvc repro`.
#
#   snakemake --cores 8                                   # params.yaml (embedded default)
#   snakemake --cores 8 --config params=configs/smoke.yaml   # another params profile
#   snakemake --cores 8 --use-conda                       # per-rule conda env (environment.yml)
#   snakemake --profile cluster/slurm                     # on a Slurm cluster
#
# What each rule writes, reads, tracks and runs comes from flora_steps/pipeline/catalogue.py
# (the one description of the pipeline): outputs by name, inputs as the outputs of
# the rules that make them, the params keys the stage reads (changing one reruns
# it), and its code: every package module the stage imports, so editing a module
# reruns exactly the stages that use it; also each stage's resources. This file only
# spells them in Snakemake's syntax.

import shlex
import sys
from pathlib import Path

from flora_steps.errors import UserError
from flora_steps.params import load_params
from flora_steps.pipeline.catalogue import STAGES, param_value, priority, tracked_params
from flora_steps.pipeline.code import STAGES_PACKAGE, code_files
from flora_steps.pipeline.schema import Case, budget_values, resolve, results_root

PARAMS_FILE = config.get("params", "params.yaml")
try:
    PARAMS = load_params(PARAMS_FILE).model_dump(mode="json")
except UserError as error:  # every problem of the params file, one line each
    sys.exit("\n".join(f"error: {line}" for line in getattr(error, "problems", [str(error)])))

# params.yaml writes under results/, another profile under results/<its stem>/ (configs/hybrid.yaml: results/hybrid/)
ROOT = results_root(PARAMS_FILE)
# a stage job takes the CPU threads it uses: compute.threads, or every core it is given (0: PyTorch's default)
THREADS = PARAMS["compute"]["threads"] or 8
# a stage that runs on compute.device takes one GPU unless that is the CPU: `--resources gpu=1` runs one at a time
GPU = 0 if PARAMS["compute"]["device"] == "cpu" else 1
# a distributed stage starts compute.processes processes under torchrun itself, one per GPU
PROCESSES = PARAMS["compute"]["processes"]
# on a cluster, a GPU job gets this many CPUs per GPU for its loader workers (Slurm's cpus_per_task);
# compute.workers: null turns them into workers. Change with --config cpus_per_gpu=16
CPUS_PER_GPU = int(config.get("cpus_per_gpu", 8))


wildcard_constraints:
    budget=r"\d*\.\d+",


def outputs(stage):
    """The stage's output files by name; those flagged in the catalogue also go into `snakemake --report`."""
    files = {}
    for key, output in STAGES[stage].outputs.items():
        path = str(STAGES[stage].path(key, root=ROOT))
        files[key] = report(path, category=output.category, caption=output.caption) if output.category else path
    return files


def inputs(stage):
    """The stage's code files and its inputs as the outputs of the rules that make them, case by case
    (`resolve`): a run of a per-budget rule at the same budget is the rule's own pattern; every run, or the
    one at a params key, is expanded over those budgets."""
    files = {"code": [str(path) for path in code_files(STAGES[stage].module)]}
    for key, reference in STAGES[stage].inputs.items():
        found = resolve(STAGES[stage], reference, STAGES)
        made = getattr(getattr(rules, found.producer.name).output, found.output)
        if found.case in (Case.PINNED, Case.EVERY):
            made = expand(made, budget=budget_values(PARAMS["budgets"], found.budgets))
        files[key] = made
    for key in STAGES[stage].file_params:  # e.g. model.checkpoint: a local weights file, once it is there
        value = param_value(PARAMS, key)  # (a missing one is the stage's error, and must not stop dry runs)
        if value is not None and Path(value).is_file():
            files[key.replace(".", "_")] = value
    return files


def options(stage):
    """The stage's command-line options after ``--params``, for a job's wildcards (its budget).

    A function given to ``params:``: a rule made in a loop formats ``shell:`` only when a job runs, so
    the shell string must not depend on the loop's ``stage``.
    """
    return lambda wildcards: shlex.join(STAGES[stage].arguments(getattr(wildcards, "budget", "")))


def every_run(stage, output):
    """One output of a stage for each of its runs (every budget of a per-budget stage)."""
    made = getattr(getattr(rules, stage).output, output)
    foreach = STAGES[stage].foreach
    return expand(made, budget=budget_values(PARAMS["budgets"], foreach)) if foreach else made


def resources(stage):
    """Memory and time from the catalogue; GPUs: none for a stage that never uses compute.device,
    compute.processes for a distributed stage, else one."""
    needs = STAGES[stage].resources
    gpus = 0 if not needs.device else GPU * (PROCESSES if STAGES[stage].distributed else 1)
    devices = {"gpu": gpus, "cpus_per_task": CPUS_PER_GPU * gpus} if gpus else {}
    return {**devices, "mem_mb": needs.mem_mb, "runtime": needs.runtime}


# One rule per stage of the catalogue (FLORA's stages once per base model: the dense one, ViT-Slim's and OFB's)
for stage in STAGES:

    rule:
        name:
            stage
        input:
            **inputs(stage),
        output:
            **outputs(stage),
        log:
            str(STAGES[stage].path("log", root=ROOT)),
        benchmark:
            str(STAGES[stage].path("benchmark", root=ROOT))
        params:
            tracked=tracked_params(stage, PARAMS),
            module=STAGES[stage].module,
            options=options(stage),
        priority: priority(stage)
        threads: STAGES[stage].resources.threads or THREADS
        resources:
            **resources(stage),
        conda:
            "environment.yml"
        shell:
            "python -m {STAGES_PACKAGE}.{params.module} --params {PARAMS_FILE:q} {params.options}"


rule all:
    default_target: True
    input:
        [every_run(stage, "metrics") for stage in STAGES if "metrics" in STAGES[stage].outputs],
        rules.report.output.summary,
