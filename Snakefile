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


BUDGETS = {name: [budget_name(b) for b in values] for name, values in PARAMS["budgets"].items()}
# a stage job takes the CPU threads it uses: compute.threads, or every core it is given (0: PyTorch's default)
THREADS = PARAMS["compute"]["threads"] or 8
# a stage that runs on compute.device takes one GPU unless that is the CPU: `--resources gpu=1` runs one at a time
GPU = 0 if PARAMS["compute"]["device"] == "cpu" else 1
# a distributed stage (filter, supernet, slim, search, retrain) starts compute.processes processes under
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

    A rule that runs once and reads a per-budget rule's output gets that output for every budget.
    """
    files = {"code": [str(path) for path in code_files(STAGES[stage].module)]}
    for key, reference in STAGES[stage].inputs.items():
        made = getattr(getattr(rules, reference.stage).output, reference.output)
        producer = STAGES[reference.stage]
        if producer.foreach and not STAGES[stage].foreach:
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


def command(stage):
    """The stage's shell command; the params path is quoted for the shell."""
    options = " ".join(STAGES[stage].arguments("{wildcards.budget}"))
    return f"python -m flora_steps.{STAGES[stage].module} --params {{PARAMS_FILE:q}} {options}".rstrip()


def every_run(stage, output):
    """One output of a stage for each of its runs (every budget of a per-budget stage)."""
    made = getattr(getattr(rules, stage).output, output)
    return expand(made, budget=BUDGETS[STAGES[stage].foreach.split(".")[1]]) if STAGES[stage].foreach else made


rule pretrain:
    input:
        **inputs("pretrain"),
    output:
        **outputs("pretrain"),
    log:
        log_file("pretrain"),
    benchmark:
        benchmark_file("pretrain")
    params:
        tracked=tracked_params("pretrain", PARAMS),
    threads: THREADS
    resources:
        gpu=GPU,
        cpus_per_task=CPUS_PER_GPU * max(GPU, 1),
        mem_mb=4000,
        runtime=60,
    conda:
        "environment.yml"
    shell:
        command("pretrain")


rule decompose:
    input:
        **inputs("decompose"),
    output:
        **outputs("decompose"),
    log:
        log_file("decompose"),
    benchmark:
        benchmark_file("decompose")
    params:
        tracked=tracked_params("decompose", PARAMS),
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "environment.yml"
    shell:
        command("decompose")


rule filter:
    input:
        **inputs("filter"),
    output:
        **outputs("filter"),
    log:
        log_file("filter"),
    benchmark:
        benchmark_file("filter")
    params:
        tracked=tracked_params("filter", PARAMS),
    priority: 1  # on the longest path of the pipeline: before the baselines when both are ready
    threads: THREADS
    resources:
        gpu=GPU * PROCESSES,
        cpus_per_task=CPUS_PER_GPU * max(GPU * PROCESSES, 1),
        mem_mb=8000,
        runtime=120,
    conda:
        "environment.yml"
    shell:
        command("filter")


rule supernet:
    input:
        **inputs("supernet"),
    output:
        **outputs("supernet"),
    log:
        log_file("supernet"),
    benchmark:
        benchmark_file("supernet")
    params:
        tracked=tracked_params("supernet", PARAMS),
    priority: 1  # on the longest path of the pipeline: before the baselines when both are ready
    threads: THREADS
    resources:
        gpu=GPU * PROCESSES,
        cpus_per_task=CPUS_PER_GPU * max(GPU * PROCESSES, 1),
        mem_mb=8000,
        runtime=720,
    conda:
        "environment.yml"
    shell:
        command("supernet")


rule slim:
    input:
        **inputs("slim"),
    output:
        **outputs("slim"),
    log:
        log_file("slim"),
    benchmark:
        benchmark_file("slim")
    params:
        tracked=tracked_params("slim", PARAMS),
    threads: THREADS
    resources:
        gpu=GPU * PROCESSES,
        cpus_per_task=CPUS_PER_GPU * max(GPU * PROCESSES, 1),
        mem_mb=8000,
        runtime=720,
    conda:
        "environment.yml"
    shell:
        command("slim")


