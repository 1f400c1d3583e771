"""Generation speed: prefill and decode tokens/s of moejax.generate against the window re-run
and transformers' generate, the small-batch MoE path, and decode against the memory bound.

  python experiments/bench_decode.py              # three models, batch 1/16, context 128/512
  python experiments/bench_decode.py --quick      # tiny shapes, one batch/context (smoke test)
  python experiments/bench_decode.py --dtype=bfloat16 --nohf    # on an accelerator

Models (random weights, byte vocabulary): "default" (configs/default.py: 63 routed experts
top-7 + 1 shared, d=128), "fine64" (64 experts top-6 of hidden 64, d=256, Mixtral's layout so
transformers runs the same weights) and "mla" (latent attention, 16 sigmoid-routed experts
top-2 + 1 shared, DeepSeek-V3's layout). Per model, batch and context C, the prompts hold
C - new tokens and ``--new`` tokens are generated greedily, so the last steps attend over C
positions. Compared in one process, interleaved rounds, medians:
  window   the re-run of a [B, C] window per new token (what sampling did before the cache):
           one jitted forward per token, argmax at the last position;
  hf       transformers' generate with its KV cache (CPU torch, float32) on the weights
           exported by moejax.convert (default: no HF family has its shared-expert layout);
  moejax   moejax.generate (decode: one lax.while_loop; prefill: one call).
Decode tokens/s = B x (new - 1) / decode time (hf: generate of ``new`` tokens minus generate
of one, i.e. the new - 1 decode steps with generate's own per-step work).
Then at batch 1: the decode step with model.moe.decode_path=gather against grouped (the
training layout), and the MoE layer alone on one row; MLA's absorbed decode against expanding
its latent cache. Last, a model of >= 200 MB of weights
at batch 1: decode time per token against bytes read per token / the copy bandwidth measured
here (bytes = the parameters a token reads: attention, router, shared and k routed experts,
norms, one embedding row, the unembedding; plus the KV cache at the context).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from moejax import config as config_lib  # noqa: E402
from moejax import logs  # noqa: E402
from moejax.api import build_model, init_params  # noqa: E402
from moejax.experiment import report  # noqa: E402
from moejax.inference import generate  # noqa: E402

_OUT = flags.DEFINE_string("out_dir", "experiments/results/bench_decode", "Output directory.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rounds (median reported).")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny shapes, one round (smoke test).")
_HF = flags.DEFINE_bool("hf", True, "Compare with transformers' generate (needs torch).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_NEW = flags.DEFINE_integer("new", 32, "New tokens per prompt.")
_MODELS = flags.DEFINE_list("models", ["default", "fine64", "mla"], "Models to time (MODELS).")

MODELS = {
    "default": {},
    "fine64": {"model.d_model": 256, "model.num_heads": 8, "model.num_kv_heads": 4,
               "model.head_dim": 32, "model.moe.num_experts": 0, "model.moe.segments": 1,
               "model.moe.num_shared_experts": 0, "model.moe.routed_experts": 64,
               "model.moe.active_experts": 6, "model.moe.expert_hidden": 64,
               "model.moe.renormalize": True},
    "mla": {"model.d_model": 256, "model.num_heads": 8, "model.attention": "latent",
            "model.num_kv_heads": 8, "model.head_dim": 48, "model.mla.kv_lora_rank": 64,
            "model.mla.qk_nope_head_dim": 32, "model.mla.qk_rope_head_dim": 16,
            "model.mla.v_head_dim": 32, "model.mla.latent_norm_eps": 1e-6,
            "model.moe.num_experts": 0, "model.moe.segments": 1,
            "model.moe.routed_experts": 16, "model.moe.active_experts": 2,
            "model.moe.num_shared_experts": 1, "model.moe.expert_hidden": 256,
            "model.moe.router": "sigmoid", "model.moe.renormalize": True,
            "model.moe.load_balance_weight": 0.0},
}
QUICK_OVERRIDES = {"model.num_layers": 2, "model.d_model": 64, "model.head_dim": 16,
                   "model.moe.expert_hidden": 32}
BIG = {"model.d_model": 512, "model.num_layers": 2, "model.num_heads": 8, "model.num_kv_heads": 4,
       "model.head_dim": 64, "model.moe.num_experts": 0, "model.moe.segments": 1,
       "model.moe.num_shared_experts": 0, "model.moe.routed_experts": 64,
       "model.moe.active_experts": 4, "model.moe.expert_hidden": 512,
       "model.moe.renormalize": True}


def make_config(overrides: dict):
  from moejax.configs import default
  extra = dict(QUICK_OVERRIDES) if _QUICK.value else {}
  if _QUICK.value and "model.mla.kv_lora_rank" in overrides:
    extra.update({"model.head_dim": 48})
  return config_lib.validate(config_lib.apply_overrides(default.get_config(), {
      **overrides, **extra, "model.max_length": 1024, "model.dtype": _DTYPE.value}))


def prompts(batch: int, length: int, seed: int = 0) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return [list(map(int, rng.integers(0, 256, length))) for _ in range(batch)]


def window_step(model, params, batch: int, context: int):
  """One new token per row the pre-cache way: the forward of a [B, C] window."""
  fn = jax.jit(lambda p, t: jnp.argmax(model.apply({"params": p}, t)[:, -1], axis=-1))
  tokens = jnp.asarray(prompts(batch, context, 1), jnp.int32)
  return lambda: jax.block_until_ready(fn(params, tokens))


class HFRunner:
  """The same weights in transformers (exported through moejax.convert), float32 CPU torch."""

  def __init__(self, config, params, work: str):
    import torch
    import transformers
    from moejax.convert import export_hf
    from moejax.convert.hf import _write_workdir
    self.torch = torch
    wd, out = os.path.join(work, "wd"), os.path.join(work, "hf")
    _write_workdir(wd, config, jax.tree.map(np.asarray, params))
    export_hf(wd, out, progress=False)
    self.model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()

  def prefill(self, batch_prompts):
    ids = self.torch.tensor(batch_prompts)
    return lambda: self._forward(ids)

  def _forward(self, ids):
    with self.torch.no_grad():
      self.model(ids, use_cache=True)

  def generate(self, batch_prompts, new: int):
    ids = self.torch.tensor(batch_prompts)

    def run():
      with self.torch.no_grad():
        self.model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
    return run


def median_times(runs: dict, repeats: int) -> dict:
  """Interleaved rounds after a warm-up call of each; -> median seconds (or of the returned
  (prefill, decode) pairs for moejax.generate)."""
  for fn in runs.values():
    fn()
  got = {name: [] for name in runs}
  for _ in range(repeats):
    for name, fn in runs.items():
      t0 = time.perf_counter()
      out = fn()
      got[name].append(out if isinstance(out, tuple) else time.perf_counter() - t0)
  return {name: tuple(np.median(np.asarray(v), axis=0)) if isinstance(v[0], tuple)
          else float(np.median(v)) for name, v in got.items()}


def bench_model(name: str, overrides: dict, work: str, repeats: int) -> list[dict]:
  config = make_config(overrides)
  model = build_model(config)
  params = init_params(model, config, seed=0)
  hf = None
  if _HF.value and name != "default" and _DTYPE.value == "float32":
    hf = HFRunner(config, params, os.path.join(work, name))
  batches, contexts = ((1,), (32,)) if _QUICK.value else ((1, 16), (128, 512))
  new = min(_NEW.value, 8) if _QUICK.value else _NEW.value
  rows = []
  for batch in batches:
    for context in contexts:
      p = prompts(batch, context - new)

      per_token = {}

      def ours():
        r = generate(model, params, p, new)
        per_token.update(r.cache_bytes_per_token)
        return r.prefill_seconds, r.decode_seconds
      runs = {"moejax": ours, "window": window_step(model, params, batch, context)}
      if hf is not None:
        runs.update(hf_prefill=hf.prefill(p), hf_generate=hf.generate(p, new),
                    hf_generate_1=hf.generate(p, 1))
      t = median_times(runs, repeats)
      prefill, decode = t["moejax"]
      row = dict(model=name, batch=batch, context=context, new=new,
                 cache_bytes_per_token=sum(per_token.values()),
                 prefill_tps=batch * (context - new) / prefill,
                 decode_tps=batch * (new - 1) / decode, window_tps=batch / t["window"])
      row["vs_window"] = row["decode_tps"] / row["window_tps"]
      if hf is not None:
        hf_decode = max(t["hf_generate"] - t["hf_generate_1"], 1e-9)
        row.update(hf_prefill_tps=batch * (context - new) / t["hf_prefill"],
                   hf_decode_tps=batch * (new - 1) / hf_decode)
        row["vs_hf_decode"] = row["decode_tps"] / row["hf_decode_tps"]
        row["vs_hf_prefill"] = row["prefill_tps"] / row["hf_prefill_tps"]
      rows.append(row)
      logs.progress(f"{name} B={batch} C={context}: decode {row['decode_tps']:.0f} tok/s "
                    f"({row['vs_window']:.1f}x window"
                    + (f", {row['vs_hf_decode']:.2f}x transformers" if hf else "") + ")")
  return rows


def with_path(model, path: str):
  s = dataclasses.replace(model.cfg.moe, decode_path=path)
  return model.clone(cfg=dataclasses.replace(model.cfg, moe=s))


def bench_paths(name: str, overrides: dict, repeats: int) -> dict:
  """Batch 1: the decode step with the gathered path vs the training layout; the layer alone."""
  from flax import linen as nn
  from moejax.layers.moe import MoEBlock
  config = make_config(overrides)
  model = build_model(config)
  params = init_params(model, config, seed=0)
  p = prompts(1, 64 if not _QUICK.value else 8)
  new = 16 if not _QUICK.value else 4

  def decode(m):
    return lambda: (0.0, generate(m, params, p, new).decode_seconds)
  t = median_times({"gather": decode(with_path(model, "gather")),
                    "grouped": decode(with_path(model, "grouped"))}, repeats)
  x = jax.random.normal(jax.random.key(0), (1, 1, config.model.d_model))
  layer = {}
  for path in ("gather", "grouped"):
    block = MoEBlock(dataclasses.replace(model.cfg.moe, decode_path=path))
    lp = nn.meta.unbox(block.init(jax.random.key(1), x)["params"])
    fn = jax.jit(lambda q, v, b=block: b.apply({"params": q}, v))
    layer[path] = lambda fn=fn, lp=lp: jax.block_until_ready(fn(lp, x))
  lt = median_times(layer, 3 if _QUICK.value else max(repeats, 20))
  return dict(model=name, decode_gather_ms=t["gather"][1] / (new - 1) * 1e3,
              decode_grouped_ms=t["grouped"][1] / (new - 1) * 1e3,
              step_speedup=t["grouped"][1] / t["gather"][1],
              layer_gather_us=lt["gather"] * 1e6, layer_grouped_us=lt["grouped"] * 1e6,
              layer_speedup=lt["grouped"] / lt["gather"])


def bench_mla_forms(repeats: int) -> list[dict]:
  """MLA decode reading the latent cache with absorbed up-projections against expanding it."""
  config = make_config(MODELS["mla"])
  model = build_model(config)
  params = init_params(model, config, seed=0)
  new = 8 if _QUICK.value else _NEW.value
  rows = []
  for batch, context in ((1, 64),) if _QUICK.value else ((1, 512), (16, 512)):
    p = prompts(batch, context - new)

    def decode(form):
      m = model.clone(cfg=dataclasses.replace(model.cfg, mla_decode=form))
      return lambda: (0.0, generate(m, params, p, new).decode_seconds)
    t = median_times({"absorbed": decode("absorbed"), "expanded": decode("expanded")}, repeats)
    rows.append(dict(batch=batch, context=context,
                     absorbed_ms=t["absorbed"][1] / (new - 1) * 1e3,
                     expanded_ms=t["expanded"][1] / (new - 1) * 1e3,
                     speedup=t["expanded"][1] / t["absorbed"][1]))
  return rows


def copy_bandwidth(nbytes: int = 512 << 20) -> float:
  """Bytes moved per second (read + write) by a NumPy copy of an array larger than the caches."""
  a = np.ones(nbytes // 4, np.float32)
  b = np.empty_like(a)
  np.copyto(b, a)
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    np.copyto(b, a)
    times.append(time.perf_counter() - t0)
  return 2 * nbytes / min(times)


def bytes_per_token(config, params, context: int) -> int:
  """Parameter bytes one token reads at batch 1 (every weight but the unselected experts), plus
  the KV cache at ``context`` positions."""
  cfg = build_model(config).cfg
  s = cfg.moe
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [str(getattr(k, "key", k)) for k in path]
    n = leaf.size * leaf.dtype.itemsize
    if keys[0] == "embed":
      n = leaf.shape[-1] * leaf.dtype.itemsize                    # one row
    elif "experts" in keys:
      n = n * s.routed_k // s.num_routed                          # the k selected experts
    total += n
  kv = 2 * cfg.num_kv_heads * cfg.head_dim * 4 * cfg.num_layers * context
  return total + kv


def bench_memory_bound(repeats: int) -> dict:
  overrides = dict(BIG)
  if _QUICK.value:
    overrides.update({"model.d_model": 128, "model.head_dim": 16, "model.moe.expert_hidden": 128})
  config = make_config(overrides)
  model = build_model(config)
  params = init_params(model, config, seed=0)
  weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  context, new = (128, 32) if not _QUICK.value else (16, 4)
  p = prompts(1, context - new)
  t = median_times({"decode": lambda: (0.0, generate(model, params, p, new).decode_seconds)},
                   repeats)
  per_token = t["decode"][1] / (new - 1)
  bandwidth = copy_bandwidth(64 << 20 if _QUICK.value else 512 << 20)
  read = bytes_per_token(config, params, context)
  bound = read / bandwidth
  return dict(weights_mb=weights / 2**20, bytes_per_token_mb=read / 2**20,
              bandwidth_gbs=bandwidth / 1e9, bound_ms=bound * 1e3, decode_ms=per_token * 1e3,
              fraction_of_bound=bound / per_token)


def main(argv):
  del argv
  logs.setup_console_logging()
  repeats = 1 if _QUICK.value else _REPEATS.value
  rows, paths = [], []
  with tempfile.TemporaryDirectory() as work:
    for name in _MODELS.value:
      if name not in MODELS:
        raise app.UsageError(f"--models: {name!r} is not one of {', '.join(MODELS)}")
      rows += bench_model(name, MODELS[name], work, repeats)
      paths.append(bench_paths(name, MODELS[name], repeats))
  forms = bench_mla_forms(repeats) if "mla" in _MODELS.value else []
  mem = bench_memory_bound(repeats)
  hf = any("hf_decode_tps" in r for r in rows)
  lines = [f"Device: {jax.devices()[0].device_kind}, JAX {jax.__version__}, {_DTYPE.value}, "
           f"greedy, {rows[0]['new']} new tokens per prompt; median of {repeats} interleaved "
           "rounds.", "",
           "| model | batch | context | cache bytes/token | prefill tok/s | decode tok/s | "
           "window re-run tok/s | decode vs window |" + (" HF prefill tok/s | HF decode tok/s | prefill vs HF | "
                                   "decode vs HF |" if hf else ""),
           "|---|---|---|---|---|---|---|---|" + ("---|---|---|---|" if hf else "")]
  for r in rows:
    line = (f"| {r['model']} | {r['batch']} | {r['context']} | {r['cache_bytes_per_token']:.0f} | "
            f"{r['prefill_tps']:.0f} | "
            f"{r['decode_tps']:.0f} | {r['window_tps']:.1f} | {r['vs_window']:.1f}x |")
    if hf:
      line += (f" {r['hf_prefill_tps']:.0f} | {r['hf_decode_tps']:.0f} | "
               f"{r['vs_hf_prefill']:.2f}x | {r['vs_hf_decode']:.2f}x |"
               if "hf_decode_tps" in r else " - | - | - | - |")
    lines.append(line)
  lines += ["", "Batch 1: the small-batch MoE path (gathered experts) against the training "
            "layout (sort + tile schedule + grouped matmul).", "",
            "| model | decode ms/token gather | grouped | step speed-up | MoE layer us gather | "
            "grouped | layer speed-up |", "|---|---|---|---|---|---|---|"]
  for r in paths:
    lines.append(f"| {r['model']} | {r['decode_gather_ms']:.2f} | {r['decode_grouped_ms']:.2f} "
                 f"| {r['step_speedup']:.2f}x | {r['layer_gather_us']:.0f} | "
                 f"{r['layer_grouped_us']:.0f} | {r['layer_speedup']:.2f}x |")
  lines += ["", "MLA decode: up-projections absorbed into the query and output (default) against "
            "expanding the latent cache to keys and values every step.", "",
            "| batch | context | absorbed ms/step | expanded ms/step | absorbed speed-up |",
            "|---|---|---|---|---|"]
  lines += [f"| {r['batch']} | {r['context']} | {r['absorbed_ms']:.2f} | {r['expanded_ms']:.2f} | "
            f"{r['speedup']:.2f}x |" for r in forms]
  lines += ["", f"Memory bound at batch 1: {mem['weights_mb']:.0f} MB of weights, "
            f"{mem['bytes_per_token_mb']:.1f} MB read per token, copy bandwidth "
            f"{mem['bandwidth_gbs']:.1f} GB/s: bound {mem['bound_ms']:.2f} ms/token, measured "
            f"{mem['decode_ms']:.2f} ms/token = {mem['fraction_of_bound']:.0%} of the bound."]
  report.write_results(_OUT.value, "\n".join(lines), {"rows": rows, "paths": paths,
                                                       "mla_forms": forms, "memory_bound": mem})


if __name__ == "__main__":
  app.run(main)
