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

.PHONY: install run test lint format bench clean

$(BIN)/mamlops: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[dev]'
	touch $@

install: $(BIN)/mamlops

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
