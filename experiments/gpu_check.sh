#!/usr/bin/env bash
# The accelerator checks in one script (about 12 minutes on an H100/H200), run from the
# repository root on a GPU machine that has JAX + CUDA but cannot reach a package index:
#   1. installs what is missing from .gpu_wheels/ (built here by `make gpu-wheels`, carried along),
#   2. runs the Pallas kernel tests natively (every test also runs its interpreter variant),
#   3. times gmm / d_lhs / tgmm against dense bf16 matmuls and jax.lax.ragged_dot,
#   4. times the whole MoE layer against a dense FFN (bench_moe, bf16),
#   5. times KV-cache generation: prefill/decode tokens/s, the small-batch MoE path (bench_decode,
#      bf16).
# Results go to $OUT (default /tmp/gpu_check): device.txt, tests.txt, bench_kernels/, bench_moe/,
# bench_decode/.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Unpinned names: anything the machine already has is kept.
[ -d .gpu_wheels ] && pip install -q --no-index --no-deps --find-links=.gpu_wheels hypothesis \
  attrs sortedcontainers pytest iniconfig pluggy ml-collections chex einops toolz tensorboardX \
  tqdm grain array-record 2>&1 | tail -3
{ python -c "import jax; print('jax', jax.__version__, jax.devices())"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; } \
  2>&1 | tee "$OUT/device.txt"
# --noconftest: the kernel tests need only pallas_kernels + hypothesis (tests/conftest.py forces
# JAX_PLATFORMS=cpu for the CPU suite).
JAX_PLATFORMS=cuda timeout 300 python -m pytest -q --noconftest -p no:cacheprovider \
  tests/pallas_kernels 2>&1 | tail -40 | tee "$OUT/tests.txt"
JAX_PLATFORMS=cuda timeout 150 python experiments/bench_kernels.py --dtype=bfloat16 \
  --backends=pallas,xla --out_dir="$OUT/bench_kernels" 2>&1 | tail -60
JAX_PLATFORMS=cuda timeout 150 python experiments/bench_moe.py --dtype=bfloat16 \
  --backends=pallas,ragged_dot --notorch --nosweep --repeats=5 --out_dir="$OUT/bench_moe" \
  2>&1 | tail -25
JAX_PLATFORMS=cuda timeout 150 python experiments/bench_decode.py --dtype=bfloat16 --nohf \
  --repeats=3 --out_dir="$OUT/bench_decode" 2>&1 | tail -30
