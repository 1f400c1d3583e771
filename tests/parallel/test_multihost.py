"""Two local processes (4 CPU devices each, loopback coordinator) == one process with 8 devices."""
import os
import subprocess
import sys

import portpicker
import pytest

from conftest import FAST_COMPILE, ROOT
from moejax.train.metrics import read_metrics

FLAGS = [
    "--config=configs/gshard.py", "--config.model.d_model=32", "--config.model.num_layers=2",
    "--config.model.head_dim=8", "--config.model.moe.num_experts=8",
    "--config.model.moe.expert_hidden=32", "--config.data.corpus_bytes=40000",
    "--config.data.seq_len=16", "--config.data.batch_size=16", "--config.data.eval_batches=1",
    "--config.train.steps=3", "--config.train.warmup_steps=1", "--config.train.log_every=1",
    "--config.train.eval_every=100", "--config.train.checkpoint_every=3",
    "--config.sample.num_tokens=4", "--config.mesh.data=-1", "--config.mesh.expert=4",
]


def _env(devices):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(XLA_FLAGS=f"{FAST_COMPILE} --xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  return env


def _losses(workdir):
  return [r["loss"] for r in read_metrics(workdir) if r["split"] == "train"]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  one = str(tmp_path / "one")
  p = subprocess.run([sys.executable, "run.py", *FLAGS, f"--workdir={one}"], cwd=ROOT,
                     env=_env(8), capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]

  two = str(tmp_path / "two")
  addr = f"127.0.0.1:{portpicker.pick_unused_port()}"
  procs = [subprocess.Popen([sys.executable, "run.py", *FLAGS, f"--workdir={two}",
                             f"--coordinator_address={addr}", "--num_processes=2",
                             f"--process_id={i}"], cwd=ROOT, env=_env(4),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [pr.communicate(timeout=600) for pr in procs]
  for pr, (out, err) in zip(procs, outs):
    assert pr.returncode == 0, err[-3000:]
  assert "2 process(es)" in outs[0][0] and "8 cpu devices" in outs[0][0]

  want, got = _losses(one), _losses(two)
  assert len(want) == len(got) == 3
  for a, b in zip(got, want):
    assert abs(a - b) <= 1e-5 * abs(b), (got, want)
  assert os.path.isdir(os.path.join(two, "checkpoints", "3"))
