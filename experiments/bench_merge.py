"""Soft merging of experts (SMEAR, Lory): what the merge costs, as a share of the layer's time.

  python experiments/bench_merge.py            # D=512, 8 experts of F=1024, T = 8 x 512 tokens
  python experiments/bench_merge.py --quick    # smaller, for a smoke test

Merging averages the experts' parameters once per merge group (a sequence for SMEAR, a segment
of ``merge_segment`` tokens for Lory), then runs one FFN on the group's tokens:
  merge FLOPs  2 E (3 D F) per group              (one contraction over the experts per weight)
  FFN FLOPs    6 D F per token
so the merge is E / (tokens per group) of the FFN's FLOPs: small for SMEAR and long segments,
as large as the FFN itself when the segment has E tokens.

Cases, each fwd+bwd (outputs and the VJP of a random cotangent), timed in one process: the
layer (moejax/layers/merging.py, SoftMergeBlock), the merge contraction alone (merge_weights),
the FFN run on given merged weights (one small batched matmul per merge group), and a dense
SwiGLU FFN of hidden F on all tokens (the same per-token FLOPs as one plain matmul). The merge's
share = merge alone / layer. The merged weights are materialised, 3 D F numbers per merge group
(and as many gradients): memory traffic, not FLOPs, is what grows as segments shrink.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import linen as nn  # noqa: E402

from moejax import logs  # noqa: E402
from moejax.experiment import report  # noqa: E402
from moejax.experiment.timing import interleaved_medians  # noqa: E402
from moejax.layers.dense import SwiGLU  # noqa: E402
from moejax.layers.merging import SoftMergeBlock, grouped_swiglu, merge_weights  # noqa: E402
from moejax.layers.moe import MoESpec  # noqa: E402

_OUT = flags.DEFINE_string("out_dir", "experiments/results/bench_merge", "Output directory.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds (median reported).")
_QUICK = flags.DEFINE_bool("quick", False, "Small shapes, few repeats (smoke test).")

FULL = dict(b=8, l=512, d=512, f=1024, e=8, merges=[("sequence", 512), ("causal_segments", 256),
                                                    ("causal_segments", 64),
                                                    ("causal_segments", 16)])
QUICK = dict(b=2, l=32, d=32, f=64, e=4, merges=[("sequence", 32), ("causal_segments", 8)])


def _fwd_bwd(fn, *args):
  """A blocking fwd+bwd call of ``fn(*args)``: its outputs and the VJP of a fixed random
  cotangent (an input, as in a training step: a constant one lets XLA drop the forward)."""
  out = jax.eval_shape(fn, *args)
  keys = jax.random.split(jax.random.key(9), len(jax.tree.leaves(out)))
  ct = jax.tree.unflatten(jax.tree.structure(out), [
      jax.random.normal(k, o.shape, o.dtype) for k, o in zip(keys, jax.tree.leaves(out))])

  @jax.jit
  def step(args, ct):
    y, vjp = jax.vjp(fn, *args)
    return y, vjp(ct)
  return lambda: jax.block_until_ready(step(args, ct))


def cases(b, l, d, f, e, merge, segment):
  x = jax.random.normal(jax.random.key(0), (b, l, d))
  spec = MoESpec(num_experts=e, top_k=1, expert_hidden=f, merge=merge, merge_segment=segment)
  block = SoftMergeBlock(spec)
  params = nn.meta.unbox(block.init(jax.random.key(1), x)["params"])
  groups = 1 if merge == "sequence" else l // segment
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(2), (b, groups, e)), axis=-1)
  wi, wo = params["experts"]["wi"], params["experts"]["wo"]
  wi_m, wo_m = merge_weights(probs, wi, wo)
  xg = x.reshape(b, groups, l // groups, d)
  ffn = SwiGLU(f)
  ffn_params = nn.meta.unbox(ffn.init(jax.random.key(3), x)["params"])
  return {"layer": _fwd_bwd(lambda p, x: block.apply({"params": p}, x), params, x),
          "merge alone": _fwd_bwd(merge_weights, probs, wi, wo),
          "FFN on merged weights": _fwd_bwd(grouped_swiglu, xg, wi_m, wo_m),
          "dense FFN F": _fwd_bwd(lambda p, x: ffn.apply({"params": p}, x), ffn_params, x)}


def main(argv):
  del argv
  logs.setup_console_logging()
  s = QUICK if _QUICK.value else FULL
  repeats = 2 if _QUICK.value else _REPEATS.value
  rows = []
  for merge, segment in s["merges"]:
    times = interleaved_medians(cases(s["b"], s["l"], s["d"], s["f"], s["e"], merge, segment),
                                repeats)
    tokens = s["l"] if merge == "sequence" else segment
    rows.append(dict(merge=merge, tokens_per_group=tokens, flop_share=s["e"] / (tokens + s["e"]),
                     layer_ms=times["layer"] * 1e3, merge_ms=times["merge alone"] * 1e3,
                     ffn_ms=times["FFN on merged weights"] * 1e3,
                     dense_ms=times["dense FFN F"] * 1e3,
                     merge_share=times["merge alone"] / times["layer"],
                     layer_vs_dense=times["layer"] / times["dense FFN F"]))
    logs.progress(f"{merge} ({tokens} tokens/group): merge {rows[-1]['merge_share']:.0%} of the "
                  f"layer's time, layer {rows[-1]['layer_vs_dense']:.2f}x the dense FFN")
  lines = [f"Device: {jax.devices()[0].device_kind}, JAX {jax.__version__}, float32; B={s['b']} "
           f"L={s['l']} D={s['d']}, {s['e']} experts of F={s['f']}; fwd+bwd, median of {repeats} "
           "interleaved rounds.", "",
           "| merge | tokens per merge group | merge share of FLOPs | layer ms | merge alone ms "
           "| merge share of time | FFN on merged weights ms | dense FFN of F ms "
           "| layer / dense FFN |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['merge']} | {r['tokens_per_group']} | {r['flop_share']:.0%} | "
                 f"{r['layer_ms']:.1f} | {r['merge_ms']:.1f} | {r['merge_share']:.0%} | "
                 f"{r['ffn_ms']:.1f} | {r['dense_ms']:.1f} | {r['layer_vs_dense']:.2f} |")
  report.write_results(_OUT.value, "\n".join(lines), rows)


if __name__ == "__main__":
  app.run(main)
