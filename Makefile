# Quick start:  make up     (set up, then run the farm locally until Ctrl-C: fuzzfarm up)
#               make test   (set up, then run the whole test suite, as CI does)
#               make demo   (a one-minute tour: boot the examples, fuzz the seed kernel 60 s)
# Each target installs what it needs: system packages as root (fuzzfarm/system_deps.py), Python
# packages into $(VENV), then the native hooks.
PYTHON ?= python3
VENV   ?= .venv
PORT   ?= 8000
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NATIVE := $(VENV)/.native
SYSTEM := $(PYTHON) fuzzfarm/system_deps.py
# pytest arguments, e.g. `make test PYTEST_ARGS=tests/kernel_emu`
PYTEST_ARGS ?=
# what `make test-fast` leaves out: tests marked slow, or needing Chromium, Redis or farm processes
FAST_MARKERS := not slow and not browser and not redis and not farm

.PHONY: up demo test test-fast lint images bench clean

$(STAMP): pyproject.toml setup.py
	@$(SYSTEM) setup
	@echo "fuzzfarm: setting up $(VENV): Python packages from pyproject.toml (the first time takes a minute or two)"
	@$(PYTHON) -m venv $(VENV)
	@# --no-compile: Python compiles each module when it is first imported instead of pip compiling
	@# every file of every package now (the setup takes ~40 s instead of ~50 s)
	@$(BIN)/pip install -qq --no-compile --upgrade pip 'setuptools>=77' wheel
	@$(BIN)/pip install -qq --no-compile -e '.[test]'
	@touch $(STAMP)

$(NATIVE): $(STAMP) $(wildcard kernel_emu/native/*.[ch] fuzz/native/*.c)
	@echo "fuzzfarm: building the native hooks (kernel_emu/native, fuzz/native)"
	@$(BIN)/python setup.py -q build_ext --inplace >$(VENV)/native-build.log 2>&1 \
		|| { cat $(VENV)/native-build.log; exit 1; }
	@touch $(NATIVE)

up: $(NATIVE)
	@# 130 is Ctrl-C, the way to stop the farm
	@$(BIN)/fuzzfarm up --port $(PORT) || test $$? -eq 130

demo: $(NATIVE)
	$(BIN)/fuzzfarm demo
	@# exit status 1 means findings: on the seed kernel, that is the point
	$(BIN)/fuzzfarm fuzz --kernel seed --seconds 60 --out out/demo || test $$? -eq 1

test: $(NATIVE)
	@$(SYSTEM) test
	$(BIN)/ruff check .
	$(BIN)/mypy
	@# the unmarked tests in parallel, as test-fast runs them; then the marked ones, which start
	@# servers, processes or a browser of their own, one at a time. Status 5: a selection
	@# (PYTEST_ARGS) with no test of that kind
	$(BIN)/python -m pytest -n auto -m "$(FAST_MARKERS)" $(PYTEST_ARGS) || test $$? -eq 5
	$(BIN)/python -m pytest -m "not ($(FAST_MARKERS))" $(PYTEST_ARGS) || test $$? -eq 5

test-fast: $(NATIVE)
	@# the unmarked tests need no server, process or browser of their own: they run in parallel
	$(BIN)/python -m pytest -n auto -m "$(FAST_MARKERS)" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

images: $(NATIVE)
	$(BIN)/fuzzfarm build-guest

bench: $(NATIVE)
	$(BIN)/fuzzfarm bench boot

clean:
	rm -rf $(VENV) build *.egg-info kernel_emu/*.so fuzz/*.so
