# FLORA pipeline, Snakemake wiring. Every rule runs one stage command of the
# flora_steps package; dvc.yaml wires the very same commands for `dvc repro`.
#
#   snakemake --cores 8                                   # params.yaml (embedded default)
#   snakemake --cores 8 --config params=configs/smoke.yaml   # another params profile
#   snakemake --cores 8 --use-conda                       # per-rule conda env (environment.yml)
#   snakemake --profile cluster/slurm                     # on a Slurm cluster
#
# Each rule lists the package sources it runs as `code` inputs (as dvc.yaml's deps
# do), so editing a stage's code reruns that stage and everything downstream.

import sys

from flora_steps.errors import UserError
from flora_steps.params import load_params

PARAMS_FILE = config.get("params", "params.yaml")
try:
    PARAMS = load_params(PARAMS_FILE).model_dump(mode="json")
except UserError as error:
    sys.exit(f"error: {error}")


BUDGETS = PARAMS["budgets"]


wildcard_constraints:
    budget=r"\d*\.?\d+",


def tracked(*sections):
    """The params sections a rule depends on: changing one of them reruns the rule."""
    return {section: PARAMS[section] for section in sections}


rule all:
    input:
        "results/pretrain/metrics.json",
        "results/decompose/metrics.json",
        "results/filter/metrics.json",
        "results/supernet/metrics.json",
        expand("results/search/{budget}/metrics.json", budget=BUDGETS["search"]),
        expand("results/retrain/flora/{budget}/metrics.json", budget=BUDGETS["search"]),
        expand("results/retrain/uniform/{budget}/metrics.json", budget=BUDGETS["uniform"]),
        "results/report/summary.json",


rule pretrain:
    input:
        code=["flora_steps/pretrain.py", "flora_steps/models.py", "flora_steps/data.py", "flora_steps/training.py"],
    output:
        model="results/pretrain/model.safetensors",
        spec="results/pretrain/model.json",
        history="results/pretrain/history.csv",
        metrics="results/pretrain/metrics.json",
    log:
        "results/pretrain/log.txt",
    benchmark:
        "results/pretrain/benchmark.tsv"
    params:
        tracked=tracked("seed", "model", "data", "pretrain"),
    threads: 8
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "environment.yml"
    shell:
        "python -m flora_steps.pretrain --params {PARAMS_FILE}"


rule decompose:
    input:
        code=["flora_steps/decompose.py", "flora_steps/core"],
        model="results/pretrain/model.safetensors",
        spec="results/pretrain/model.json",
    output:
        model="results/decompose/model.safetensors",
        spec="results/decompose/model.json",
        spectra="results/decompose/spectra.csv",
        layers="results/decompose/layers.csv",
        plot=report("results/decompose/spectra.png", category="Decompose", caption="report/spectra.rst"),
        metrics="results/decompose/metrics.json",
    log:
        "results/decompose/log.txt",
    benchmark:
        "results/decompose/benchmark.tsv"
    params:
        tracked=tracked("seed", "decompose"),
    threads: 8
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "environment.yml"
    shell:
        "python -m flora_steps.decompose --params {PARAMS_FILE}"


rule filter:
    input:
        code=["flora_steps/filter.py", "flora_steps/models.py", "flora_steps/data.py", "flora_steps/core"],
        model="results/decompose/model.safetensors",
        spec="results/decompose/model.json",
    output:
        space="results/filter/space.json",
        sensitivity="results/filter/sensitivity.csv",
        plot=report("results/filter/sensitivity.png", category="Filter", caption="report/sensitivity.rst"),
        metrics="results/filter/metrics.json",
    log:
        "results/filter/log.txt",
    benchmark:
        "results/filter/benchmark.tsv"
    params:
        tracked=tracked("seed", "data", "filter"),
    threads: 8
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        "environment.yml"
    shell:
        "python -m flora_steps.filter --params {PARAMS_FILE}"


rule supernet:
    input:
        code=["flora_steps/supernet.py", "flora_steps/models.py", "flora_steps/data.py", "flora_steps/training.py", "flora_steps/core"],
        model="results/decompose/model.safetensors",
        spec="results/decompose/model.json",
        teacher="results/pretrain/model.safetensors",
        teacher_spec="results/pretrain/model.json",
        space="results/filter/space.json",
    output:
        model="results/supernet/model.safetensors",
        spec="results/supernet/model.json",
        history="results/supernet/history.csv",
        metrics="results/supernet/metrics.json",
    log:
        "results/supernet/log.txt",
    benchmark:
        "results/supernet/benchmark.tsv"
    params:
        tracked=tracked("seed", "data", "supernet"),
    threads: 8
    resources:
        mem_mb=8000,
        runtime=720,
    conda:
        "environment.yml"
    shell:
        "python -m flora_steps.supernet --params {PARAMS_FILE}"


