"""Checkpoint conversion: time and peak memory against checkpoint size, both directions.

For each size a random Mixtral-layout moejax workdir is generated (experts dominate, as in real
MoEs), then converted in a fresh subprocess each, so peak RSS belongs to one conversion:

  export   moejax workdir -> HF safetensors     (streams one parameter at a time)
  import   HF safetensors -> moejax workdir     (reads tensor by tensor; orbax writes a tree)
  torch    moejax workdir -> self-contained PyTorch module + safetensors (streams)

Peak RSS is reported above the subprocess's baseline (interpreter + jax + moejax imported and a
tiny conversion done first, so one-time allocations are not counted) and against the largest
tensor. ``--sizes`` are approximate checkpoint sizes in MB.

  python experiments/bench_convert.py
  python experiments/bench_convert.py --sizes=20 --out_dir=/tmp/bc      # smoke test
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402

_SIZES = flags.DEFINE_list("sizes", ["50", "150", "400"], "Checkpoint sizes (MB, approx.).")
_OUT = flags.DEFINE_string("out_dir", "experiments/results/bench_convert", "Output directory.")

# Runs in a subprocess: argv = direction, src, dst; prints JSON with seconds and RSS.
CHILD = r"""
import json, os, sys, threading, time
sys.path.insert(0, {root!r})
from moejax.convert import export_hf, export_torch, import_hf
warm = {warm!r}
direction, src, dst = sys.argv[1:4]
run = {{"export": lambda s, d: export_hf(s, d, progress=False),
       "import": lambda s, d: import_hf(s, d, progress=False),
       "torch": lambda s, d: export_torch(s, d, progress=False)}}[direction]
run(warm[direction], dst + ".warm")           # one-time allocations (compilers, thread pools)
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
peak, done = [0], threading.Event()
def sample():                                  # current RSS every 2 ms (ru_maxrss would keep
  while not done.is_set():                     # the high-water mark of start-up instead)
    peak[0] = max(peak[0], rss())
    time.sleep(0.002)
base = rss()
thread = threading.Thread(target=sample, daemon=True)
thread.start()
t0 = time.perf_counter()
run(src, dst)
sec = time.perf_counter() - t0
done.set()
thread.join()
print(json.dumps({{"seconds": sec, "baseline": base, "peak": max(peak[0], rss())}}))
"""


def make_workdir(path: str, d_model: int, layers: int, experts: int = 8, seed: int = 0) -> dict:
  """A random Mixtral-layout moejax workdir (parameters only, as an import writes it)."""
  import numpy as np
  from moejax import config as config_lib
  from moejax.convert.hf import _abstract_params, _write_workdir
  import jax
  c = config_lib.apply_overrides(config_lib.base_config(), {
      "model.d_model": d_model, "model.num_layers": layers, "model.num_heads": 8,
      "model.num_kv_heads": 4, "model.head_dim": d_model // 8, "model.ffn_hidden": 4 * d_model,
      "model.moe.routed_experts": experts, "model.moe.active_experts": 2,
      "model.moe.expert_hidden": 2 * d_model, "model.vocab_size": 256})
  _, shapes = _abstract_params(c)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32) * 0.02, shapes)
  _write_workdir(path, c, params)
  sizes = [int(np.prod(s.shape)) * 4 for s in jax.tree.leaves(shapes)]
  return {"bytes": sum(sizes), "largest": max(sizes)}


def measure(direction: str, src: str, dst: str, warm: dict) -> dict:
  code = CHILD.format(root=ROOT, warm=warm)
  p = subprocess.run([sys.executable, "-c", code, direction, src, dst], capture_output=True,
                     text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  if p.returncode:
    raise RuntimeError(p.stderr[-3000:])
  return json.loads(p.stdout.strip().splitlines()[-1])


def sweep(sizes_mb, work: str) -> list[dict]:
  from moejax.convert import export_hf
  warm_wd = os.path.join(work, "warm_wd")
  make_workdir(warm_wd, 64, 1)
  export_hf(warm_wd, os.path.join(work, "warm_hf"), progress=False)
  warm = {"export": warm_wd, "torch": warm_wd, "import": os.path.join(work, "warm_hf")}
  rows = []
  for mb in sizes_mb:
    # ~ 2*3*E*d*2d*4 bytes per layer of experts (E=8): choose d, then layers to reach the size.
    d = 512 if mb >= 100 else 256
    per_layer = 8 * 3 * d * 2 * d * 4
    layers = max(1, round(mb * 2**20 / per_layer))
    wd, hf = os.path.join(work, f"wd{mb}"), os.path.join(work, f"hf{mb}")
    info = make_workdir(wd, d, layers)
    for direction, src, dst in (("export", wd, hf), ("import", hf, wd + "_back"),
                                ("torch", wd, wd + "_torch")):
      r = measure(direction, src, dst, warm)
      rows.append({"direction": direction, "size_mb": info["bytes"] / 2**20,
                   "largest_mb": info["largest"] / 2**20, "seconds": r["seconds"],
                   "rss_above_baseline_mb": (r["peak"] - r["baseline"]) / 2**20,
                   "rss_x_largest": (r["peak"] - r["baseline"]) / info["largest"]})
      print(f"{direction:7s} {rows[-1]['size_mb']:7.1f} MB  {r['seconds']:6.2f} s  peak RSS "
            f"+{rows[-1]['rss_above_baseline_mb']:6.1f} MB = {rows[-1]['rss_x_largest']:.2f}x "
            f"the largest tensor ({rows[-1]['largest_mb']:.1f} MB)", flush=True)
    for p in (wd, hf, wd + "_back", wd + "_torch"):
      shutil.rmtree(p, ignore_errors=True)
  return rows


def main(argv):
  del argv
  work = tempfile.mkdtemp(prefix="bench_convert_")
  try:
    rows = sweep([int(s) for s in _SIZES.value], work)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "results.json"), "w") as fh:
    json.dump(rows, fh, indent=1)
  lines = ["| direction | checkpoint | largest tensor | time | MB/s | peak RSS above baseline |",
           "|---|---|---|---|---|---|"]
  lines += [f"| {r['direction']} | {r['size_mb']:.0f} MB | {r['largest_mb']:.0f} MB | "
            f"{r['seconds']:.2f} s | {r['size_mb'] / r['seconds']:.0f} | "
            f"{r['rss_above_baseline_mb']:.0f} MB ({r['rss_x_largest']:.2f}x largest) |"
            for r in rows]
  with open(os.path.join(_OUT.value, "results.md"), "w") as fh:
    fh.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
