# mamlops: two commands on a fresh machine: `make run` (install + main job) and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# stage commands call `python`: make it the venv's
export PATH := $(abspath $(BIN)):$(PATH)
# On machines without internet a local mirror of the Omniglot zips sits beside the checkout.
ifneq ($(wildcard ../shared/data/omniglot/images_background.zip),)
export MAMLOPS_DATA_MIRROR ?= $(abspath ../shared/data/omniglot)
endif

.PHONY: install run test lint format bench report paper-omniglot

$(BIN)/mamlops: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[dev]'
	touch $@

install: $(BIN)/mamlops

# the README's results table is `make report`'s: a run changes only DVC's outputs and dvc.lock
run: install
	$(BIN)/dvc repro

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check src pipeline tests benchmarks
	$(BIN)/ruff format --check src pipeline tests benchmarks

format: install
	$(BIN)/ruff format src pipeline tests benchmarks
	$(BIN)/ruff check --fix src pipeline tests benchmarks

# Speed measurements (not tests): meta-training vs a plain loop and `higher`, the task sampler,
# and ONNX serving. Numbers go to docs/performance.md.
bench: install
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/bench_meta_train.py
	$(BIN)/python benchmarks/bench_sampler.py
	$(BIN)/python benchmarks/bench_serving.py

# The README's results table, rebuilt from metrics/eval/*.json.
report: install
	$(BIN)/mamlops report --readme README.md

# The MAML paper's Omniglot configs (60,000 iterations each: for a GPU), as DVC experiments:
# `make paper-omniglot-5w1s` trains one, `make paper-omniglot` all four.
PAPER_OMNIGLOT := paper-omniglot-5w1s paper-omniglot-5w5s paper-omniglot-20w1s paper-omniglot-20w5s
paper-omniglot: $(PAPER_OMNIGLOT)
paper-omniglot-%: install
	$(BIN)/dvc exp run -n $@ -S '~train.settings.omniglot-5w1s' -S '+train.settings.$@=omniglot'
