"""Mixture-of-Head attention: attention FLOPs and time with 50% / 75% of the heads active,
against plain multi-head attention of the same weights, in one process (ratios, not absolutes).

  python experiments/bench_moh.py            # D=512, 8 heads of 64, T = B x L = 2048 tokens
  python experiments/bench_moh.py --quick    # smaller, for a smoke test

Cases (every one is the real layer, moejax/layers/moh.py, with its learned router at init):
  attention          plain causal attention (moejax/layers/attention.py)
  masked K/H         MoH computing every head and masking (head_compute="all")
  selected K/H       MoH computing only each token's selected heads (head_compute="selected")
  selected 2s+2r     2 shared heads (dense) + 2 of 6 routed: 50% active

FLOPs of one layer's forward pass (useful work; routing, sorting and gathers are overhead):
  projections  2 T D dh (H + 2 G)         q, k, v: dense in every case
  per active (token, head) pair:  4 L dh (scores + value sum) + 2 dh D (output projection)
so attention FLOPs = projections + T a (4 L dh + 2 dh D) with a active heads per token
(a = H for plain and masked attention). The causal half of the scores is computed and masked
in every case, as XLA's dense attention does.
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
from moejax.experiment.timing import compiled_memory, interleaved_medians  # noqa: E402
from moejax.layers.attention import Attention  # noqa: E402
from moejax.layers.moh import MixtureOfHeadsAttention  # noqa: E402

_OUT = flags.DEFINE_string("out_dir", "experiments/results/bench_moh", "Output directory.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds (median reported).")
_QUICK = flags.DEFINE_bool("quick", False, "Small shapes, few repeats (smoke test).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")

D, H, DH = 512, 8, 64
SHAPES = [(16, 128), (4, 512), (2, 1024)]           # (B, L): T = 2048 tokens, context varies
QUICK = dict(d=64, h=4, dh=16, shapes=[(2, 64)])


def attention_flops(t, l, d, h, g, dh, active):
  return 2 * t * d * dh * (h + 2 * g) + t * active * (4 * l * dh + 2 * dh * d)


def cases(d, h, dh):
  """name -> (module, heads computed per token)."""
  dt = jnp.dtype(_DTYPE.value)
  moh = lambda compute, shared, k: MixtureOfHeadsAttention(
      h, h, dh, dtype=dt, shared_heads=shared, active_heads=k, head_compute=compute)
  out = {"attention": (Attention(h, h, dh, dtype=dt), h),
         f"masked {h // 2}/{h}": (moh("all", 0, h // 2), h)}      # computes every head
  for k in (h // 2, 3 * h // 4, h):
    out[f"selected {k}/{h}"] = (moh("selected", 0, k), k)
  if h >= 8:
    out["selected 2s+2r of 8" if h == 8 else f"selected 2s+{h // 2 - 2}r"] = (
        moh("selected", 2, h // 2 - 2), h // 2)
  return out


def steps(module, b, l, d):
  x = jax.random.normal(jax.random.key(0), (b, l, d), jnp.dtype(_DTYPE.value))
  pos = jnp.broadcast_to(jnp.arange(l), (b, l))
  params = nn.meta.unbox(module.init(jax.random.key(1), x, pos)["params"])
  c = jax.random.normal(jax.random.key(2), (b, l, d), x.dtype)     # a dense cotangent
  fwd = jax.jit(lambda p, x: module.apply({"params": p}, x, pos))
  loss = lambda p, x: jnp.sum(module.apply({"params": p}, x, pos).astype(jnp.float32) * c)
  train = jax.jit(jax.grad(loss, argnums=(0, 1)))
  peak, _ = compiled_memory(train, params, x)
  return (lambda: jax.block_until_ready(fwd(params, x)),
          lambda: jax.block_until_ready(train(params, x)), peak)


def run_shape(b, l, d, h, dh, repeats):
  table = cases(d, h, dh)
  fwd, train, peak = {}, {}, {}
  for name, (module, _) in table.items():
    fwd[name], train[name], peak[name] = steps(module, b, l, d)
  t_fwd = interleaved_medians(fwd, repeats)
  t_train = interleaved_medians(train, repeats)
  rows = []
  base = attention_flops(b * l, l, d, h, h, dh, h)
  for name, (_, active) in table.items():
    rows.append(dict(case=name, B=b, L=l, active=active, flops=attention_flops(
        b * l, l, d, h, h, dh, active), flop_ratio=attention_flops(b * l, l, d, h, h, dh, active)
        / base, fwd_s=t_fwd[name], train_s=t_train[name],
        fwd_ratio=t_fwd[name] / t_fwd["attention"],
        train_ratio=t_train[name] / t_train["attention"], peak_bytes=peak[name]))
    logs.progress(f"B={b} L={l} {name:>20}: flops x{rows[-1]['flop_ratio']:.2f}  fwd "
              f"x{rows[-1]['fwd_ratio']:.2f}  fwd+bwd x{rows[-1]['train_ratio']:.2f}")
  return rows


def plot(rows, path):
  """Time ratio (solid) and FLOP ratio (dashed) against the share of heads active, per L."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for ax, key, title in ((axes[0], "fwd_ratio", "forward"),
                         (axes[1], "train_ratio", "forward + backward")):
    for b, l in sorted({(r["B"], r["L"]) for r in rows}, key=lambda s: s[1]):
      sel = [r for r in rows if r["L"] == l and r["case"].startswith("selected")
             and "s+" not in r["case"]]
      share = [r["active"] / sel[-1]["active"] for r in sel]
      line, = ax.plot(share, [r[key] for r in sel], marker="o", label=f"time, L={l} (B={b})")
      ax.plot(share, [r["flop_ratio"] for r in sel], "--", color=line.get_color(),
              label=f"FLOPs, L={l}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(xlabel="share of heads active per token", title=title)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("selected-heads MoH / plain attention")
  axes[1].legend(fontsize=7)
  fig.suptitle("MoH with only the selected heads computed, against plain attention")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write(rows, out_dir):
  lines = [f"Device: {jax.devices()[0].device_kind}, JAX {jax.__version__}, {_DTYPE.value}; "
           "time ratios against plain attention measured in the same run (median of "
           f"{_REPEATS.value if not _QUICK.value else 2} interleaved rounds).", "",
           "| B x L | case | heads computed | attention FLOPs (fwd) | FLOP ratio | fwd time ratio "
           "| fwd+bwd time ratio | fwd+bwd ms | peak MiB (fwd+bwd) |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['B']} x {r['L']} | {r['case']} | {r['active']} | {r['flops'] / 1e9:.2f} G "
                 f"| {r['flop_ratio']:.2f} | {r['fwd_ratio']:.2f} | {r['train_ratio']:.2f} | "
                 f"{r['train_s'] * 1e3:.1f} | "
                 f"{(r['peak_bytes'] or 0) / 2**20:.0f} |")
  report.write_results(out_dir, "\n".join(lines), rows)
  plot(rows, os.path.join(out_dir, "moh_time.png"))


def main(argv):
  del argv
  logs.setup_console_logging()
  if _QUICK.value:
    d, h, dh, shapes, repeats = QUICK["d"], QUICK["h"], QUICK["dh"], QUICK["shapes"], 2
  else:
    d, h, dh, shapes, repeats = D, H, DH, SHAPES, _REPEATS.value
  rows = []
  for b, l in shapes:
    rows += run_shape(b, l, d, h, dh, repeats)
  write(rows, _OUT.value)


if __name__ == "__main__":
  app.run(main)
