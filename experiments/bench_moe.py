"""Fwd+bwd throughput and peak memory of one MoE FFN layer against a dense FFN of equal active FLOPs.

Everything is measured in this one process, so ratios are robust to a noisy machine:

  dense        SwiGLU FFN with hidden k*F: the same active FLOPs, no routing (the practical limit)
  moejax/<b>   moejax's dropless MoE layer (plan -> dispatch -> experts -> combine) on gmm backend b,
               "@a": each expert's rows aligned to a multiple of a (model.moe.row_align)
  transformers Hugging Face Qwen3-MoE experts block, experts_implementation="grouped_mm"
               (torch CPU), fed the same routing

FLOPs counted (useful work only; routing, sorting and gathers are overhead):
  forward  = T * k * (2*D*2F + 2*F*D) = 6 T k D F     (gate+up [D, 2F], down [F, D] per slot)
  fwd+bwd  = 3 * forward = 18 T k D F                 (backward: d_input and d_weight matmuls)
Routing is fixed per shape: "balanced" gives every expert T*k/E slots (k distinct experts per
token), "zipf" draws expert popularity from Zipf(s) (expert e chosen with p ~ 1/(e+1)^s).
Memory is XLA's compiled estimate: peak = arguments + outputs + temporaries - aliased (the MoE
holds E/k times the dense layer's weights and gradients by design), and temporaries alone
(activations saved for the backward pass and workspace: the dispatch overhead).

  python experiments/bench_moe.py                 # the three layer shapes + the token sweep
  python experiments/bench_moe.py --quick         # smaller, for a smoke test
  python experiments/bench_moe.py --dtype=bfloat16 --backends=pallas,ragged_dot --notorch  # GPU

Heterogeneous experts (HMoE, --hmoe): for each of the paper's ladders, 8 experts whose sizes
sum to 8 x F against 8 experts of F (the same routed FLOPs under balanced routing, the same
parameters), and against one bank padded to the largest size (the cost of not skipping).
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# torch's OpenMP workers spin after each op by default and steal the cores from the JAX case
# timed next in the same round (measured: balanced moejax 0.87x dense with spinning, 0.97x
# without); passive waiting makes the interleaved rounds fair to both.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from moejax.layers.dense import swiglu  # noqa: E402
from moejax.layers.dispatch import combine, dispatch, plan_dropless  # noqa: E402
from moejax.layers.experts import run_swiglu_experts  # noqa: E402
from moejax.ops.grouped_matmul import gmm  # noqa: E402
from moejax.experiment.timing import compiled_memory  # noqa: E402
from moejax.layers.heterogeneous import (LADDERS, column_blocks, expert_size_ladder,  # noqa: E402
                                         run_heterogeneous_experts)

_OUT = flags.DEFINE_string("out_dir", "experiments/results/bench_moe", "Output directory.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed repetitions (median reported).")
_QUICK = flags.DEFINE_bool("quick", False, "Small shapes, few repeats (smoke test).")
_BACKENDS = flags.DEFINE_list(
    "backends", ["xla", "xla:gmm", "xla@128", "ragged_dot"],
    "moejax gmm backends to time; 'name@a' aligns each expert's rows to a (model.moe.row_align), "
    "'name:path' picks the bank's path (run_swiglu_experts: fused, gmm; default auto).")
_TORCH = flags.DEFINE_bool("torch", True, "Also time the transformers Qwen3-MoE block.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                            "Activations and weights (bf16 for the GPU/TPU numbers).")
_ONLY = flags.DEFINE_string("only", "", "Run only shapes whose name contains this.")
_SWEEP = flags.DEFINE_bool("sweep", True, "Also run the throughput-vs-tokens sweep (PNG).")
_PROFILE = flags.DEFINE_bool("profile", True, "Also profile the fine-grained layer per op.")
_HMOE = flags.DEFINE_bool("hmoe", True, "Also time heterogeneous experts on the paper's ladders.")
_HMOE_PROFILE = flags.DEFINE_bool(
    "hmoe_profile", False, "Also time both layers with the SwiGLU activation removed (the "
    "grouped matmuls, dispatch and combine only): where the heterogeneous layer's time goes.")

SHAPES = {  # name: (T, D, F, E, k, routing)
    "balanced E16 k2 F1024": (4096, 512, 1024, 16, 2, "balanced"),
    "fine-grained E64 k6 F256": (4096, 512, 256, 64, 6, "balanced"),
    "zipf(1.2) E16 k2 F1024": (4096, 512, 1024, 16, 2, "zipf"),
}
HMOE = (4096, 512, 1024, 8, 2)   # T, D, mean expert hidden F, E, k (sizes sum to E x F)
SWEEP_TOKENS = (512, 1024, 2048, 4096, 8192, 16384)
RAGGED_MAX_T = 4096   # ragged_dot on CPU computes every group densely: GBs of temporaries beyond


def flops(t, d, f, k):
  return 18 * t * k * d * f


def routing(t, e, k, kind, seed=0):
  """expert_index [T, k] (distinct experts per token) and gate weights [T, k] summing to 1."""
  rng = np.random.default_rng(seed)
  if kind == "balanced":
    idx = (np.arange(t)[:, None] * k + np.arange(k)[None, :]) % e
    idx = rng.permutation(e)[idx]
  else:
    p = 1.0 / np.arange(1, e + 1) ** 1.2
    g = rng.gumbel(size=(t, e)) + np.log(p / p.sum())
    idx = np.argsort(-g, axis=1)[:, :k]            # k distinct experts, Zipf-weighted
  w = rng.random((t, k)).astype(np.float32) + 0.5
  return idx.astype(np.int32), w / w.sum(1, keepdims=True)


class Case:
  """One implementation: ``run()`` does a full fwd+bwd step and blocks until it is done."""

  def __init__(self, impl, run, peak_bytes=None, temp_bytes=None, extra=None):
    self.impl, self.run, self.peak_bytes, self.temp_bytes = impl, run, peak_bytes, temp_bytes
    self.extra = extra or {}


def cotangent(t, d):
  """The output's cotangent: a fixed random [T, D] (loss = sum(y * c)), as in training. With
  loss = sum(y) the cotangent is a constant of ones that XLA folds into the backward pass,
  which measured ~45% slower for the MoE layer on CPU (734 vs 502 ms, fine-grained shape) and
  changed the dense FFN little: an artifact no training step has."""
  return jax.random.normal(jax.random.key(7), (t, d))


def jax_case(name, forward, params, x, *route):
  """grad of sum(forward(params, x, *route) * c) w.r.t. (params, x); routing arrays and c are
  runtime inputs, never constants (XLA would otherwise constant-fold the dispatch plan)."""
  dtype = jnp.dtype(_DTYPE.value)
  params, x = jax.tree.map(lambda a: a.astype(dtype), (params, x))
  c = cotangent(*x.shape).astype(dtype)
  loss = lambda p, x, c, *r: jnp.sum(forward(p, x, *r).astype(jnp.float32) * c)
  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  peak, temp = compiled_memory(step, params, x, c, *route)
  return Case(name, lambda: jax.block_until_ready(step(params, x, c, *route)), peak, temp)


def dense_case(t, d, f, k, key):
  h = k * f
  k1, k2, k3 = jax.random.split(key, 3)
  params = (jax.random.normal(k1, (d, 2, h)) * d ** -0.5, jax.random.normal(k2, (h, d)) * h ** -0.5)
  x = jax.random.normal(k3, (t, d))

  def forward(p, x):
    up = jnp.einsum("td,dch->tch", x, p[0])
    return swiglu(up) @ p[1]
  return jax_case("dense", forward, params, x)


def moe_case(t, d, f, e, k, kind, name, key):
  backend, _, align = name.partition("@")
  backend, _, path = backend.partition(":")
  align = int(align) if align else 1
  idx, w = routing(t, e, k, kind)
  idx, w = jnp.asarray(idx), jnp.asarray(w)
  k1, k2, k3 = jax.random.split(key, 3)
  params = (jax.random.normal(k1, (e, d, 2, f)) * d ** -0.5,
            jax.random.normal(k2, (e, f, d)) * f ** -0.5)
  x = jax.random.normal(k3, (t, d))

  def forward(p, x, idx, w):
    plan = plan_dropless(idx, e, align=align)
    ys = run_swiglu_experts(p, dispatch(x, plan), plan.group_sizes, backend=backend,
                            dtype=x.dtype, path=path or "auto")
    return combine(ys, plan, w)
  return jax_case(f"moejax/{name.partition('@')[0]}@{align}", forward, params, x, idx, w)


def _matmuls_only(p, xs, group_sizes, sizes):
  """The heterogeneous bank's grouped matmuls with the activation removed (gate half only)."""
  y = 0
  for blk, wi, wo in zip(column_blocks(sizes), *p):
    c, d, _, w = wi.shape
    up = gmm(xs, wi.reshape(c, d, 2 * w), group_sizes, backend="xla")
    y = y + gmm(up[:, :w], wo, group_sizes, backend="xla")
  return y


