"""Grouped-matmul kernels alone: gmm, its transposed form (d_lhs) and tgmm (d_rhs), as TFLOP/s
against a dense matmul of equal FLOPs and against ``jax.lax.ragged_dot`` on the same shapes.

For each layer shape (T tokens, k slots, D model width, F expert width, E experts) the up
projection is timed: lhs [M = T*k, D] x rhs [E, D, 2F], rows grouped as the routing says.

  gmm      lhs @ rhs[g]                     2 M D 2F FLOPs   dense: [M, D] @ [D, 2F]
  d_lhs    dy @ rhs[g]^T  (transpose_rhs)   same             dense: [M, 2F] @ [2F, D]
  tgmm     lhs^T dy per group               same             dense: [D, M] @ [M, 2F]
The ragged_dot baselines: ragged_dot for gmm; for d_lhs and tgmm, the d_lhs and d_rhs of
``jax.vjp(ragged_dot)`` (what XLA does for ragged_dot's backward pass). Under balanced routing
(every group M/E rows) "batched" is the same products as one batched ``einsum`` over
[E, M/E, .]: the backend's own batched GEMM, i.e. what per-group matmuls of these shapes can
reach on it without any schedule (the ceiling for a grouped kernel).

  python experiments/bench_kernels.py --dtype=bfloat16            # on a GPU/TPU (pallas native)
  python experiments/bench_kernels.py --quick --backends=xla      # CPU smoke test
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import pallas_kernels as pk  # noqa: E402

try:   # the kernels alone need only pallas_kernels; moejax's other backends need moejax's deps
  from moejax.ops import grouped_matmul as gm  # noqa: E402
except ImportError as err:
  gm = None
  print(f"moejax not importable ({err}); timing the Pallas kernels and baselines only")


def _load_timing():
  """moejax/experiment/timing.py by path: it needs only NumPy, while importing it as a package
  module would pull in moejax's dependencies, which a bare accelerator machine may lack."""
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "moejax",
                      "experiment", "timing.py")
  spec = importlib.util.spec_from_file_location("moejax_timing", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


interleaved_medians = _load_timing().interleaved_medians

_OUT = flags.DEFINE_string("out_dir", "experiments/results/bench_kernels", "Output directory.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Inputs dtype.")
_BACKENDS = flags.DEFINE_list(
    "backends", ["pallas"], "'pallas' (pallas_kernels directly, native: TPU/GPU only) and/or "
    "moejax.ops.gmm backends (xla, ragged_dot, reference).")
_BASELINES = flags.DEFINE_list(
    "baselines", ["dense", "ragged_dot", "batched"],
    "Baselines to time beside the backends (ragged_dot computes every group densely on CPU: "
    "minutes per shape there).")
_TOKENS = flags.DEFINE_integer("tokens", 8192, "T, tokens per layer call.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed repetitions (median reported).")
_QUICK = flags.DEFINE_bool("quick", False, "Small shapes, few repeats (smoke test).")

SHAPES = {  # name: (D, F, E, k, routing)
    "balanced E16 k2 F1024": (2048, 1024, 16, 2, "balanced"),
    "fine-grained E64 k6 F256": (2048, 256, 64, 6, "balanced"),
    "zipf(1.2) E16 k2 F1024": (2048, 1024, 16, 2, "zipf"),
}


def group_sizes(m, e, kind, seed=0):
  if kind == "balanced":
    sizes = np.full(e, m // e)
  else:
    p = 1.0 / np.arange(1, e + 1) ** 1.2
    sizes = np.random.default_rng(seed).multinomial(m - m % e, p / p.sum())
  sizes[-1] += m - sizes.sum()
  return jnp.asarray(sizes, jnp.int32)


def ragged_vjp(x, w, sizes, dy):
  _, pull = jax.vjp(lambda a, b: jax.lax.ragged_dot(a, b, sizes), x, w)
  return pull(dy)


def run_shape(name, t, d, f, e, k, kind, dtype, backends, repeats):
  m = t * k
  ks = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(ks[0], (m, d), dtype)
  w = jax.random.normal(ks[1], (e, d, 2 * f), dtype) / np.sqrt(d)
  dy = jax.random.normal(ks[2], (m, 2 * f), dtype)
  sizes = group_sizes(m, e, kind)
  flops = 2 * m * d * 2 * f
  f32 = jnp.float32
  ops = {
      "gmm": {"dense": (lambda a, b: jnp.dot(a, b[0], preferred_element_type=f32), (x, w)),
              "ragged_dot": (lambda a, b: jax.lax.ragged_dot(a, b, sizes), (x, w))},
      "d_lhs": {"dense": (lambda a, b: jnp.dot(a, b[0].T, preferred_element_type=f32), (dy, w)),
                "ragged_dot": (lambda a, b: ragged_vjp(a, b, sizes, dy)[0], (x, w))},
      "tgmm": {"dense": (lambda a, b: jnp.dot(a.T, b, preferred_element_type=f32), (x, dy)),
               "ragged_dot": (lambda a, b: ragged_vjp(a, b, sizes, dy)[1], (x, w))},
  }
  if kind == "balanced":   # equal groups: the per-group products as one batched GEMM
    grp = lambda a: a.reshape(e, m // e, a.shape[1])
    ops["gmm"]["batched"] = (lambda a, b: jnp.einsum("gmd,gdn->gmn", grp(a), b,
                                                     preferred_element_type=f32), (x, w))
    ops["d_lhs"]["batched"] = (lambda a, b: jnp.einsum("gmn,gdn->gmd", grp(a), b,
                                                       preferred_element_type=f32), (dy, w))
    ops["tgmm"]["batched"] = (lambda a, b: jnp.einsum("gmd,gmn->gdn", grp(a), grp(b),
                                                      preferred_element_type=f32), (x, dy))
  for impls in ops.values():
    for base in [i for i in impls if i not in _BASELINES.value]:
      del impls[base]
  for b in backends:
    if b == "pallas":
      ops["gmm"][b] = (lambda a, c: pk.gmm(a, c, sizes), (x, w))
      ops["d_lhs"][b] = (lambda a, c: pk.gmm(a, c, sizes, transpose_rhs=True), (dy, w))
      ops["tgmm"][b] = (lambda a, c: pk.tgmm(a, c, sizes), (x, dy))
      continue
    if gm is None:
      continue
    ops["gmm"][b] = (lambda a, c, b=b: gm.gmm(a, c, sizes, backend=b), (x, w))
    ops["d_lhs"][b] = (lambda a, c, b=b: gm.gmm(a, c, sizes, backend=b, transpose_rhs=True),
                       (dy, w))
    if gm.resolve_backend(b) == "xla":
      ops["tgmm"][b] = (lambda a, c: gm.tgmm(a, c, sizes, e, preferred_element_type=dtype),
                        (x, dy))
  rows = []
  for op, impls in ops.items():
    runs = {}
    for impl, (fn, args) in impls.items():
      jf = jax.jit(fn)
      try:
        jax.block_until_ready(jf(*args))   # compile; one broken impl must not hide the others
      except Exception as err:  # noqa: BLE001
        print(f"  {name} {op} {impl}: FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)
        continue
      runs[impl] = lambda jf=jf, args=args: jax.block_until_ready(jf(*args))
    # Interleaved rounds: drift on a noisy machine hits every impl of the op alike (timed one
    # after another, the same loop measured 0.70x and 1.02x dense in two runs). The warm-up
    # call repeats the compile call above: cheap, and it keeps one timing helper.
    secs = interleaved_medians(runs, repeats)
    for impl, s in secs.items():
      rows.append(dict(shape=name, op=op, impl=impl, ms=s * 1e3, tflops=flops / s / 1e12,
                       x_dense=secs["dense"] / s if "dense" in secs else None,
                       x_ragged=secs["ragged_dot"] / s if "ragged_dot" in secs else None))
      print(f"  {name:26s} {op:6s} {impl:12s} {s * 1e3:9.3f} ms {flops / s / 1e12:8.2f} TFLOP/s"
            f"  x_dense={rows[-1]['x_dense'] or 0:.2f} x_ragged={rows[-1]['x_ragged'] or 0:.2f}",
            flush=True)
  return rows


def main(argv):
  del argv
  dtype = jnp.dtype(_DTYPE.value)
  t, repeats = (512, 2) if _QUICK.value else (_TOKENS.value, _REPEATS.value)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{dtype.name}, T={t}", flush=True)
  rows = []
  for name, (d, f, e, k, kind) in SHAPES.items():
    if _QUICK.value:
      d, f = d // 8, f // 4
    rows += run_shape(name, t, d, f, e, k, kind, dtype, _BACKENDS.value, repeats)
  os.makedirs(_OUT.value, exist_ok=True)
  meta = dict(jax=jax.__version__, device=jax.devices()[0].device_kind, dtype=dtype.name, T=t)
  with open(os.path.join(_OUT.value, "results.json"), "w") as fh:
    json.dump(dict(meta, rows=rows), fh, indent=1)
  lines = [f"{meta['device']}, jax {meta['jax']}, {meta['dtype']}, T={t}", "",
           "| shape | op | impl | ms | TFLOP/s | x dense | x ragged_dot |", "|---" * 7 + "|"]
  fmt = lambda v: "" if v is None else f"{v:.2f}x"
  lines += [f"| {r['shape']} | {r['op']} | {r['impl']} | {r['ms']:.3f} | {r['tflops']:.2f} | "
            f"{fmt(r['x_dense'])} | {fmt(r['x_ragged'])} |" for r in rows]
  with open(os.path.join(_OUT.value, "results.md"), "w") as fh:
    fh.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
