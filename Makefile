# Two entry points (see README): `make demo` runs the main job on the embedded default, `make test` runs the tests.
# Both create .venv on first use; the constraints file pins torch to the local CPU wheel.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	RAY_AUTH_MODE=disabled $(BIN)/python jobs/certify.py --config configs/demo.yaml

test: lint  # ruff first: a lint or format finding fails in seconds, before the suite
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q --durations=30 tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) outputs