def hmoe_case(t, d, sizes, k, key, activation=True, path="auto"):
  """The heterogeneous bank behind the same dispatch as ``moe_case`` (``path``: see
  ``run_heterogeneous_experts``); without ``activation``: its column blocks' grouped matmuls
  only (``_matmuls_only``)."""
  e = len(sizes)
  idx, w = routing(t, e, k, "balanced")
  keys = iter(jax.random.split(key, 2 * len(sizes) + 1))
  blocks = column_blocks(sizes)
  wis = tuple(jax.random.normal(next(keys), (len(b.members), d, 2, b.width)) * d ** -0.5
              for b in blocks)
  wos = tuple(jax.random.normal(next(keys), (len(b.members), b.width, d)) * max(sizes) ** -0.5
              for b in blocks)
  x = jax.random.normal(next(keys), (t, d))

  def forward(p, x, idx, w):
    plan = plan_dropless(idx, e)
    xs = dispatch(x, plan)
    ys = (run_heterogeneous_experts(p, xs, plan.group_sizes, sizes, backend="xla", dtype=x.dtype,
                                    path=path)
          if activation else _matmuls_only(p, xs, plan.group_sizes, sizes))
    return combine(ys, plan, w)
  name = ("heterogeneous" + ("" if path == "auto" else f" ({path})") if activation
          else "heterogeneous, matmuls only")
  return jax_case(name, forward, (wis, wos), x, jnp.asarray(idx), jnp.asarray(w))


