# Two commands for a newcomer:  make run  (the default pipeline)  and  make test.
# Both create the pinned virtual environment in .venv when it is missing or stale.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
CORES  ?= all
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: run test env dvc ablations docs docs-hybrid docs-runs docs-ablations clean

run: $(STAMP)  ## run the default pipeline with Snakemake
	snakemake --cores $(CORES)

test: $(STAMP)  ## run the test suite
	python -m pytest

dvc: $(STAMP)  ## run the default pipeline with DVC instead (plain `dvc repro` runs the ablations too)
	dvc repro report latency

ablations: $(STAMP)  ## the paper's ablations of FLORA on the default (results/ablations/report/); dvc repro ablations
	snakemake --cores $(CORES) ablations

REPORTED := tradeoff.png results.md comparison.md means.md search_costs.md summary.json

docs: $(STAMP)  ## run the default pipeline if needed, then copy its headline figure and tables into docs/default/
	snakemake --cores $(CORES)
	mkdir -p docs/default
	cd results/report && cp $(REPORTED) ../../docs/default/

docs-hybrid: $(STAMP)  ## the same for the hybrid profile (configs/hybrid.yaml, results in results/hybrid/), into docs/hybrid/
	snakemake --cores $(CORES) --config params=configs/hybrid.yaml
	mkdir -p docs/hybrid
	cd results/hybrid/report && cp $(REPORTED) ../../../docs/hybrid/

docs-runs: $(STAMP)  ## the published numbers: the default with five runs after the dense model (configs/default_5_runs.yaml), into docs/runs/
	snakemake --cores $(CORES) --config params=configs/default_5_runs.yaml
	mkdir -p docs/runs
	cd results/default_5_runs/report && cp $(REPORTED) ../../../docs/runs/

ABLATIONS := ablations.png ablations.md

docs-ablations: $(STAMP)  ## the ablations over the published profile's five runs, into docs/runs/ (ablations.json: its summary)
	snakemake --cores $(CORES) ablations --config params=configs/default_5_runs.yaml
	mkdir -p docs/runs
	cd results/default_5_runs/ablations/report && cp $(ABLATIONS) ../../../../docs/runs/ && cp summary.json ../../../../docs/runs/ablations.json

env: $(STAMP)  ## only create the environment

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt -e .
	touch $(STAMP)

clean:  ## remove results and Snakemake state (keeps .venv)
	rm -rf results .snakemake
