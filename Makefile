# Everything a fresh machine needs: `make run` and `make test` build the venv themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= configs/default.py
WORKDIR ?= workdir/default
ARGS ?=            # extra run.py flags, e.g. ARGS="--config.train.steps=50"

.PHONY: install run test test-fast bench clean

$(STAMP): .ci/requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r .ci/requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# Train the default experiment; prints validation loss/perplexity and a sample at the end.
run: $(STAMP)
	$(PY) run.py --config=$(CONFIG) --workdir=$(WORKDIR) --mode=train $(ARGS)

# Full suite, slow tests included (what CI runs).
test: $(STAMP)
	$(PY) -m pytest -n 2 -q tests

# Inner loop: skip tests marked slow.
test-fast: $(STAMP)
	$(PY) -m pytest -n 2 -q -m "not slow" tests

# Benchmarks (numbers go to experiments/results/): adds torch (CPU) + transformers.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP) experiments/requirements.txt
	$(PY) -m pip install --quiet -r experiments/requirements.txt
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) experiments/bench_moe.py
	$(PY) experiments/bench_sharding.py

clean:
	rm -rf $(VENV) workdir .pytest_cache