# Layer 1 of the default model (DeepSeekMoE, 63 routed experts of 64 units, top-7) trained 500
# steps on TinyShakespeare, after `python -m moejax.compress --method=neuron --keep=0.5`
# (HEAPr): 7 distinct sizes, sum 1992.
HEAPR_SIZES = (56,) * 4 + (48,) * 11 + (40,) * 13 + (32,) * 14 + (24,) * 5 + (16,) * 7 + (8,) * 9
HEAPR = (4096, 128, 7)   # T, D (the default model's), k


def hmoe_cases(name, t, d, sizes, k, key):
  """(cases, meta) of one size list: the homogeneous layer of the same routed FLOPs (mean size),
  the heterogeneous bank on each path, one bank padded to the largest size."""
  e, f = len(sizes), int(round(sum(sizes) / len(sizes)))
  cases = [moe_case(t, d, f, e, k, "balanced", "xla", key),
           hmoe_case(t, d, sizes, k, key, path="fused"),
           hmoe_case(t, d, sizes, k, key, path="blocks"),
           moe_case(t, d, max(sizes), e, k, "balanced", "xla", key)]
  cases[0].impl, cases[3].impl = "homogeneous", "padded to max"
  if _HMOE_PROFILE.value:
    cases += [hmoe_case(t, d, sizes, k, key, activation=False),
              hmoe_case(t, d, (f,) * e, k, key, activation=False)]
    cases[-1].impl = "homogeneous, matmuls only"
  return cases, {"ladder": name, "sizes": list(sizes), "T": t, "D": d, "E": e, "k": k}


