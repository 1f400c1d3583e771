"""The suite's compiler flags (tests/conftest.py): fast CPU compilation unless switched off."""
import os
import subprocess
import sys

import pytest

from conftest import FAST_COMPILE, ROOT

FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false",
         "--xla_cpu_parallel_codegen_split_count=1")


def _xla_flags(**env):
  """XLA_FLAGS as tests/conftest.py leaves them in a fresh interpreter with ``env``."""
  base = {k: v for k, v in os.environ.items()
          if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "MOEJAX_TEST_XLA_DEFAULTS")}
  p = subprocess.run([sys.executable, "-c", "import os, sys; sys.path.insert(0, 'tests'); "
                      "import conftest; print(os.environ['XLA_FLAGS'])"],
                     cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, p.stderr[-2000:]
  return p.stdout.split()


@pytest.mark.parametrize("env,fast", [({}, True), ({"JAX_PLATFORMS": "cpu"}, True),
                                      ({"MOEJAX_TEST_XLA_DEFAULTS": "1"}, False),
                                      ({"JAX_PLATFORMS": "cuda"}, False)])
def test_fast_compile_flags_only_on_cpu_and_unless_switched_off(env, fast):
  flags = _xla_flags(**env)
  assert all((f in flags) == fast for f in FLAGS), flags
  assert "--xla_force_host_platform_device_count=8" in flags


def test_this_run_compiles_with_the_fast_flags():
  if os.environ.get("MOEJAX_TEST_XLA_DEFAULTS"):
    assert FAST_COMPILE == ""
  else:
    assert FAST_COMPILE.split() == list(FLAGS)
    assert all(f in os.environ["XLA_FLAGS"].split() for f in FLAGS)
