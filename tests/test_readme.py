"""Every command the README and the docs/ pages show is run here as written (smaller through
documented overrides), or listed with the test that runs it, or with why no CPU test can (then
CI runs it itself)."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import FAST_COMPILE, ROOT

README = os.path.join(ROOT, "README.md")
DOCS = sorted(os.path.join(ROOT, "docs", n) for n in os.listdir(os.path.join(ROOT, "docs"))
              if n.endswith(".md"))
SHARED_TINYSHAKESPEARE = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")

# Small settings appended to README commands (later flags override earlier ones).
SMALL = [
    "--config.model.d_model=32", "--config.model.num_layers=2", "--config.model.head_dim=8",
    "--config.data.seq_len=32", "--config.data.batch_size=8", "--config.data.eval_batches=2",
    "--config.data.corpus_bytes=40000", "--config.train.steps=12",
    "--config.train.warmup_steps=2", "--config.train.log_every=6", "--config.train.eval_every=100",
    "--config.train.checkpoint_every=12", "--config.sample.num_tokens=16",
]

# Commands not run by this file, and why. Anything else the README shows must run below.
ELSEWHERE = {
    "make test": "is CI itself (.ci/run)",
    "make test-fast": "runs a subset of `make test`",
    "MOEJAX_TEST_XLA_DEFAULTS=1 make test": (
        "is CI again under other compiler flags (about 25 minutes); tests/test_conftest.py "
        "checks what the switch sets"),
    "make bench": "installs torch and runs minutes of benchmarks; smoke-tested as "
                  "`bench_moe.py --quick` in test_bench_smoke",
    "pip install -e .": "what `make` runs on every fresh machine (CI)",
    ("XLA_FLAGS=--xla_force_host_platform_device_count=4 python run.py ... "
     "--coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id=0"): (
        "tests/parallel/test_multihost.py runs two such processes against one"),
    "JAX_PLATFORMS=cuda python -m pytest tests/pallas_kernels": "needs a GPU",
    "make gpu-wheels": "downloads wheels for an offline GPU machine (run by hand before a GPU run)",
    "python experiments/bench_kernels.py --dtype=bfloat16": (
        "Pallas kernels at speed need a GPU/TPU; test_bench_kernels_smoke runs the CPU backends"),
    "python experiments/bench_moe.py --dtype=bfloat16 --backends=pallas,ragged_dot --notorch": (
        "Pallas kernels at speed need a GPU/TPU (correctness runs in tests/pallas_kernels)"),
}


def readme_commands() -> list[str]:
  """Shell commands of the README and every docs/ page: in ```bash blocks (continuations
  joined, comments dropped) and in inline code that starts like a command."""
  text = "\n".join(open(p).read() for p in [README] + DOCS)
  out = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    for line in block.replace("\\\n", " ").splitlines():
      line = re.sub(r"\s+#.*$", "", line).strip()
      if line and not line.startswith("#"):
        out.append(re.sub(r"\s+", " ", line))
  for code in re.findall(r"`([^`\n]+)`", text):
    if re.match(r"([A-Z][A-Z0-9_]*=\S* )*(python |make |pip )", code):
      out.append(code.strip())
  return list(dict.fromkeys(out))


def python_example(path: str = README) -> str:
  """The first ```python block of ``path`` (README's "Use from Python", docs/python.md)."""
  text = open(path).read()
  section = text.split("## Use from Python", 1)[1] if path == README else text
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _run(cmd, cwd, env=None, timeout=900):
  # As a user runs them: in the environment `make` built (`source .venv/bin/activate`), on the
  # machine's one CPU device, not the 8 simulated ones of this process (conftest): with 8
  # device threads on 2 cores a collective can miss XLA's 40 s rendezvous under load. A command
  # that needs devices sets XLA_FLAGS itself (and then compiles with XLA's defaults).
  path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PATH=path, **{"XLA_FLAGS": FAST_COMPILE, **(env or {})})
  p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                     shell=isinstance(cmd, str))
  assert p.returncode == 0, f"{cmd}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
  return p.stdout