rule search:
    input:
        code=["flora_steps/search.py", "flora_steps/models.py", "flora_steps/data.py", "flora_steps/core"],
        model="results/supernet/model.safetensors",
        spec="results/supernet/model.json",
        teacher="results/pretrain/model.safetensors",
        teacher_spec="results/pretrain/model.json",
        space="results/filter/space.json",
    output:
        ranks="results/search/{budget}/ranks.json",
        history=report("results/search/{budget}/history.csv", category="Search"),
        metrics="results/search/{budget}/metrics.json",
    log:
        "results/search/{budget}/log.txt",
    benchmark:
        "results/search/{budget}/benchmark.tsv"
    params:
        tracked=tracked("seed", "data", "search"),
    threads: 8
    resources:
        mem_mb=8000,
        runtime=240,
    conda:
        "environment.yml"
    shell:
        "python -m flora_steps.search --params {PARAMS_FILE} --budget {wildcards.budget}"


rule retrain_flora:
    input:
        code=[
            "flora_steps/retrain.py",
            "flora_steps/models.py",
            "flora_steps/data.py",
            "flora_steps/training.py",
            "flora_steps/core",
        ],
        model="results/supernet/model.safetensors",
        spec="results/supernet/model.json",
        teacher="results/pretrain/model.safetensors",
        teacher_spec="results/pretrain/model.json",
        ranks="results/search/{budget}/ranks.json",
    output:
        model="results/retrain/flora/{budget}/model.safetensors",
        spec="results/retrain/flora/{budget}/model.json",
        ranks="results/retrain/flora/{budget}/ranks.json",
        history="results/retrain/flora/{budget}/history.csv",
        metrics="results/retrain/flora/{budget}/metrics.json",
    log:
        "results/retrain/flora/{budget}/log.txt",
    benchmark:
        "results/retrain/flora/{budget}/benchmark.tsv"
    params:
        tracked=tracked("seed", "data", "retrain"),
    threads: 8
    resources:
        mem_mb=8000,
        runtime=720,
    conda:
        "environment.yml"
    shell:
        "python -m flora_steps.retrain --params {PARAMS_FILE} --method flora --budget {wildcards.budget}"


rule retrain_uniform:
    input:
        code=[
            "flora_steps/retrain.py",
            "flora_steps/models.py",
            "flora_steps/data.py",
            "flora_steps/training.py",
            "flora_steps/core",
        ],
        model="results/decompose/model.safetensors",
        spec="results/decompose/model.json",
        teacher="results/pretrain/model.safetensors",
        teacher_spec="results/pretrain/model.json",
    output:
        model="results/retrain/uniform/{budget}/model.safetensors",
        spec="results/retrain/uniform/{budget}/model.json",
        ranks="results/retrain/uniform/{budget}/ranks.json",
        history="results/retrain/uniform/{budget}/history.csv",
        metrics="results/retrain/uniform/{budget}/metrics.json",
    log:
        "results/retrain/uniform/{budget}/log.txt",
    benchmark:
        "results/retrain/uniform/{budget}/benchmark.tsv"
    params:
        tracked=tracked("seed", "data", "retrain"),
    threads: 8
    resources:
        mem_mb=8000,
        runtime=720,
    conda:
        "environment.yml"
    shell:
        "python -m flora_steps.retrain --params {PARAMS_FILE} --method uniform --budget {wildcards.budget}"


rule report:
    input:
        code=["flora_steps/report.py", "flora_steps/tables.py", "flora_steps/figures.py", "flora_steps/tradeoff.py"],
        base="results/pretrain/metrics.json",
        spectra="results/decompose/spectra.csv",
        layers="results/decompose/layers.csv",
        decompose="results/decompose/metrics.json",
        spec="results/decompose/model.json",
        sensitivity="results/filter/sensitivity.csv",
        space="results/filter/space.json",
        filter="results/filter/metrics.json",
        supernet="results/supernet/metrics.json",
        search=expand(
            "results/search/{budget}/{name}", budget=BUDGETS["search"], name=["metrics.json", "history.csv", "ranks.json"]
        ),
        flora=expand("results/retrain/flora/{budget}/metrics.json", budget=BUDGETS["search"]),
        uniform=expand("results/retrain/uniform/{budget}/metrics.json", budget=BUDGETS["uniform"]),
    output:
        results=report("results/report/results.csv", category="Tables"),
        extra_reduction=report("results/report/extra_reduction.csv", category="Tables"),
        ranks=report("results/report/ranks.csv", category="Tables"),
        costs=report("results/report/costs.csv", category="Tables"),
        text_tables=[
            "results/report/results.md",
            "results/report/results.tex",
            "results/report/extra_reduction.md",
            "results/report/extra_reduction.tex",
            "results/report/ranks.md",
            "results/report/ranks.tex",
            "results/report/costs.md",
            "results/report/costs.tex",
        ],
        tradeoff=report("results/report/tradeoff.png", category="Headline", caption="report/tradeoff.rst"),
        spectra=report("results/report/spectra.png", category="Decompose", caption="report/spectra.rst"),
        sensitivity=report("results/report/sensitivity.png", category="Filter", caption="report/sensitivity.rst"),
        search=report("results/report/search.png", category="Search", caption="report/search.rst"),
        ranks_figure=report("results/report/ranks.png", category="Search", caption="report/ranks.rst"),
        sampling=report("results/report/sampling.png", category="Supernet", caption="report/sampling.rst"),
        summary="results/report/summary.json",
    log:
        "results/report/log.txt",
    benchmark:
        "results/report/benchmark.tsv"
    params:
        tracked=tracked("seed", "budgets", "decompose"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "environment.yml"
    shell:
        "python -m flora_steps.report --params {PARAMS_FILE}"
