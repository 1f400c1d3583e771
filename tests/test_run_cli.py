"""run.py end to end in a subprocess: train/resume/eval/sample from the workdir's config.json,
refused and allowed config changes, divergence, Ctrl-C, and one clear line per bad input."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT

TINY = [
    "--config.model.d_model=32", "--config.model.num_layers=2", "--config.model.head_dim=8",
    "--config.model.moe.num_experts=4", "--config.model.moe.expert_hidden=32",
    "--config.data.corpus_bytes=40000", "--config.data.seq_len=32", "--config.data.batch_size=8",
    "--config.data.eval_batches=2", "--config.train.steps=30", "--config.train.warmup_steps=5",
    "--config.train.log_every=10", "--config.train.eval_every=20",
    "--config.train.checkpoint_every=20", "--config.sample.num_tokens=16",
    "--config.mesh.num_devices=1",
]
# absl's log-line format (I1128 20:50:34.79 ...): library INFO that must stay out of the console
ABSL_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d", re.M)


def run(*args, check=True, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=timeout)
  if check and p.returncode != 0:
    raise AssertionError(f"run.py failed ({p.returncode}):\n{p.stdout}\n{p.stderr[-3000:]}")
  return p


def read_rows(wd):
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_train_then_eval_and_sample_use_the_workdir_config(tmp_path):
  """Trained with model overrides; eval/sample name only the config file (as in the README) and
  must rebuild the trained model from config.json, not from --config."""
  wd = str(tmp_path / "wd")
  p = run("--config=configs/deepseekmoe.py", f"--workdir={wd}", "--mode=train", *TINY)
  out = p.stdout
  assert "step    30/30" in out and "tok/s" in out and "ETA" in out
  assert "final | step 30 | val loss" in out and "sample (temperature" in out
  assert "data: generated corpus (seed 0, 40,000 bytes), validation split" in out
  # which path ran, once each: training's dispatch, then generation's small-batch path
  assert out.count("single-device dispatch") == 1 and out.count("small-batch path") == 1
  assert not ABSL_LINE.search(p.stdout + p.stderr), "library INFO lines reached the console"
  log = open(os.path.join(wd, "logs", "run.log")).read()
  assert "checkpoint" in log.lower()                                   # ... they went here
  rows = read_rows(wd)
  train = [r for r in rows if r["split"] == "train"]
  assert train[-1]["ce"] < train[0]["ce"] - 0.5          # it learns
  assert any(k.endswith("/expert_load") for k in train[-1])
  final_val = rows[-1]["val_loss"]

  p = run("--config=configs/deepseekmoe.py", f"--workdir={wd}", "--mode=eval")
  ev = json.loads(p.stdout.strip().splitlines()[-1])
  assert abs(ev["val_loss"] - final_val) < 1e-5
  assert "generated corpus (seed 0, 40,000 bytes)" in ev["val_data"]

  other = tmp_path / "other.txt"
  other.write_bytes(("the other text, " * 600).encode())
  p = run(f"--workdir={wd}", "--mode=eval", f"--config.data.path={other}")
  assert f"data.path: '' -> '{other}'" in p.stdout           # the allowed change is named
  assert f"data: {other} (" in p.stdout                      # and the number names its data
  assert json.loads(p.stdout.strip().splitlines()[-1])["val_loss"] != final_val

  p = run("--config=configs/deepseekmoe.py", f"--workdir={wd}", "--mode=sample",
          "--config.sample.prompt=count:", "--config.sample.temperature=0")
  text = [l for l in p.stdout.splitlines() if not l.startswith(("note:", "MoE layer", "  "))]
  assert text[0].startswith("count:"), p.stdout
  assert re.search(r"\d+ new tokens: prefill \d+ tokens/s, decode \d+ tokens/s \(batch 1",
                   p.stdout)

  p = run(f"--workdir={wd}", "--mode=eval", "--config.model.moe.top_k=3", check=False)
  assert p.returncode == 2 and "Traceback" not in p.stderr
  assert "model.moe.top_k: 2 -> 3" in p.stderr

  # Resume: a model change is refused before anything is touched ...
  cfg_before = open(os.path.join(wd, "config.json")).read()
  p = run("--config=configs/deepseekmoe.py", f"--workdir={wd}", *TINY,
          "--config.model.moe.num_experts=8", "--config.model.moe.top_k=3",
          "--config.train.steps=40", check=False)
  assert p.returncode == 2 and "Traceback" not in p.stderr
  assert "model.moe.num_experts: 4 -> 8" in p.stderr and "model.moe.top_k: 2 -> 3" in p.stderr
  assert open(os.path.join(wd, "config.json")).read() == cfg_before
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["20", "30"]
  # ... a harmless one is noted and used
  p = run("--config=configs/deepseekmoe.py", f"--workdir={wd}", "--mode=train", *TINY,
          "--config.train.steps=40")
  assert "train.steps: 30 -> 40" in p.stdout
  assert "resumed from" in p.stdout and "at step 30" in p.stdout and "step    40/40" in p.stdout
  assert json.load(open(os.path.join(wd, "config.json")))["train"]["steps"] == 40
  keys = [(r["step"], r["split"]) for r in read_rows(wd)]
  assert len(keys) == len(set(keys)), "metrics.jsonl has duplicate rows"


@pytest.mark.slow
def test_divergence_stops_with_a_clear_error_and_saves_nothing(tmp_path):
  wd = str(tmp_path / "wd")
  p = run("--config=configs/gshard.py", f"--workdir={wd}", *TINY,
          "--config.train.learning_rate=1e6", "--config.train.grad_clip=0",
          "--config.train.warmup_steps=1", check=False)
  assert p.returncode == 1, p.stdout + p.stderr
  assert re.search(r"non-finite (loss|gradient) at step \d+", p.stderr)
  assert "Traceback" not in p.stderr
  assert not os.listdir(os.path.join(wd, "checkpoints"))


@pytest.mark.slow
def test_ctrl_c_saves_the_current_step_and_resume_logs_no_duplicates(tmp_path):
  wd = str(tmp_path / "wd")
  args = ["--config=configs/gshard.py", f"--workdir={wd}", *TINY, "--config.train.steps=100000",
          "--config.train.log_every=1", "--config.train.checkpoint_every=100000",
          "--config.train.eval_every=100000"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "run.py", *args], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  seen = 0
  for line in proc.stdout:       # wait for a few real steps, then press Ctrl-C
    if line.startswith("step "):
      seen += 1
      if seen == 5:
        proc.send_signal(signal.SIGINT)
        break
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 130, err[-2000:]
  step = int(re.search(r"interrupted at step (\d+)/", out).group(1))
  assert "Traceback" not in err, err
  assert os.listdir(os.path.join(wd, "checkpoints")) == [str(step)]
  assert max(r["step"] for r in read_rows(wd)) == step

  # An earlier crash logged rows past the checkpoint: resuming must not duplicate them.
  with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": step + 1, "split": "train", "loss": 0.0}) + "\n")
  p = run(*args[:-3], f"--config.train.steps={step + 3}", "--config.train.log_every=1")
  assert f"resumed from {wd} at step {step}" in p.stdout
  keys = [(r["step"], r["split"]) for r in read_rows(wd)]
  assert len(keys) == len(set(keys))
  assert [s for s, split in keys if split == "train"][-3:] == [step + 1, step + 2, step + 3]


BAD = [
    # (id, argv (workdir is appended), expected one-line message)
    ("unknown_key", ["--config=configs/gshard.py", "--config.model.moe.num_expertz=8"],
     "config.model.moe.num_expertz: no such setting; nearest: model.moe.num_experts"),
    ("missing_config_file", ["--config=configs/no_such.py"],
     "--config=configs/no_such.py: file not found"),
    ("invalid_value", ["--config=configs/gshard.py", "--config.model.moe.top_k=99"],
     "config.model.moe.top_k: must be <= model.moe.num_experts=16, got 99"),
    ("empty_data", ["--config=configs/dense.py", "--config.data.path={empty}"],
     "config.data.path: '{empty}' is empty"),
    ("short_data", ["--config=configs/dense.py", "--config.data.path={short}"],
     "fewer than one batch"),
    ("workdir_is_a_file", ["--config=configs/dense.py", "--workdir={file}"],
     "--workdir={file}: is a file, not a directory"),
    ("eval_without_checkpoint", ["--mode=eval"], "holds no checkpoint; train first"),
    ("sample_without_workdir", ["--mode=sample", "--workdir={missing}"], "no such directory"),
]


@pytest.mark.parametrize("name,argv,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_clear_line(tmp_path, name, argv, message):
  paths = {"empty": tmp_path / "empty.txt", "short": tmp_path / "short.txt",
           "file": tmp_path / "a_file", "missing": tmp_path / "missing"}
  paths["empty"].write_bytes(b"")
  paths["short"].write_bytes(b"too short")
  paths["file"].write_text("x")
  wd = tmp_path / "wd"
  wd.mkdir()
  fill = lambda s: s.format(**{k: str(v) for k, v in paths.items()})
  argv = [fill(a) for a in argv]
  if not any(a.startswith("--workdir=") for a in argv):
    argv.append(f"--workdir={wd}")
  p = run(*argv, check=False, timeout=120)
  assert p.returncode == 2, p.stdout + p.stderr
  assert p.stderr.strip() == f"run.py: error: {fill(message)}" or (
      fill(message) in p.stderr and len(p.stderr.strip().splitlines()) == 1), p.stderr
  assert "Traceback" not in p.stderr and "--help" not in p.stderr and "flags:" not in p.stdout
  assert os.listdir(wd) == [], "a failed start must not write into the workdir"


def test_read_only_workdir_is_one_clear_line(tmp_path):
  wd = tmp_path / "ro"
  wd.mkdir()
  if os.geteuid() == 0:     # root ignores permission bits; an immutable directory stops it
    if subprocess.run(["chattr", "+i", str(wd)]).returncode != 0:
      pytest.skip("no way to make a read-only directory here")
  else:
    os.chmod(wd, 0o555)
  try:
    p = run("--config=configs/dense.py", f"--workdir={wd}", check=False, timeout=120)
  finally:
    if os.geteuid() == 0:
      subprocess.run(["chattr", "-i", str(wd)])
  assert p.returncode == 2
  assert p.stderr.startswith(f"run.py: error: --workdir={wd}: cannot write there")
  assert "Traceback" not in p.stderr