def _data_override():
  # The README trains on ../shared data; a clone without it uses the embedded corpus.
  return [] if os.path.isfile(SHARED_TINYSHAKESPEARE) else ["--config.data.path="]


RUN_HERE = set()


def runs(*commands):
  RUN_HERE.update(commands)
  return lambda f: f


def test_every_readme_command_is_accounted_for():
  missing = [c for c in readme_commands() if c not in RUN_HERE and c not in ELSEWHERE]
  assert not missing, f"README commands with no test: {missing}"
  stale = [c for c in list(RUN_HERE) + list(ELSEWHERE) if c not in readme_commands()]
  assert not stale, f"tested commands no longer in the README: {stale}"


GSHARD_TRAIN = ("python run.py --config=configs/gshard.py --workdir=runs/gshard --mode=train "
                "--config.data.path=../shared/data/tinyshakespeare.txt "
                "--config.model.moe.num_experts=8")
GSHARD_EVAL = "python run.py --workdir=runs/gshard --mode=eval"
GSHARD_SAMPLE = ("python run.py --workdir=runs/gshard --mode=sample "
                 "--config.sample.prompt=\"ROMEO:\" --config.sample.temperature=0")


GEN_SAMPLE = ("python run.py --workdir=runs/gshard --mode=sample --config.sample.prompt=\"ROMEO:\" "
              "--config.sample.top_k=40 --config.sample.top_p=0.9 "
              "--config.sample.num_tokens=100")


ANALYZE = ("python run.py --workdir=runs/gshard --mode=analyze "
           "--config.analyze.sources=generated,../shared/data/tinyshakespeare.txt,"
           "../shared/data/wikitext2_valid.txt")
STEER_EVALS = ["python run.py --workdir=runs/gshard --mode=eval --config.steer.deactivate=1:3",
               "python run.py --workdir=runs/gshard --mode=eval "
               "--config.steer.capacity_factor=1.0 --config.steer.overflow=reroute",
               "python run.py --workdir=runs/gshard --mode=eval --config.steer.skip_rate=0.3"]
STEER_SAMPLE = ("python run.py --workdir=runs/gshard --mode=sample "
                "--config.steer.contrast_weight=0.5 --config.sample.temperature=0")
COMPRESS = ["python -m moejax.compress --workdir=runs/gshard --out=runs/gshard-pruned "
            "--method=frequency --keep=0.5",
            "python -m moejax.compress --workdir=runs/gshard --out=runs/gshard-neurons "
            "--method=neuron --keep=0.5 --calibration=../shared/data/wikitext2_valid.txt"]
COMPRESS_EVAL = "python run.py --workdir=runs/gshard-pruned --mode=eval"
COMPRESS_TUNE = "python run.py --mode=train --workdir=runs/gshard-pruned --config.train.steps=100"


@pytest.mark.slow
@runs(GSHARD_TRAIN, GSHARD_EVAL, GSHARD_SAMPLE, GEN_SAMPLE, ANALYZE, *STEER_EVALS, STEER_SAMPLE,
      *COMPRESS, COMPRESS_EVAL, COMPRESS_TUNE)