rule search:
    input:
        **inputs("search"),
    output:
        **outputs("search"),
    log:
        log_file("search"),
    benchmark:
        benchmark_file("search")
    params:
        tracked=tracked_params("search", PARAMS),
    priority: 1  # on the longest path of the pipeline: before the baselines when both are ready
    threads: THREADS
    resources:
        gpu=GPU * PROCESSES,
        cpus_per_task=CPUS_PER_GPU * max(GPU * PROCESSES, 1),
        mem_mb=8000,
        runtime=240,
    conda:
        "environment.yml"
    shell:
        command("search")


rule retrain_flora:
    input:
        **inputs("retrain_flora"),
    output:
        **outputs("retrain_flora"),
    log:
        log_file("retrain_flora"),
    benchmark:
        benchmark_file("retrain_flora")
    params:
        tracked=tracked_params("retrain_flora", PARAMS),
    priority: 1  # on the longest path of the pipeline: before the baselines when both are ready
    threads: THREADS
    resources:
        gpu=GPU * PROCESSES,
        cpus_per_task=CPUS_PER_GPU * max(GPU * PROCESSES, 1),
        mem_mb=8000,
        runtime=720,
    conda:
        "environment.yml"
    shell:
        command("retrain_flora")


rule retrain_control:
    input:
        **inputs("retrain_control"),
    output:
        **outputs("retrain_control"),
    log:
        log_file("retrain_control"),
    benchmark:
        benchmark_file("retrain_control")
    params:
        tracked=tracked_params("retrain_control", PARAMS),
    threads: THREADS
    resources:
        gpu=GPU * PROCESSES,
        cpus_per_task=CPUS_PER_GPU * max(GPU * PROCESSES, 1),
        mem_mb=8000,
        runtime=720,
    conda:
        "environment.yml"
    shell:
        command("retrain_control")


rule retrain_slim:
    input:
        **inputs("retrain_slim"),
    output:
        **outputs("retrain_slim"),
    log:
        log_file("retrain_slim"),
    benchmark:
        benchmark_file("retrain_slim")
    params:
        tracked=tracked_params("retrain_slim", PARAMS),
    threads: THREADS
    resources:
        gpu=GPU * PROCESSES,
        cpus_per_task=CPUS_PER_GPU * max(GPU * PROCESSES, 1),
        mem_mb=8000,
        runtime=720,
    conda:
        "environment.yml"
    shell:
        command("retrain_slim")


rule retrain_uniform:
    input:
        **inputs("retrain_uniform"),
    output:
        **outputs("retrain_uniform"),
    log:
        log_file("retrain_uniform"),
    benchmark:
        benchmark_file("retrain_uniform")
    params:
        tracked=tracked_params("retrain_uniform", PARAMS),
    threads: THREADS
    resources:
        gpu=GPU * PROCESSES,
        cpus_per_task=CPUS_PER_GPU * max(GPU * PROCESSES, 1),
        mem_mb=8000,
        runtime=720,
    conda:
        "environment.yml"
    shell:
        command("retrain_uniform")


rule latency:
    input:
        **inputs("latency"),
    output:
        **outputs("latency"),
    log:
        log_file("latency"),
    benchmark:
        benchmark_file("latency")
    params:
        tracked=tracked_params("latency", PARAMS),
    threads: THREADS
    resources:
        gpu=GPU,
        cpus_per_task=CPUS_PER_GPU * max(GPU, 1),
        mem_mb=8000,
        runtime=60,
    conda:
        "environment.yml"
    shell:
        command("latency")


rule report:
    input:
        **inputs("report"),
    output:
        **outputs("report"),
    log:
        log_file("report"),
    benchmark:
        benchmark_file("report")
    params:
        tracked=tracked_params("report", PARAMS),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "environment.yml"
    shell:
        command("report")


rule all:
    default_target: True
    input:
        [every_run(stage, "metrics") for stage in STAGES if "metrics" in STAGES[stage].outputs],
        rules.report.output.summary,
