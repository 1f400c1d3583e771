# Everything a fresh machine needs: `make run` and `make test` build the venv themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= configs/default.py
WORKDIR ?= workdir/default
ARGS ?=            # extra run.py flags, e.g. ARGS="--config.train.steps=50"

.PHONY: install run test test-fast bench gpu-wheels clean

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
	$(PY) experiments/bench_convert.py

# Wheels for an accelerator machine without a package index: copy .gpu_wheels there with the
# repository; experiments/gpu_check.sh installs what is missing from it.
GPU_PURE := sortedcontainers attrs pytest==9.2.0 iniconfig pluggy \
            ml-collections==1.1.0 chex==0.1.92 einops==0.8.2 tensorboardX==2.6.5 tqdm==4.70.1 \
            toolz
gpu-wheels: $(STAMP)
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: -d .gpu_wheels $(GPU_PURE)
	for v in 3.10 3.11 3.12 3.13; do \
	  $(PY) -m pip download --quiet --no-deps --only-binary=:all: -d .gpu_wheels \
	    --python-version $$v --platform manylinux2014_x86_64 --platform manylinux_2_27_x86_64 \
	    --platform manylinux_2_28_x86_64 hypothesis==6.170.17 grain==0.2.18 array-record || true; \
	done

clean:
	rm -rf $(VENV) workdir .pytest_cache