def test_running_experiments_commands(tmp_path):
  """The trained run of docs/running.md, then what generation, analysis, steering and
  compression (docs/compression.md, commands and Python example) do with it."""
  runs_dir = os.path.join(ROOT, "runs", "gshard")
  made = [runs_dir] + [os.path.join(ROOT, "runs", n) for n in ("gshard-pruned", "gshard-neurons",
                                                                "gshard-merged")]
  for d in made:
    shutil.rmtree(d, ignore_errors=True)
  try:
    out = _run(f"{GSHARD_TRAIN} {' '.join(SMALL + _data_override())}", ROOT)
    assert "final | step 12" in out
    out = _run(GSHARD_EVAL, ROOT)
    assert "eval | step 12" in out and "data: " in out
    out = _run(GSHARD_SAMPLE, ROOT)
    assert "ROMEO:" in out
    # the small run's model is 32 positions long: fewer new tokens than the README's 100
    out = _run(f"{GEN_SAMPLE} --config.sample.num_tokens=16", ROOT)
    assert "ROMEO:" in out and "16 new tokens: prefill" in out
    shared = os.path.isfile(SHARED_TINYSHAKESPEARE)
    out = _run(f"{ANALYZE} --config.analyze.tokens=512 --config.analyze.milp_time_limit=2" + (
        "" if shared else " --config.analyze.sources=generated"), ROOT)
    assert "**Expert placement** on 4 devices" in out
    names = ["generated", "tinyshakespeare", "wikitext2_valid"] if shared else ["generated"]
    for name in names:
      assert os.path.isfile(os.path.join(runs_dir, "analysis", f"traces_{name}.npz"))
    for command, what in zip(STEER_EVALS, ("changed the experts of", "re-routed", "skipped")):
      out = _run(command, ROOT)
      assert "eval | step 12" in out and "steering changed the experts of" in out and what in out
    out = _run(f"{STEER_SAMPLE} --config.sample.num_tokens=8", ROOT)
    assert "self-contrast: (1 + 0.5) x logits - 0.5 x logits routed rank2" in out
    small = "--calibration_tokens=512 --eval_tokens=512"
    out = _run(f"{COMPRESS[0]} {small}", ROOT)
    assert "validation loss on" in out and "routed experts" in out
    out = _run(f"{COMPRESS[1]} {small}" + ("" if shared else " --calibration=generated"), ROOT)
    assert "peak RSS" in out
    assert "eval | step 0" in _run(COMPRESS_EVAL, ROOT)
    out = _run(f"{COMPRESS_TUNE} --config.train.steps=4", ROOT)
    assert "no --config given" in out and "final | step 4" in out
    example = python_example(os.path.join(ROOT, "docs", "compression.md"))
    out = _run([sys.executable, "-c", "import moejax\n" + example.replace(
        'keep=0.5)', 'keep=0.5, calibration_tokens=512, eval_tokens=512)') +
                "print(report['after']['loss'])"], ROOT)
    assert ("tinyshakespeare" if shared else "generated") in out.splitlines()[-1]
  finally:
    for d in made:
      shutil.rmtree(d, ignore_errors=True)


UP_DENSE = "python run.py --config=configs/dense.py --workdir=runs/dense --mode=train"
UP_MOE = ("python run.py --config=configs/gshard.py --workdir=runs/gshard_up --mode=upcycle "
          "--config.upcycle.source=runs/dense --config.upcycle.method=split")
UP_TRAIN = ("python run.py --config=configs/gshard.py --workdir=runs/gshard_up --mode=train "
            "--config.upcycle.source=runs/dense --config.upcycle.method=split")
UP_MOTE = ("python run.py --config=configs/mote.py --workdir=runs/mote --mode=train "
           "--config.upcycle.source=runs/dense")
PACK = "python -m moejax.convert --from=moejax --to=packed runs/mote runs/mote_packed"


@pytest.mark.slow
@runs(UP_DENSE, UP_MOE, UP_TRAIN, UP_MOTE, PACK)
def test_upcycling_commands():
  dirs = [os.path.join(ROOT, "runs", n) for n in ("dense", "gshard_up", "mote", "mote_packed")]
  for d in dirs:
    shutil.rmtree(d, ignore_errors=True)
  try:
    small = " ".join(SMALL + _data_override())
    _run(f"{UP_DENSE} {small}", ROOT)
    out = _run(f"{UP_MOE} {small}", ROOT)
    assert "up-cycled from runs/dense (step 12, method split)" in out
    assert "dense source | step 12" in out and "up-cycled (split) | step 0" in out
    out = _run(f"{UP_TRAIN} {small}", ROOT)
    assert "final | step 12" in out
    out = _run(f"{UP_MOTE} {small}", ROOT)
    assert "up-cycled from runs/dense" in out and "final | step 12" in out
    out = _run(PACK, ROOT)
    assert "packed the ternary experts of runs/mote" in out and "routed experts" in out
  finally:
    for d in dirs:
      shutil.rmtree(d, ignore_errors=True)


