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

.PHONY: install run test browser lint format bench report omniglot-rows ablations paper-omniglot gpu-train gpu-slot-files time-to-accuracy plots screenshots mlflow-ui tracking-server tracking-server-check tracking-server-stop teach bench-teach

$(BIN)/mamlops: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[dev]'
	touch $@

install: $(BIN)/mamlops

# the README's results table is `make report`'s: a run changes only DVC's outputs and dvc.lock.
# `mamlops check` first: a bad param or a dead tracking server stops it before DVC removes any
# stage's outputs
run: install
	$(BIN)/mamlops check
	$(BIN)/dvc repro

test: install browser
	$(BIN)/pytest -q

# tests/test_teach_browser.py drives Debian's chromium through chromedriver: installed here when
# missing and this is a Debian machine where we are root (CI); elsewhere that test skips
browser:
	@command -v chromedriver >/dev/null || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || \
		{ apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
		echo "could not install chromium and chromium-driver: the browser test will skip"

lint: install
	$(BIN)/ruff check src pipeline tests benchmarks scripts
	$(BIN)/ruff format --check src pipeline tests benchmarks scripts

format: install
	$(BIN)/ruff format src pipeline tests benchmarks scripts
	$(BIN)/ruff check --fix src pipeline tests benchmarks scripts

# Speed measurements (not tests): meta-training vs a plain loop and `higher`, the task sampler,
# and ONNX serving. Numbers go to docs/performance.md.
bench: install
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/bench_meta_train.py
	$(BIN)/python benchmarks/bench_sampler.py
	$(BIN)/python benchmarks/bench_serving.py

# `dvc plots show` as a page that renders offline: DVC's page loads Vega from a CDN; this one
# loads a local copy of the same versions (npm install once, into ~/.cache/mamlops/vega).
plots: install
	$(BIN)/python scripts/dvc_plots_offline.py

# The MLflow UI on this project's store. MLflow 3.17 opens experiments in its GenAI view unless
# the URL (or the sidebar's "Model training" switch, remembered per browser) says otherwise, and
# a click in its experiment list drops the URL's choice: so the URL printed is the project
# experiment's runs table itself, with the key metric and param columns (mlflow_ui.py)
mlflow-ui: install
	@page=$$($(BIN)/python -c 'from mamlops import mlflow_ui, tracking; print(mlflow_ui.runs_page(tracking.experiment_id()))') && \
		echo "open http://127.0.0.1:5000/$$page" && \
		echo "(then click 'Override saved view' once to keep its columns)"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

# Teach classifiers in a browser: the meta-model `make run` trained, served with the page at
# http://127.0.0.1:8000/ (draw a few characters per class, Teach, then draw more). Taught
# classifiers are kept in classifiers/ and served at /classifiers/<id>/predict too.
TEACH_META ?= models/omniglot-5w1s/theta_best.safetensors
teach: install
	@test -f $(TEACH_META) || { echo "no meta-model at $(TEACH_META): run 'make run' first (or 'dvc pull' from your remote)"; exit 1; }
	$(BIN)/mamlops serve --meta $(TEACH_META) --store classifiers --port 8000

# Teaching over HTTP, measured: time to teach 5-way 1-shot and 20-way 5-shot, prediction
# latency and throughput, memory over 1,000 teach/predict cycles (docs/serving.md).
bench-teach: install
	$(BIN)/python benchmarks/bench_teach.py

# A team's tracking server on this machine: PostgreSQL (Debian's postgresql package, installed
# here when missing) as MLflow's backend store, `mlflow server` on 127.0.0.1:5000. Then
# `export MLFLOW_TRACKING_URI=http://127.0.0.1:5000` and every stage logs there.
tracking-server: install
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		apt-get install -y postgresql
	$(BIN)/python scripts/tracking_server.py start

# a tiny pipeline run logged through that server, then read back over its REST API
tracking-server-check: tracking-server
	$(BIN)/python scripts/tracking_server.py check

tracking-server-stop:
	$(BIN)/python scripts/tracking_server.py stop

# The README's pictures (docs/img/): the plots page and the MLflow UI in headless Chromium
# (Debian's chromium and chromium-driver: apt-get install chromium chromium-driver).
screenshots: install
	$(BIN)/python scripts/screenshots.py

# The README's results table, rebuilt from metrics/eval/*.json.
ROWS := benchmarks/results/omniglot-rows
report: install
	$(BIN)/mamlops report --readme README.md $(if $(wildcard $(ROWS)/metrics),--also $(ROWS))

# The paper's other three Omniglot rows on this CPU (about 1.5 h on 2 cores): each CPU-sized
# preset trained and evaluated alone as the queued DVC experiment row-<setting>, one at a time;
# their metrics and results copied to $(ROWS)/ and added to the README table.
omniglot-rows: install
	$(BIN)/python benchmarks/omniglot_rows.py all
	$(BIN)/mamlops report --readme README.md --also $(ROWS)

# Training recipes of SETTING (benchmarks/recipes.yaml) as queued DVC experiments, one at a time,
# each seeing TASKS tasks; then val accuracy against seconds and tasks, read back from MLflow, as
# a plot and a table in benchmarks/results/time-to-accuracy/ (docs/performance.md quotes it).
SETTING ?= omniglot-5w1s
TASKS ?= 16000
time-to-accuracy: install
	$(BIN)/python benchmarks/time_to_accuracy.py all \
	  --setting $(SETTING) --tasks $(TASKS)

# Accuracy ablations (benchmarks/ablations.yaml; docs/accuracy.md quotes their reports): each
# recipe of STUDY trained and scored on the same 600 test episodes, one at a time, resumable;
# the report in benchmarks/results/ablations/STUDY/report.md. fidelity-5w1s takes 2.5 h on 2 cores.
STUDY ?= fidelity-5w1s
ablations: install
	$(BIN)/python benchmarks/ablations.py all $(STUDY)

# On a rented GPU machine that has PyTorch but no venv (docs/performance.md, "GPU"): the float64
# graph-vs-eager gradient check, graph and eager timed, then PRESET trained by the library's loop
# (the captured graph) for at most MINUTES of wall clock into gpu-run/PRESET/ and scored there;
# the same command resumes it. gpu-slot-files makes what a lent slot carries for
# benchmarks/gpu_slot.sh: the prepared data and pydantic's wheels for the GPU machine's Python.
PRESET ?= paper-omniglot-5w1s
MINUTES ?= 8.5
gpu-train:
	python3 benchmarks/gpu_train.py --preset $(PRESET) --minutes $(MINUTES) --out gpu-run/$(PRESET) \
	  --check --bench graph batched --evaluate
GPU_PYTHON ?= 3.12
gpu-slot-files: install
	$(BIN)/dvc repro prepare
	$(BIN)/pip download -q pydantic --only-binary=:all: --python-version $(GPU_PYTHON) \
	  --platform manylinux2014_x86_64 -d gpu-wheels
	du -sh data/prepared/omniglot gpu-wheels

# The MAML paper's Omniglot configs (presets.yaml; 60,000 iterations each: for a GPU), as DVC
# experiments named after them: `make paper-omniglot-5w1s` trains one, `make paper-omniglot`
# all four, one after another. Each replaces train.settings with that preset alone, so the targets
# run in any order. ITERATIONS=N shortens a run (a try-out); EXP_ARGS adds `dvc exp run` args.
PAPER_OMNIGLOT := paper-omniglot-5w1s paper-omniglot-5w5s paper-omniglot-20w1s paper-omniglot-20w5s
ITERATIONS ?=
EXP_ARGS ?=
paper-omniglot: $(PAPER_OMNIGLOT)
paper-omniglot-%: install
	$(BIN)/dvc exp run -n $@ -S '~train.settings' -S '+train.settings={$@: omniglot}' \
	  $(if $(ITERATIONS),-S 'presets.yaml:$@.iterations=$(ITERATIONS)') $(EXP_ARGS)
