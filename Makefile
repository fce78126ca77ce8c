# Two entry points for a fresh clone: `make run` (set up + `dvc repro` + a demo graph) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test lint ui

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# On a fresh clone the results are already in dvc.lock, so `track` has nothing new to log: it is
# forced once when the default store (mlflow.db) does not exist yet.
run: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro
	test -n "$$MLFLOW_TRACKING_URI" || test -f mlflow.db || \
		PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro --force --single-item track
	$(VENV)/bin/tracer attribute --model zoo/models/gpt2 --transcoders zoo/transcoders/gpt2/clt \
		--prompt "the capital of the state containing tampa is" --out outputs/demo.safetensors --quiet
	$(VENV)/bin/tracer prune outputs/demo.safetensors --json outputs/demo.json
	$(VENV)/bin/tracer score outputs/demo.safetensors

# The MLflow UI on the track stage's store (runs' artifacts are in mlartifacts/ beside it), on
# loopback only; the explorer's Runs page links to it. `make ui UI_PORT=5001` for another port.
UI_PORT ?= 5000
ui: $(STAMP)
	MLFLOW_DISABLE_TELEMETRY=true $(VENV)/bin/mlflow ui --host 127.0.0.1 --port $(UI_PORT) \
		--workers 1 --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
		--default-artifact-root $(CURDIR)/mlartifacts

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile  # two processes, a test file each
