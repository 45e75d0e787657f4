# FLORA pipeline, Snakemake wiring. Every rule runs one stage command of the
# flora_steps package; dvc.yaml wires the very same commands for `dvc repro`.
#
#   snakemake --cores 8                                   # params.yaml (embedded default)
#   snakemake --cores 8 --config params=configs/smoke.yaml   # another params profile
#   snakemake --cores 8 --use-conda                       # per-rule conda env (environment.yml)
#   snakemake --profile cluster/slurm                     # on a Slurm cluster
#   snakemake --cores 8 ablations                         # the paper's ablations of FLORA (results/ablations/)
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
from flora_steps.pipeline.catalogue import ABLATION_STAGES, STAGES, idle_stages, param_value, priority, tracked_params
from flora_steps.pipeline.code import STAGES_PACKAGE, code_files
from flora_steps.pipeline.machine import host_fingerprint
from flora_steps.pipeline.schema import Case, budget_values, resolve, results_root, runs_of

PARAMS_FILE = config.get("params", "params.yaml")
try:
    PARAMS = load_params(PARAMS_FILE).model_dump(mode="json")
except UserError as error:  # every problem of the params file, one line each
    sys.exit("\n".join(f"error: {line}" for line in getattr(error, "problems", [str(error)])))

# params.yaml writes under results/, another profile under results/<its stem>/ (configs/hybrid.yaml: results/hybrid/)
ROOT = results_root(PARAMS_FILE)
# a stage job takes the CPU threads it uses: compute.threads, or every core it is given (0: PyTorch's default)
THREADS = PARAMS["compute"]["threads"] or 8
# a stage that times models claims more threads than any --cores: Snakemake lowers them to the cores given, so no
# other job runs beside it (the job itself uses compute.threads)
ALONE = 1024
# a stage that runs on compute.device takes one GPU unless that is the CPU: `--resources gpu=1` runs one at a time
GPU = 0 if PARAMS["compute"]["device"] == "cpu" else 1
# a distributed stage starts compute.processes processes under torchrun itself, one per GPU
PROCESSES = PARAMS["compute"]["processes"]
# runs: 1 runs everything once; with more, every stage after the dense model (all but pretrain, latency, report)
# is one rule per run, `<stage>_run<k>`, writing under results/.../runs/<k>/; the report reads every run
RUNS = PARAMS["runs"]
RUN_NUMBERS = [None] if RUNS == 1 else list(range(RUNS))
# on a cluster, a GPU job gets this many CPUs per GPU for its loader workers (Slurm's cpus_per_task);
# compute.workers: null turns them into workers. Change with --config cpus_per_gpu=16
CPUS_PER_GPU = int(config.get("cpus_per_gpu", 8))
# the stages that time models (the latency table, the latency stage) rerun on a new processor, GPU or torch/timm
# version: this host's, as Snakemake tracks params (on a cluster, the submitting host's; the stages check their own)
MACHINE = host_fingerprint(PARAMS["compute"]["device"])
# the stages that do not run under these budgets (a method whose budgets list is empty, and what only it needs): no rule
IDLE = idle_stages(PARAMS["budgets"])


wildcard_constraints:
    budget=r"\d*\.\d+",


def rule_name(stage, run):
    """The rule of a stage in a run of the pipeline: the stage's name, `<stage>_run<k>` with several runs."""
    return stage if run is None or not STAGES[stage].replicated else f"{stage}_run{run}"


def runs_of_stage(stage):
    """The runs of the pipeline a stage has a rule for: each run for a replicated stage, else one."""
    return RUN_NUMBERS if STAGES[stage].replicated else [None]


def outputs(stage, run):
    """The stage's output files by name; those flagged in the catalogue also go into `snakemake --report`."""
    files = {}
    for key, output in STAGES[stage].outputs.items():
        path = str(STAGES[stage].path(key, root=ROOT, run=run))
        files[key] = report(path, category=output.category, caption=output.caption) if output.category else path
    return files


