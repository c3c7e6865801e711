# The README's commands. Every target sets up what it needs: .venv, pinned packages, the project.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

PROTOS  := $(wildcard protos/speculum/v1/*.proto)
STUBS   := speculum/v1/.generated

.PHONY: setup stubs test demo serve bench loadtest soak clean

setup: $(STAMP) $(STUBS)

# Stubs are generated from protos/, never committed (tests/test_stubs.py fails on stale ones).
stubs: $(STUBS)
$(STUBS): $(PROTOS) $(STAMP)
	$(BIN)/python -m speculum.stubs
	touch $(STUBS)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q tests

demo: setup
	$(BIN)/python -m speculum.demo

serve: setup
	$(BIN)/speculum serve

bench: setup
	$(BIN)/python -m bench

# Minutes of mixed load on `speculum serve`'s stack with one fault of each kind (not part of `make test`).
SOAK_MINUTES ?= 3
soak: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m bench.soak --minutes $(SOAK_MINUTES)

# The local stack (demo pair) at concurrency 1, 4 and 16, 5 s per level and RPC: JSON + PNG in build/loadtest.
loadtest: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m loadtest --levels 1 4 16 --duration 5 --out build/loadtest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