def run_hmoe(repeats):
  """Each ladder and a HEAPr-pruned layer: heterogeneous (fused per size, column blocks) vs the
  homogeneous layer of the same routed FLOPs vs padded to H_max."""
  t, d, f, e, k = HMOE
  if _QUICK.value:
    t, d, f = t // 8, d // 4, f // 4
  key, out = jax.random.key(0), []
  setups = [(ladder, t, d, expert_size_ladder(ladder, e, e * f), k)
            for ladder in (LADDERS[:1] if _QUICK.value else LADDERS)]
  ht, hd, hk = HEAPR
  setups.append(("HEAPr-pruned default model", ht // 8 if _QUICK.value else ht, hd, HEAPR_SIZES,
                 hk))
  for name, tt, dd, sizes, kk in setups:
    cases, meta = hmoe_cases(name, tt, dd, sizes, kk, key)
    sec = measure(cases, repeats)
    rows = [{"impl": c.impl, "seconds": sec[c.impl], "x_homogeneous": sec["homogeneous"] /
             sec[c.impl], "peak_bytes": c.peak_bytes} for c in cases]
    out.append({**meta, "rows": rows})
    print(f"\nHMoE {name} sizes {sorted(set(sizes), reverse=True)} (E={meta['E']} T={tt} "
          f"D={dd} k={kk}, balanced):")
    for r in rows:
      print(f"  {r['impl']:25s} {r['seconds'] * 1e3:8.1f} ms  {r['x_homogeneous']:5.2f}x "
            f"homogeneous  peak {r['peak_bytes'] / 2**20:7.1f} MiB", flush=True)
  return out


def torch_case(t, d, f, e, k, kind):
  import torch
  from transformers import Qwen3MoeConfig
  from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
  cfg = Qwen3MoeConfig(hidden_size=d, moe_intermediate_size=f, num_experts=e,
                       num_experts_per_tok=k)
  cfg._experts_implementation = "grouped_mm"
  torch.manual_seed(0)
  block = Qwen3MoeExperts(cfg)
  with torch.no_grad():
    block.gate_up_proj.normal_(0, d ** -0.5)
    block.down_proj.normal_(0, f ** -0.5)
  idx, w = routing(t, e, k, kind)
  idx, w = torch.from_numpy(idx).long(), torch.from_numpy(w)
  x = torch.randn(t, d, requires_grad=True)
  c = torch.from_numpy(np.asarray(cotangent(t, d)))

  def step():
    block.zero_grad(set_to_none=True)
    x.grad = None
    (block(x, idx, w) * c).sum().backward()
  return Case("transformers", step, extra={"torch": torch.__version__,
                                           "threads": torch.get_num_threads()})


def _is_slow(case):
  return case.impl.startswith("moejax/ragged_dot")    # ~15-50x slower on CPU, GBs of temporaries


def measure(cases, repeats):
  """Median seconds per case. Rounds interleave the fast cases so drift hits them all alike;
  the slow ragged_dot case runs afterwards (its multi-GB temporaries disturb the others)."""
  times = {c.impl: [] for c in cases}
  fast = [c for c in cases if not _is_slow(c)]
  for c in fast:
    c.run()                                            # compile / warm up
  for _ in range(repeats):
    for c in fast:
      t0 = time.perf_counter()
      c.run()
      times[c.impl].append(time.perf_counter() - t0)
  for c in cases:
    if _is_slow(c):
      c.run()
      for _ in range(2):
        t0 = time.perf_counter()
        c.run()
        times[c.impl].append(time.perf_counter() - t0)
  return {k: float(np.median(v)) for k, v in times.items()}


