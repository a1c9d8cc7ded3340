# dicomcloud developer commands. `make run` and `make test` work on a fresh Debian 12 machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help install run test test-fast lint bench bench-large bench-pair bench-frames bench-distributed services services-stop system-deps clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "dicomcloud needs Python 3.11 or newer"; exit 1; }
	$(PYTHON) -m venv $(VENV) || { echo "install python3-venv (apt-get install python3-venv)"; exit 1; }
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,lint]'
	touch $@

install: $(STAMP)  ## create .venv with dicomcloud and its test tools

run: $(STAMP)  ## run the archive on embedded defaults (DIMSE 11112, DICOMweb :8080/dicomweb)
	$(BIN)/dicomcloud run

system-deps:  ## install DCMTK (the DICOM peers the tests use) from Debian packages
	@bash scripts/system-deps.sh

services:  ## make sure PostgreSQL and Redis answer on 127.0.0.1 (installs/starts them if not)
	@bash scripts/services.sh start

services-stop:  ## stop what `make services` started
	@bash scripts/services.sh stop

test: $(STAMP) system-deps services  ## run the whole test suite against real services
	$(BIN)/pytest

test-fast: $(STAMP)  ## tests without installing anything (services must be up)
	$(BIN)/pytest -x -q

lint: $(STAMP)  ## ruff and mypy (strict)
	$(BIN)/ruff check src tests
	$(BIN)/mypy

bench: $(STAMP)  ## ../shared/bench against dicomcloud, then the large-study case; SMALL=1: smoke set
	@bash scripts/bench.sh

bench-large: $(STAMP)  ## only the large-study case: one study of 3,000 instances, metadata latency
	$(BIN)/python scripts/bench_large_study.py

bench-frames: $(STAMP)  ## 16 connections x frames with wrk (a C client), against Orthanc
	@BENCH_WORK=$${BENCH_WORK:-/tmp/dicom-bench} bash ../shared/bench/setup.sh >&2
	@command -v wrk >/dev/null || { S=""; [ "$$(id -u)" -eq 0 ] || S=sudo; \
		$$S apt-get update -qq && $$S apt-get install -y -qq wrk >/dev/null; }
	$(BIN)/python scripts/bench_frames_wrk.py

bench-distributed: $(STAMP) services  ## PostgreSQL + Kafka + Redis: 1 vs 2 consumers, against embedded
	@BENCH_WORK=$${BENCH_WORK:-/tmp/dicom-bench} bash ../shared/bench/setup.sh >&2
	$(BIN)/python scripts/bench_distributed.py

bench-pair: $(STAMP)  ## the same side by side with Orthanc (../shared/bench/pair.sh)
	@PAIR=1 bash scripts/bench.sh

clean:  ## remove the venv and local data
	rm -rf $(VENV) dicomcloud-data .pytest_cache .mypy_cache .ruff_cache
