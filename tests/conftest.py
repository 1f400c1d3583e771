"""Shared test helpers: tiny configs and tolerances by dtype."""
import os
import sys

# Test programs are tiny, so compiling them is most of the suite's time (thousands of programs,
# most of them single eager ops): compile without LLVM optimisation and with XLA:CPU's elemental
# emitters, about half the compile time of the defaults. The HLO passes are the same, results
# agree within the dtype tolerances, and bit-exact checks compare two runs under the same flags.
# MOEJAX_TEST_XLA_DEFAULTS=1 runs the suite under XLA's default CPU compilation instead; runs on
# another platform (JAX_PLATFORMS=cuda) keep the defaults too.
CPU_ONLY = os.environ.get("JAX_PLATFORMS", "cpu") == "cpu"
FAST_COMPILE = "" if os.environ.get("MOEJAX_TEST_XLA_DEFAULTS") or not CPU_ONLY else (
    "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
    "--xla_cpu_parallel_codegen_split_count=1")
# 8 simulated CPU devices for the sharding tests; must be set before JAX is imported. Tests that
# do not build a mesh run on device 0 as usual.
# On 2 loaded cores, 8 device threads can reach a collective far apart: XLA:CPU aborts the
# process when one waits 40 s (seen as a crashed test worker), so the tests give them minutes.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_cpu_collective_call_terminate_timeout_seconds=900"
                           " --xla_cpu_collective_timeout_seconds=900").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile the same tiny programs many times (in-process and in run.py subprocesses, which
# inherit this): JAX's persistent compilation cache roughly halves the suite's time on 2 cores.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_ROOT, ".cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)  # `configs` is a top-level package of the repo, not installed

from moejax.config import base_config  # noqa: E402

# Absolute tolerances for comparing against float64/float32 references.
TOL = {"float32": dict(rtol=1e-5, atol=1e-5), "bfloat16": dict(rtol=2e-2, atol=2e-2)}


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: end-to-end tests (run by `make test`, skipped by "
                                     "`make test-fast`)")


def tiny_config(kind: str = "deepseekmoe"):
  """A model small enough to compile and train in seconds."""
  c = base_config()
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.ffn_hidden = 32, 2, 4, 2, 8, 64
  e = m.moe
  if kind == "dense":
    e.num_experts = 0
  elif kind == "switch":
    e.num_experts, e.top_k, e.expert_hidden, e.dispatch, e.renormalize = 4, 1, 64, "capacity", False
  elif kind == "gshard":
    e.num_experts, e.top_k, e.expert_hidden, e.dispatch = 4, 2, 32, "capacity"
  elif kind == "deepseekmoe":
    # m=2 segments of 5 experts = 10 fine experts: 2 shared + 8 routed (divisible by 2, 4, 8
    # for expert parallelism), 2 routed active, hidden 16 each.
    e.num_experts, e.top_k, e.expert_hidden, e.segments, e.num_shared_experts = 5, 2, 32, 2, 2
    e.renormalize = False
  else:
    raise ValueError(kind)
  c.data.corpus_bytes, c.data.seq_len, c.data.batch_size, c.data.eval_batches = 40_000, 16, 4, 2
  t = c.train
  t.steps, t.warmup_steps, t.log_every, t.eval_every, t.checkpoint_every = 8, 2, 2, 4, 4
  c.sample.num_tokens = 8
  c.mesh.num_devices = 1           # single device unless a test asks for a mesh
  return c


@pytest.fixture
def tiny():
  return tiny_config