CONVERT_IN = "python -m moejax.convert --from=hf --to=moejax hf_model runs/imported"
CONVERT_SAMPLE = "python run.py --workdir=runs/imported --mode=sample --config.sample.num_tokens=20"
CONVERT_OUT = "python -m moejax.convert --from=moejax --to=hf runs/imported runs/exported_hf"
CONVERT_TORCH = ("python -m moejax.convert --from=moejax --to=torch runs/imported "
                 "runs/exported_torch")


@pytest.mark.slow
@runs(CONVERT_IN, CONVERT_SAMPLE, CONVERT_OUT, CONVERT_TORCH)
def test_conversion_commands():
  """The README's conversion commands on a tiny random Qwen2-MoE saved as `hf_model`."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  paths = [os.path.join(ROOT, p) for p in ("hf_model", "runs/imported", "runs/exported_hf",
                                           "runs/exported_torch")]
  for p in paths:
    shutil.rmtree(p, ignore_errors=True)
  try:
    torch.manual_seed(0)
    cfg = transformers.Qwen2MoeConfig(
        vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, shared_expert_intermediate_size=24)
    transformers.Qwen2MoeForCausalLM(cfg).save_pretrained(paths[0])
    assert "imported qwen2_moe from hf_model" in _run(CONVERT_IN, ROOT)
    out = _run(CONVERT_SAMPLE, ROOT)
    assert out.strip()
    assert "exported runs/imported as qwen2_moe" in _run(CONVERT_OUT, ROOT)
    back = transformers.AutoModelForCausalLM.from_pretrained(paths[2])
    assert type(back).__name__ == "Qwen2MoeForCausalLM"
    assert "as a PyTorch module" in _run(CONVERT_TORCH, ROOT)
    assert os.path.isfile(os.path.join(paths[3], "modeling_moejax.py"))
  finally:
    for p in paths:
      shutil.rmtree(p, ignore_errors=True)


EP_COMMAND = ("XLA_FLAGS=--xla_force_host_platform_device_count=8 python run.py "
              "--config=configs/gshard.py --workdir=runs/ep --config.mesh.data=2 "
              "--config.mesh.expert=4")


@pytest.mark.slow
@runs(EP_COMMAND)
def test_expert_parallel_command():
  runs_dir = os.path.join(ROOT, "runs", "ep")
  shutil.rmtree(runs_dir, ignore_errors=True)
  try:
    out = _run(f"{EP_COMMAND} {' '.join(SMALL)}", ROOT)
    assert "expert-parallel: shard_map over mesh axis 'expert' (4 devices" in out
    assert "final | step 12" in out
  finally:
    shutil.rmtree(runs_dir, ignore_errors=True)


@pytest.mark.slow
@runs("make run", 'make run ARGS="--config.train.steps=100"')
def test_make_run(tmp_path):
  wd = tmp_path / "default"
  args = " ".join(SMALL + ["--config.train.steps=20", "--config.train.checkpoint_every=20"])
  out = _run(["make", "run", f"WORKDIR={wd}", f"ARGS={args}"], ROOT)
  assert "final | step 20" in out and "sample (temperature" in out


STEER_EXPERIMENT = ("python experiments/steer.py --data_path=../shared/data/tinyshakespeare.txt "
                    "--other_path=../shared/data/wikitext2_valid.txt")


@pytest.mark.slow
@runs(STEER_EXPERIMENT)
def test_steer_experiment_command(tmp_path):
  other = "" if os.path.isfile(SHARED_TINYSHAKESPEARE) else "--other_path=generated"
  out, results = _run_experiment(STEER_EXPERIMENT, f"--quick --steps=12 --seeds=0,1 "
                                 f"--tokens=256 --skip_rates=0.3 --capacity_factors=1.0 "
                                 f"--milp_seconds=1 {other}", tmp_path)
  for table in ("**Deactivating experts**", "**Dynamic skipping**",
                "**Capacity-aware inference**", "**Placement**", "**Offloading cache**"):
    assert table in results
  assert os.path.isfile(tmp_path / "out" / "steer.png")


COMPARE = ("python experiments/compare_routing.py --sizes=tiny,small "
           "--data_path=../shared/data/tinyshakespeare.txt")
BALANCE = "python experiments/compare_balance.py --data_path=../shared/data/tinyshakespeare.txt"


def _run_experiment(command: str, flags: str, tmp_path) -> tuple[str, str]:
  """Runs an experiment script's README command (with the embedded corpus where ../shared is
  missing) into tmp_path; -> (its stdout, its results.md)."""
  data = "" if os.path.isfile(SHARED_TINYSHAKESPEARE) else "--data_path="
  out = _run(f"{command} {flags} --out_dir={tmp_path / 'out'} --work_root={tmp_path / 'work'} "
             f"{data}", ROOT)
  return out, open(tmp_path / "out" / "results.md").read()


@pytest.mark.slow
@runs(COMPARE)
def test_compare_routing_command(tmp_path):
  # One size of the command's two (the later --sizes wins): the per-size loop is the same code.
  out, text = _run_experiment(COMPARE, "--quick --steps=4 --seeds=0,1 --configs=dense,gshard "
                              "--sizes=tiny", tmp_path)
  assert "size tiny" in text and "dense vs gshard" in text, out
  assert "estimated total" in out
  for name in ("finals.png", "gaps_vs_steps.png", "loss_curves_tiny.png"):
    assert os.path.isfile(tmp_path / "out" / name), name


ROUTERS_CMD = "python experiments/compare_routers.py --data_path=../shared/data/tinyshakespeare.txt"


@pytest.mark.slow
@runs(ROUTERS_CMD)
def test_compare_routers_command(tmp_path):
  out, text = _run_experiment(ROUTERS_CMD, "--quick --steps=4 --seeds=0 --noestimate "
                              "--routers=topk_softmax,sigmoid_v3", tmp_path)
  assert "sigmoid_v3 vs topk_softmax" in text and "experts_per_token" in text, out


@pytest.mark.slow
@runs(BALANCE)
def test_compare_balance_command(tmp_path):
  out, text = _run_experiment(BALANCE, "--quick --steps=4 --seeds=0 --noestimate", tmp_path)
  assert "micro_batch vs global_batch" in text and "seq_load_max_over_mean" in text, out
  assert os.path.isfile(tmp_path / "out" / "curves.png")


HMOE_CMD = "python experiments/compare_hmoe.py --data_path=../shared/data/tinyshakespeare.txt"


@pytest.mark.slow
@runs(HMOE_CMD)
def test_compare_hmoe_command(tmp_path):
  out, text = _run_experiment(HMOE_CMD, "--quick --steps=3 --seeds=0 --noestimate "
                              "--configs=moe_topk,hmoe_topp", tmp_path)
  assert "hmoe_topp vs moe_topk" in text and "routed_params" in text, out
  for name in ("curves.png", "sizes.png"):
    assert os.path.isfile(tmp_path / "out" / name), name


MOTE_CMD = "python experiments/compare_mote.py --data_path=../shared/data/tinyshakespeare.txt"


@pytest.mark.slow
@runs(MOTE_CMD)
def test_compare_mote_command(tmp_path):
  out, text = _run_experiment(MOTE_CMD, "--quick --steps=3 --seeds=0 --noestimate "
                              "--configs=mote,fp_equal_memory", tmp_path)
  assert "mote vs fp_equal_memory" in text and "routed_mib" in text, out
  assert os.path.isfile(tmp_path / "out" / "memory.png")


MOH_CMD = "python experiments/compare_moh.py --data_path=../shared/data/tinyshakespeare.txt"
MERGING_CMD = ("python experiments/compare_merging.py "
               "--data_path=../shared/data/tinyshakespeare.txt")


@pytest.mark.slow
@runs(MOH_CMD, MERGING_CMD)
def test_compare_moh_and_merging_commands(tmp_path):
  # MoH trains with only the selected heads computed here (the README's runs mask every head)
  out, text = _run_experiment(MOH_CMD, "--quick --steps=3 --seeds=0 --noestimate "
                              "--configs=attention,moh_50 --head_compute=selected",
                              tmp_path / "moh")
  assert "moh_50 vs attention" in text and "attention_flops" in text, out
  assert "| moh_50 |" in text.split("ms / step")[1], out           # the interleaved step time
  out, text = _run_experiment(MERGING_CMD, "--quick --steps=3 --seeds=0 --noestimate "
                              "--configs=top1,lory --step_time_steps=0", tmp_path / "merging")
  assert "lory vs top1" in text and "Lory segment 8 of 32" in text, out


BENCH_DECODE = "python experiments/bench_decode.py"


@pytest.mark.slow
@runs(BENCH_DECODE)
def test_decode_benchmark_command(tmp_path):
  pytest.importorskip("transformers")
  out = _run(f"{BENCH_DECODE} --quick --models=fine64,mla --out_dir={tmp_path}", ROOT)
  text = open(tmp_path / "results.md").read()
  assert "| fine64 | 1 | 32 | " in text and "decode vs HF" in text, out
  assert "small-batch MoE path" in text and "of the bound" in text and "absorbed speed-up" in text


COMPRESSION_CMD = ("python experiments/compare_compression.py "
                   "--data_path=../shared/data/tinyshakespeare.txt "
                   "--other_path=../shared/data/wikitext2_valid.txt")
BENCH_COMPRESS = "python experiments/bench_compress.py --num_layers=16 --method=frequency"


@pytest.mark.slow
@runs(COMPRESSION_CMD, BENCH_COMPRESS)
def test_compression_experiment_and_benchmark_commands(tmp_path):
  other = "" if os.path.isfile(SHARED_TINYSHAKESPEARE) else "--other_path=generated"
  # one seed and one method (the per-seed and per-method loops are the same code)
  out, text = _run_experiment(COMPRESSION_CMD, f"--quick --steps=4 --seeds=0 --keeps=0.5 "
                              f"--methods=neuron --finetune_steps=2 "
                              f"--calibration_tokens=128 --eval_tokens=128 {other}", tmp_path)
  assert "| neuron | " in text and "Paper directions" in text, out
  assert os.path.isfile(tmp_path / "out" / "compression.png")
  out = _run(f"{BENCH_COMPRESS} --quick --tokens=256 --out_dir={tmp_path / 'bench'} "
             f"--work_root={tmp_path / 'bench_work'}", ROOT)
  result = json.load(open(tmp_path / "bench" / "results.json"))
  assert result["peak_rss_bytes"] > 0 and result["compressed_bytes"] < result["model_bytes"]


BENCH_MOH = "python experiments/bench_moh.py"
BENCH_MERGE = "python experiments/bench_merge.py"


@pytest.mark.slow
@runs(BENCH_MOH, BENCH_MERGE)
def test_moh_and_merge_benchmark_commands(tmp_path):
  _run(f"{BENCH_MOH} --quick --out_dir={tmp_path / 'moh'}", ROOT)
  rows = json.load(open(tmp_path / "moh" / "results.json"))
  assert {r["case"] for r in rows} >= {"attention", "masked 2/4", "selected 2/4", "selected 3/4"}
  assert all(r["train_s"] > 0 for r in rows)
  assert [r["flop_ratio"] for r in rows if r["case"] == "selected 2/4"][0] < 1
  assert os.path.isfile(tmp_path / "moh" / "moh_time.png")
  _run(f"{BENCH_MERGE} --quick --out_dir={tmp_path / 'merge'}", ROOT)
  rows = json.load(open(tmp_path / "merge" / "results.json"))
  assert [r["merge"] for r in rows] == ["sequence", "causal_segments"]
  assert all(0 < r["merge_share"] for r in rows)


@pytest.mark.slow
def test_bench_smoke(tmp_path):
  out = _run([sys.executable, "experiments/bench_moe.py", "--quick", "--notorch", "--nosweep",
              "--noprofile", "--backends=xla", f"--out_dir={tmp_path}"], ROOT)
  res = json.load(open(tmp_path / "results.json"))
  assert [s["shape"] for s in res["shapes"]] == ["balanced E16 k2 F1024",
                                                 "fine-grained E64 k6 F256",
                                                 "zipf(1.2) E16 k2 F1024"], out
  assert all(r["x_dense"] > 0 for s in res["shapes"] for r in s["rows"])
  hmoe = res["hmoe"]
  # --quick: the ladder of most blocks, and the HEAPr-pruned layer; both paths of each
  assert [h["ladder"] for h in hmoe] == ["geometric", "HEAPr-pruned default model"]
  assert all(r["seconds"] > 0 for h in hmoe for r in h["rows"])
  assert {r["impl"] for r in hmoe[1]["rows"]} >= {"heterogeneous (fused)",
                                                  "heterogeneous (blocks)", "homogeneous"}


def test_bench_kernels_smoke(tmp_path):
  """The kernel benchmark of experiments/gpu_check.sh, on the CPU backends (pallas needs a
  GPU/TPU): every op of every shape is timed against dense and ragged_dot, none fails."""
  out = _run([sys.executable, "experiments/bench_kernels.py", "--quick", "--backends=xla",
              "--dtype=float32", f"--out_dir={tmp_path}"], ROOT)
  assert "FAILED" not in out
  rows = json.load(open(tmp_path / "results.json"))["rows"]
  ops = ("gmm", "d_lhs", "tgmm")
  assert {(r["op"], r["impl"]) for r in rows} == {
      (op, impl) for op in ops for impl in ("dense", "ragged_dot", "xla", "batched")}
  # The batched-GEMM ceiling exists only where every group has the same rows.
  assert {r["shape"] for r in rows if r["impl"] == "batched"} == {
      "balanced E16 k2 F1024", "fine-grained E64 k6 F256"}
  assert all(r["tflops"] > 0 and r["x_dense"] > 0 for r in rows)


@pytest.mark.slow
def test_use_from_python_example_runs_as_written(tmp_path):
  script = tmp_path / "example.py"
  script.write_text(python_example())
  out = _run([sys.executable, str(script)], str(tmp_path))
  assert "(2, 64, 256) (63,)" in out and "val_data" in out
  run = tmp_path / "runs" / "quickstart"
  for name in ("config.json", "analysis/report.md", "analysis/traces_generated.npz"):
    assert os.path.isfile(run / name), name


@pytest.mark.slow
def test_python_tour_in_docs_runs_as_written(tmp_path):
  script = tmp_path / "tour.py"
  script.write_text(python_example(os.path.join(ROOT, "docs", "python.md")))
  out = _run([sys.executable, str(script)], str(tmp_path))
  assert "(2, 64, 256) (63,)" in out and "val_data" in out
  assert os.path.isfile(tmp_path / "runs" / "quickstart" / "run.png")
