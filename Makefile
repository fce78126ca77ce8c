# Two entry points for a fresh clone: `make run` (set up + main job) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test lint

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/tracer fixture --family gpt2 --kind clt --out outputs/fixture
	$(VENV)/bin/tracer attribute --model outputs/fixture/model --transcoders outputs/fixture/transcoders \
		--prompt "the capital of the state containing Dallas is" --out outputs/demo.safetensors
	$(VENV)/bin/tracer prune outputs/demo.safetensors --json outputs/demo.json
	$(VENV)/bin/tracer score outputs/demo.safetensors

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python -m pytest -q