def profile_ops(t, d, f, e, k, kind, repeats):
  """Where the layer's time goes: each component of one fwd+bwd step timed alone (random
  cotangents, routing as in the layer), the grouped matmuls beside a dense matmul of the same
  FLOPs. Components: the router's sort (plan), dispatch gather + its backward, the six grouped
  matmuls (up/down x forward, d_lhs, d_rhs = tgmm), SwiGLU + backward, combine + backward."""
  from moejax.ops import grouped_matmul as gm
  m, h = t * k, k * f
  idx, w = (jnp.asarray(a) for a in routing(t, e, k, kind))
  plan = jax.jit(lambda i: plan_dropless(i, e))(idx)
  sizes = plan.group_sizes
  r = jax.random.split(jax.random.key(1), 8)
  x, xs, up = (jax.random.normal(r[0], (t, d)), jax.random.normal(r[1], (m, d)),
               jax.random.normal(r[2], (m, 2 * f)))
  hs, ys = jax.random.normal(r[3], (m, f)), jax.random.normal(r[4], (m, d))
  wi, wo = jax.random.normal(r[5], (e, d, 2 * f)), jax.random.normal(r[6], (e, f, d))
  wd_up, wd_down = jax.random.normal(r[5], (d, 2 * h)), jax.random.normal(r[6], (h, d))
  xt, upt, hst = (jax.random.normal(r[7], s_) for s_ in ((t, d), (t, 2 * h), (t, h)))
  ct_rows, ct_tok = jax.random.normal(r[0], (m, d)), jax.random.normal(r[1], (t, d))
  vjp = lambda fn, ct: (lambda *a: jax.vjp(fn, *a)[1](ct))

  def projection(name, lhs, dout, w, lhs_dense, dout_dense, w_dense):
    """A projection's three grouped matmuls (forward, d_lhs, d_rhs) and their dense twins."""
    return {
        f"{name} gmm fwd": (lambda a, b: gm.gmm(a, b, sizes, backend="xla"), (lhs, w),
                            lambda a, b: a @ b, (lhs_dense, w_dense)),
        f"{name} gmm d_lhs": (lambda a, b: gm.gmm(a, b, sizes, backend="xla",
                                                  transpose_rhs=True),
                              (dout, w), lambda a, b: a @ b.T, (dout_dense, w_dense)),
        f"{name} tgmm (d_rhs)": (lambda a, b: gm.tgmm(a, b, sizes, e), (lhs, dout),
                                 lambda a, b: a.T @ b, (lhs_dense, dout_dense)),
    }

  ops = {  # name: (moe fn, args, dense fn or None, dense args)
      "router sort (plan)": (lambda i: plan_dropless(i, e).row_token, (idx,), None, ()),
      "dispatch gather fwd+bwd": (lambda x: vjp(lambda x: dispatch(x, plan), ct_rows)(x), (x,),
                                  None, ()),
      **projection("up", xs, up, wi, xt, upt, wd_up),
      "swiglu fwd+bwd": (lambda u: vjp(lambda u: swiglu(u.reshape(-1, 2, f)), hs)(u), (up,),
                         None, ()),
      **projection("down", hs, ys, wo, hst, xt, wd_down),
      "combine fwd+bwd": (lambda y, w_: vjp(lambda y, w_: combine(y, plan, w_), ct_tok)(y, w_),
                          (ys, w), None, ()),
  }
  cases = []
  for name, (fn, args, dfn, dargs) in ops.items():
    jf = jax.jit(fn)
    cases.append(Case(name, lambda jf=jf, a=args: jax.block_until_ready(jf(*a))))
    if dfn is not None:
      jd = jax.jit(dfn)
      cases.append(Case(name + " dense", lambda jd=jd, a=dargs: jax.block_until_ready(jd(*a))))
  layer = moe_case(t, d, f, e, k, kind, "xla", jax.random.key(0))
  cases.append(Case("layer", layer.run))
  sec = measure(cases, repeats)
  total = sum(sec[n] for n in ops)
  out = {"shape": dict(T=t, D=d, F=f, E=e, k=k, routing=kind), "layer_s": sec["layer"],
         "sum_s": total, "ops": {}}
  print(f"\nper-op profile (xla backend, T={t} D={d} F={f} E={e} k={k} {kind}): component "
        f"time, share of their sum, dense matmul of equal FLOPs")
  for name in ops:
    dn = sec.get(name + " dense")
    out["ops"][name] = {"s": sec[name], "share": sec[name] / total, "dense_s": dn,
                        "x_dense": dn / sec[name] if dn else None}
    extra = f"  dense {dn * 1e3:7.1f} ms = {dn / sec[name]:.2f}x" if dn else ""
    print(f"  {name:26s} {sec[name] * 1e3:7.1f} ms {sec[name] / total:6.1%}{extra}", flush=True)
  print(f"  sum {total * 1e3:.1f} ms; the whole layer (one program) {sec['layer'] * 1e3:.1f} ms")
  return out


