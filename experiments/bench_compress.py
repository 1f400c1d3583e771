"""Peak memory of compression against the model's size (moejax/compress/).

  python experiments/bench_compress.py --num_layers=16 --method=frequency

Writes a model of random parameters (DeepSeekMoE-style: ``--experts`` routed experts of
``--expert_hidden`` units, top-``--top_k``, one shared expert) as a workdir, one array at a time,
then runs ``python -m moejax.compress`` on it in a fresh process and reports that process's peak
resident memory (ru_maxrss, from OUT/compression.json) against the checkpoint's size and this
machine's RAM. Compression reads the model one array at a time into the arrays its calibration
forward pass uses and writes the result one MoE layer at a time: the peak is about one model
(plus one for the compressed model measured afterwards, which is smaller), never the model
three times over as a training state (parameters + two Adam moments) would be.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from moejax import config as config_lib  # noqa: E402
from moejax import logs  # noqa: E402
from moejax.convert.hf import _abstract_params, _path_leaves, _write_workdir  # noqa: E402
from moejax.logs import progress as say  # noqa: E402

_LAYERS = flags.DEFINE_integer("num_layers", 16, "Decoder layers (all MoE).")
_D = flags.DEFINE_integer("d_model", 1024, "Model width.")
_EXPERTS = flags.DEFINE_integer("experts", 64, "Routed experts per layer.")
_HIDDEN = flags.DEFINE_integer("expert_hidden", 512, "Hidden units per routed expert.")
_TOPK = flags.DEFINE_integer("top_k", 8, "Routed experts per token.")
_METHOD = flags.DEFINE_string("method", "frequency", "Compression method.")
_KEEP = flags.DEFINE_float("keep", 0.5, "Share of expert parameters kept.")
_TOKENS = flags.DEFINE_integer("tokens", 2048, "Calibration and evaluation tokens.")
_OUT = flags.DEFINE_string("out_dir", "experiments/results/bench_compress", "Output directory.")
_WORK = flags.DEFINE_string("work_root", "workdir/bench_compress", "Model directories.")
_QUICK = flags.DEFINE_bool("quick", False, "A tiny model (smoke test of the script).")


def _config():
  c = config_lib.base_config()
  heads = max(_D.value // 128, 1)
  over = {"model.d_model": _D.value, "model.num_layers": _LAYERS.value,
          "model.num_heads": heads, "model.num_kv_heads": heads, "model.head_dim": 128,
          "model.moe.routed_experts": _EXPERTS.value, "model.moe.active_experts": _TOPK.value,
          "model.moe.expert_hidden": _HIDDEN.value, "model.moe.num_shared_experts": 1,
          "model.moe.renormalize": False, "data.corpus_bytes": 300_000, "mesh.num_devices": 1}
  if _QUICK.value:
    over.update({"model.d_model": 64, "model.num_layers": 2, "model.num_heads": 2,
                 "model.num_kv_heads": 2, "model.head_dim": 32, "model.moe.routed_experts": 8,
                 "model.moe.active_experts": 2, "model.moe.expert_hidden": 64})
  return config_lib.validate(config_lib.apply_overrides(c, over))


def _random_leaves(shapes, seed: int = 0):
  """(path, array) of random parameters, one at a time (norm scales at 1)."""
  rng = np.random.default_rng(seed)
  for path, shape in _path_leaves(shapes):
    if path[-1] == "scale":
      yield path, np.ones(shape.shape, np.float32)
    else:
      fan_in = shape.shape[-2] if len(shape.shape) > 1 else 1
      yield path, (rng.standard_normal(shape.shape, np.float32) / np.sqrt(fan_in))


def main(argv):
  del argv
  logs.setup_console_logging()
  config = _config()
  _, shapes = _abstract_params(config)
  model_bytes = sum(int(np.prod(s.shape)) * 4 for s in jax.tree.leaves(shapes))
  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  src = os.path.join(_WORK.value, "model")
  out = os.path.join(_WORK.value, "compressed")
  shutil.rmtree(_WORK.value, ignore_errors=True)
  os.makedirs(_WORK.value)
  say(f"writing a {model_bytes / 2**30:.2f} GiB model ({model_bytes / ram:.0%} of "
      f"{ram / 2**30:.1f} GiB RAM) to {src}")
  t0 = time.time()
  _write_workdir(src, config, _random_leaves(shapes))
  written = time.time() - t0
  cmd = [sys.executable, "-m", "moejax.compress", f"--workdir={src}", f"--out={out}",
         f"--method={_METHOD.value}", f"--keep={_KEEP.value}",
         f"--calibration_tokens={_TOKENS.value}", f"--eval_tokens={_TOKENS.value}"]
  say(" ".join(cmd))
  p = subprocess.run(cmd, capture_output=True, text=True)
  if p.returncode:
    raise SystemExit(f"compression failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
  print(p.stdout.strip())
  report = json.load(open(os.path.join(out, "compression.json")))
  peak = report["peak_rss_bytes"]
  result = {"model_bytes": model_bytes, "ram_bytes": ram, "peak_rss_bytes": peak,
            "peak_over_model": peak / model_bytes, "model_over_ram": model_bytes / ram,
            "compressed_bytes": report["after"]["sizes"]["bytes"], "seconds": report["seconds"],
            "write_seconds": written, "method": _METHOD.value, "keep": _KEEP.value,
            "config": {k: v for k, v in config_lib.flatten(config).items()
                       if k.startswith("model.")}}
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "results.json"), "w") as f:
    json.dump(result, f, indent=1)
  line = (f"model {model_bytes / 2**30:.2f} GiB ({model_bytes / ram:.0%} of RAM), compressed to "
          f"{result['compressed_bytes'] / 2**30:.2f} GiB by --method={_METHOD.value} "
          f"--keep={_KEEP.value} in {report['seconds']:.0f} s; peak RSS "
          f"{peak / 2**30:.2f} GiB = {peak / model_bytes:.2f}x the model")
  with open(os.path.join(_OUT.value, "results.md"), "w") as f:
    f.write(line + "\n")
  say(line)
  shutil.rmtree(_WORK.value, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
