# The two commands of the README: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv run probe test lint bench ci clean

$(BIN)/runtime-sidecar: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

venv: $(BIN)/runtime-sidecar

# The main job on embedded defaults: the backend on SQLite (.runtime-local/) and a sidecar watching this
# host, shipping to it; prints the URL and a working `aws guardduty list-findings` command.
run: venv
	$(BIN)/runtime-backend local

probe: venv
	$(BIN)/runtime-sidecar probe

test: venv
	$(BIN)/pytest -q

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: venv
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