def run_shape(name, t, d, f, e, k, kind, repeats):
  key = jax.random.key(0)
  cases = [dense_case(t, d, f, k, key)]
  cases += [moe_case(t, d, f, e, k, kind, b, key) for b in _BACKENDS.value
            if not (b.startswith("ragged_dot") and jax.default_backend() == "cpu"
                    and t > RAGGED_MAX_T)]
  if _TORCH.value:
    cases.append(torch_case(t, d, f, e, k, kind))
  seconds = measure(cases, repeats)
  fl = flops(t, d, f, k)
  dense = cases[0]
  rows = []
  for c in cases:
    sec = seconds[c.impl]
    rows.append({"impl": c.impl, "seconds": sec, "gflops": fl / sec / 1e9,
                 "x_dense": seconds["dense"] / sec, "peak_bytes": c.peak_bytes,
                 "temp_bytes": c.temp_bytes,
                 "mem_x_dense": c.peak_bytes / dense.peak_bytes if c.peak_bytes else None,
                 "temp_x_dense": c.temp_bytes / dense.temp_bytes if c.temp_bytes else None,
                 **c.extra})
  # The memory bound: 1.2 x the dense step's peak + the MoE's extra weights and their
  # gradients, 2 x (3 E D F - 3 D kF) x itemsize.
  item = jnp.dtype(_DTYPE.value).itemsize
  bound = 1.2 * dense.peak_bytes + 2 * 3 * d * f * (e - k) * item if dense.peak_bytes else None
  for r in rows:
    r["peak_x_bound"] = (r["peak_bytes"] / bound if bound and r["peak_bytes"]
                         and r["impl"] != "dense" else None)
  out = {"shape": name, "T": t, "D": d, "F": f, "E": e, "k": k, "routing": kind,
         "flops": fl, "rows": rows, "memory_bound_bytes": bound}
  print(f"\n{name}: T={t} D={d} F={f} E={e} k={k} routing={kind}  "
        f"fwd+bwd FLOPs = 18*T*k*D*F = {fl / 1e9:.1f} GFLOP", flush=True)
  for r in rows:
    mem = (f"peak {r['peak_bytes'] / 2**20:7.1f} MiB ({r['mem_x_dense']:.2f}x), temporaries "
           f"{r['temp_bytes'] / 2**20:7.1f} MiB ({r['temp_x_dense']:.2f}x)" if r["peak_bytes"] else "")
    print(f"  {r['impl']:22s} {r['seconds'] * 1e3:8.1f} ms  {r['gflops']:6.1f} GFLOP/s  "
          f"{r['x_dense']:5.2f}x dense  {mem}", flush=True)
  return out


def hmoe_table(hmoe) -> list[str]:
  lines = ["", "Heterogeneous experts (balanced routing), speed x the homogeneous layer of the same "
           "routed FLOPs (its experts of the mean size), and compiled peak memory:", "",
           "| sizes | E, k, T, D | distinct sizes | fused per size (CPU default) | column blocks | "
           "padded to max | homogeneous |", "|---|---|---|---|---|---|---|"]
  for h in hmoe:
    by = {r["impl"]: r for r in h["rows"]}
    cell = lambda r: f"{r['x_homogeneous']:.2f}x, {r['peak_bytes'] / 2**20:.0f} MiB"
    lines.append(f"| {h['ladder']} | {h['E']}, {h['k']}, {h['T']}, {h['D']} | "
                 f"{len(set(h['sizes']))} | {cell(by['heterogeneous (fused)'])} | "
                 f"{cell(by['heterogeneous (blocks)'])} | {cell(by['padded to max'])} | "
                 f"{by['homogeneous']['seconds'] * 1e3:.0f} ms |")
  return lines


