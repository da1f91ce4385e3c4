# Quick start:  make up     (set up, then run the farm locally until Ctrl-C: fuzzfarm up)
#               make test   (set up, then run the test suite)
#               make demo   (a one-minute tour: boot the examples, fuzz the seed kernel 60 s)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: up demo test lint images bench clean

$(STAMP): pyproject.toml setup.py $(wildcard kernel_emu/native/*.[ch] fuzz/native/*.c)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

up: $(STAMP)
	@command -v redis-server >/dev/null || { echo "redis-server is needed (Debian: apt install redis-server)"; exit 2; }
	$(BIN)/fuzzfarm up --port 8000

demo: $(STAMP)
	$(BIN)/fuzzfarm demo
	@# exit status 1 means findings: on the seed kernel, that is the point
	$(BIN)/fuzzfarm fuzz --kernel seed --seconds 60 --out out/demo || test $$? -eq 1

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

images: $(STAMP)
	$(BIN)/fuzzfarm build-guest

bench: $(STAMP)
	$(BIN)/fuzzfarm bench boot

clean:
	rm -rf $(VENV) build *.egg-info kernel_emu/*.so