def inputs(stage, run):
    """The stage's code files and its inputs as the outputs of the rules that make them, case by case
    (`resolve`): a run of a per-budget rule at the same budget is the rule's own pattern; every run, or the
    one at a params key, is expanded over those budgets; each in the run of the pipeline the input reads
    (`runs_of`: the stage's own, every run, or the first)."""
    files = {"code": [str(path) for path in code_files(STAGES[stage].module)]}
    for key, reference in STAGES[stage].inputs.items():
        if reference.stage in IDLE:  # read only if it runs (the report's models of a method without budgets)
            continue
        found = resolve(STAGES[stage], reference, STAGES)
        files[key] = []
        for each in runs_of(STAGES[stage], reference, found.producer, run, RUNS):
            made = getattr(getattr(rules, rule_name(found.producer.name, each)).output, found.output)
            if found.case in (Case.PINNED, Case.EVERY):
                made = expand(made, budget=budget_values(PARAMS["budgets"], found.budgets))
            files[key] += [made] if isinstance(made, str) else list(made)
    for key in STAGES[stage].file_params:  # e.g. model.checkpoint: a local weights file, once it is there
        value = param_value(PARAMS, key)  # (a missing one is the stage's error, and must not stop dry runs)
        if value is not None and Path(value).is_file():
            files[key.replace(".", "_")] = value
    return files


def options(stage, run):
    """The stage's command-line options after ``--params``, for a job's wildcards (its budget) and its run.

    A function given to ``params:``: a rule made in a loop formats ``shell:`` only when a job runs, so
    the shell string must not depend on the loop's ``stage``.
    """
    number = None if run is None else str(run)
    return lambda wildcards: shlex.join(STAGES[stage].arguments(getattr(wildcards, "budget", ""), number))


def every_budget(stage, run, output):
    """One output of a stage in a run of the pipeline for each of its budgets (a per-budget stage)."""
    made = getattr(getattr(rules, rule_name(stage, run)).output, output)
    foreach = STAGES[stage].foreach
    return expand(made, budget=budget_values(PARAMS["budgets"], foreach)) if foreach else made


def resources(stage):
    """Memory and time from the catalogue; GPUs: none for a stage that never uses compute.device,
    compute.processes for a distributed stage, else one."""
    needs = STAGES[stage].resources
    gpus = 0 if not needs.device else GPU * (PROCESSES if STAGES[stage].distributed else 1)
    devices = {"gpu": gpus, "cpus_per_task": CPUS_PER_GPU * gpus} if gpus else {}
    return {**devices, "mem_mb": needs.mem_mb, "runtime": needs.runtime}


# One rule per stage of the catalogue (FLORA's stages once per base model: the dense one, ViT-Slim's and OFB's,
# and from the first one each ablation changes, once per ablation), and per run of the pipeline for a replicated
# stage. The default target is the pipeline and its report; the rule `ablations` (its table) runs the ablations.
for stage in (name for name in STAGES if name not in IDLE):
    for run in runs_of_stage(stage):

        rule:
            name:
                rule_name(stage, run)
            input:
                **inputs(stage, run),
            output:
                **outputs(stage, run),
            log:
                str(STAGES[stage].path("log", root=ROOT, run=run)),
            benchmark:
                str(STAGES[stage].path("benchmark", root=ROOT, run=run))
            params:
                tracked=tracked_params(stage, PARAMS),
                machine=MACHINE if STAGES[stage].machine else {},
                module=STAGES[stage].module,
                options=options(stage, run),
            priority: priority(stage)
            threads: ALONE if STAGES[stage].resources.alone else STAGES[stage].resources.threads or THREADS
            resources:
                **resources(stage),
            conda:
                "environment.yml"
            shell:
                "python -m {STAGES_PACKAGE}.{params.module} --params {PARAMS_FILE:q} {params.options}"


ABLATIONS_ONLY = {stage.name for stage in ABLATION_STAGES}


rule all:
    default_target: True
    input:
        [
            every_budget(stage, run, "metrics")
            for stage in STAGES
            if "metrics" in STAGES[stage].outputs and stage not in ABLATIONS_ONLY and stage not in IDLE
            for run in runs_of_stage(stage)
        ],
        rules.report.output.summary,