def write_outputs(shapes, sweep, profile, hmoe=()):
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "results.json"), "w") as fh:
    json.dump({"backend": jax.default_backend(), "devices": str(jax.devices()), "shapes": shapes,
               "sweep": sweep, "profile": profile, "hmoe": list(hmoe)}, fh, indent=1)
  lines = []
  if shapes:
    impls = [r["impl"] for r in shapes[0]["rows"]]
    lines += ["| shape | " + " | ".join(impls) + " |", "|---" * (len(impls) + 1) + "|"]
    for s in shapes:
      cells = [f"{r['gflops']:.1f} GFLOP/s ({r['x_dense']:.2f}x)" for r in s["rows"]]
      lines.append(f"| {s['shape']} | " + " | ".join(cells) + " |")
    lines += ["", "Compiled memory, peak (weights, gradients, activations) / temporaries only; "
              "[peak / bound], bound = 1.2 x dense peak + 2 x the extra expert weights:", "",
              "| shape | " + " | ".join(i for i in impls if i != "transformers") + " |",
              "|---" * len(impls) + "|"]
    for s in shapes:
      cells = [f"{r['peak_bytes'] / 2**20:.0f} MiB ({r['mem_x_dense']:.2f}x) / "
               f"{r['temp_bytes'] / 2**20:.0f} MiB ({r['temp_x_dense']:.2f}x)"
               + (f" [{r['peak_x_bound']:.2f}]" if r.get("peak_x_bound") else "")
               for r in s["rows"] if r["peak_bytes"]]
      lines.append(f"| {s['shape']} | " + " | ".join(cells) + " |")
  if profile:
    sh = profile["shape"]
    lines += ["", f"Per-op profile, T={sh['T']} D={sh['D']} F={sh['F']} E={sh['E']} k={sh['k']} "
              f"{sh['routing']} (each component alone; grouped matmuls beside a dense matmul of "
              f"equal FLOPs):", "", "| component | time | share | dense equal-FLOPs | ratio |",
              "|---|---|---|---|---|"]
    for n, p in profile["ops"].items():
      dense = (f"{p['dense_s'] * 1e3:.1f} ms | {p['x_dense']:.2f}x" if p["dense_s"] else " | ")
      lines.append(f"| {n} | {p['s'] * 1e3:.1f} ms | {p['share']:.0%} | {dense} |")
    lines.append(f"| sum / whole layer | {profile['sum_s'] * 1e3:.1f} ms / "
                 f"{profile['layer_s'] * 1e3:.1f} ms | | | |")
  if sweep:
    impls = list(dict.fromkeys(r["impl"] for s in sweep for r in s["rows"]))
    lines += ["", f"Sweep over tokens (balanced, D={sweep[0]['D']} F={sweep[0]['F']} "
              f"E={sweep[0]['E']} k={sweep[0]['k']}), x dense:", "",
              "| T | " + " | ".join(impls) + " |", "|---" * (len(impls) + 1) + "|"]
    for s in sweep:
      by = {r["impl"]: r for r in s["rows"]}
      lines.append(f"| {s['T']} | " + " | ".join(
          f"{by[i]['x_dense']:.2f}x" if i in by else "-" for i in impls) + " |")
  if hmoe:
    lines += hmoe_table(hmoe)
  table = "\n".join(lines)
  print("\n" + table)
  with open(os.path.join(_OUT.value, "results.md"), "w") as fh:
    fh.write(table + "\n")
  if sweep:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for impl in dict.fromkeys(r["impl"] for s in sweep for r in s["rows"]):
      pts = [(s["T"], r["gflops"]) for s in sweep for r in s["rows"] if r["impl"] == impl]
      ax.plot(*zip(*pts), marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens T")
    ax.set_ylabel("useful GFLOP/s (fwd+bwd)")
    s0 = sweep[0]
    ax.set_title(f"MoE layer D={s0['D']} F={s0['F']} E={s0['E']} k={s0['k']}, balanced, "
                 f"{jax.default_backend()}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(_OUT.value, "throughput_vs_tokens.png"), dpi=120)


def main(argv):
  del argv
  repeats = 3 if _QUICK.value else _REPEATS.value
  shapes = []
  for name, (t, d, f, e, k, kind) in SHAPES.items():
    if _ONLY.value not in name:
      continue
    if _QUICK.value:
      t, d, f = t // 8, d // 4, f // 4
    shapes.append(run_shape(name, t, d, f, e, k, kind, repeats))
  sweep = []
  for t in ((256, 512) if _QUICK.value else SWEEP_TOKENS) if _SWEEP.value else ():
    d, f, e, k = (128, 256, 16, 2) if _QUICK.value else (512, 1024, 16, 2)
    sweep.append(run_shape(f"sweep T={t}", t, d, f, e, k, "balanced", repeats))
  t, d, f, e, k, kind = SHAPES["fine-grained E64 k6 F256"]
  profile = None
  if _PROFILE.value:
    profile = (profile_ops(t // 8, d // 4, f // 4, e, k, kind, 3) if _QUICK.value
               else profile_ops(t, d, f, e, k, kind, repeats))
  hmoe = run_hmoe(repeats) if _HMOE.value else []
  write_outputs(shapes, sweep, profile, hmoe)


if __name__ == "__main__":
  app.run(main)
