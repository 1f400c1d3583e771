"""Collectives per step of each sharding layout, and an analytic step-time / MFU model.

Part 1 (measured, 8 simulated CPU devices): for the same MoE model laid out data-parallel,
FSDP, expert-parallel and mixed, compile one training step and sum, per collective type, the
bytes of the collective results per device from the compiled HLO (a proxy for traffic: an
all-gather's result is the gathered buffer, an all-reduce's the reduced one); then time the
step. Simulated devices share 2 cores, so step times compare layouts' overheads, not speed.

Part 2 (analytic): predicts step time and MFU of DeepSeek-V3- and Mixtral-8x7B-sized models on
a stated accelerator mesh and picks a layout; see ``analytic_step`` for every formula.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/bench_sharding.py
"""
from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")

import dataclasses  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from configs import gshard  # noqa: E402
from moejax.train import trainer  # noqa: E402

_OUT = flags.DEFINE_string("out_dir", "experiments/results/bench_sharding", "Output directory.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per layout.")

LAYOUTS = {
    "DP (data=8)": dict(data=8, fsdp=1, expert=1, tensor=1),
    "FSDP (fsdp=8)": dict(data=1, fsdp=8, expert=1, tensor=1),
    "EP (data=2, expert=4)": dict(data=2, fsdp=1, expert=4, tensor=1),
    "EP+FSDP+TP (2x2x2)": dict(data=1, fsdp=2, expert=2, tensor=2),
}
COLLECTIVES = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1,
          "f64": 8, "s64": 8, "u64": 8}
_OP = re.compile(r"=\s*(\([^=]*?\)|[\w\[\],{}:]+)\s+(" + "|".join(COLLECTIVES) +
                 r")(-start)?\(")
_SHAPE = re.compile(r"\b(\w+)\[([\d,]*)\]")


def collective_bytes(hlo: str) -> dict[str, int]:
  """Bytes of each collective's result buffer(s), summed per type (``-done`` halves skipped)."""
  out = {c: 0 for c in COLLECTIVES}
  for line in hlo.splitlines():
    m = _OP.search(line)
    if not m:
      continue
    shapes = _SHAPE.findall(m.group(1))
    if m.group(3):           # async start: result tuple is (operand, result); count the result
      shapes = shapes[len(shapes) // 2:]
    for dtype, dims in shapes:
      n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
      out[m.group(2)] += n * _BYTES.get(dtype, 4)
  return out


def _config(mesh: dict):
  c = gshard.get_config()
  c.model.moe.num_experts = 8          # divisible by every expert axis used here
  c.model.moe.expert_hidden = 512
  c.mesh.update(mesh)
  return c


def measure(name: str, mesh: dict) -> dict:
  c = _config(mesh)
  run = trainer.Trainer(c)
  step = trainer.make_train_step(run.model, run.tx, c, run.shardings, run.mesh)
  batch = trainer.train_batch(run.data, 0, run.mesh)
  with jax.set_mesh(run.mesh):
    hlo = step.jitted.lower(run.state, batch).compile().as_text()
  state = run.state
  state, m = step(state, batch)
  jax.block_until_ready(m["loss"])
  times = []
  for i in range(_STEPS.value):
    b = trainer.train_batch(run.data, i + 1, run.mesh)
    t0 = time.perf_counter()
    state, m = step(state, b)
    jax.block_until_ready(m["loss"])
    times.append(time.perf_counter() - t0)
  return {"layout": name, "mesh": mesh, "collective_bytes": collective_bytes(hlo),
          "step_ms": 1e3 * float(np.median(times)), "loss": float(m["loss"])}


def ragged_volume(mesh: dict, platform: str = "tpu") -> dict:
  """The ragged exchange's traffic for an expert-parallel layout. XLA:CPU cannot compile the
  collective, so the train step is *lowered* for ``platform`` (StableHLO, not compiled) to
  count the ragged_all_to_all ops; each sends only the routed rows, at most T_local * k rows
  of d_model (fewer when capacity drops), which is the upper bound reported here."""
  from moejax.parallel import expert_parallel
  c = _config(mesh)
  c.model.moe.all_to_all = "ragged"
  saved = expert_parallel._backend
  expert_parallel._backend = lambda: {"cuda": "gpu"}.get(platform, platform)
  try:
    run = trainer.Trainer(c)
    step = trainer.make_train_step(run.model, run.tx, c, run.shardings, run.mesh)
    batch = trainer.train_batch(run.data, 0, run.mesh)
    with jax.set_mesh(run.mesh):
      text = step.jitted.trace(run.state, batch).lower(lowering_platforms=(platform,)).as_text()
  finally:
    expert_parallel._backend = saved
  ops = text.count("custom_call @ragged_all_to_all(")
  rows = c.data.batch_size * c.data.seq_len // len(run.mesh.devices.flat) * c.model.moe.top_k
  itemsize = 2 if c.model.dtype == "bfloat16" else 4
  return {"platform": platform, "ragged_all_to_all_ops": ops,
          "max_bytes_per_device": ops * rows * c.model.d_model * itemsize}


# ----------------------------------------------------------------------------- analytic model
@dataclasses.dataclass(frozen=True)
class Model:
  name: str
  total_params: float        # all parameters
  active_params: float       # parameters a token passes through (routed experts: k of them)
  expert_params: float       # parameters in routed experts (sharded over ep x fsdp)
  layers: int
  moe_layers: int
  d_model: int
  top_k: int
  seq_len: int


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_flops: float          # dense bf16 FLOP/s per chip
  hbm_bytes: float
  ring_bw: float             # bytes/s per chip for all-gather / reduce-scatter / all-reduce
  a2a_bw: float              # bytes/s per chip for all-to-all (bisection-limited)


MIXTRAL = Model("Mixtral-8x7B", 46.7e9, 12.9e9, 45.1e9, 32, 32, 4096, 2, 4096)
DEEPSEEK_V3 = Model("DeepSeek-V3", 671e9, 37e9, 654e9, 61, 58, 7168, 8, 4096)
# Stated hardware figures (vendor specs); the collective bandwidths are our assumptions.
V5P = Chip("TPU v5p", 459e12, 95e9, ring_bw=300e9, a2a_bw=100e9)
H100 = Chip("H100 SXM (8/node, 400G IB per GPU)", 989e12, 80e9, ring_bw=50e9, a2a_bw=40e9)

MATMUL_EFFICIENCY = 0.75     # achievable fraction of peak on large bf16 matmuls
OVERLAP = 0.8                # fraction of FSDP/DP collective time hidden behind compute
BYTES_PER_PARAM_STATE = 16   # bf16 weights (2) + f32 master (4) + Adam m, v (8) + grad (2)


def analytic_step(model: Model, chip: Chip, chips: int, ep: int, tokens_per_chip: int,
                  remat: bool = True) -> dict:
  """Step time and MFU for FSDP over all chips with experts also split ep ways.

  model FLOPs  F = (6 N_active + 12 L d s) * tokens          (PaLM appendix B formula)
  compute      t_c = R * F / (chips * peak * MATMUL_EFFICIENCY), R = 4/3 with full
               rematerialisation (the forward runs twice: 8N instead of 6N FLOPs per token;
               MFU still counts only F), else 1
  FSDP         dense params: all-gather bf16 twice (fwd, bwd) + reduce-scatter grads (bf16),
               bytes/chip = 6 * N_dense * (n-1)/n over n = chips;
               expert params split ep ways first, then FSDP over chips/ep: 6 * N_exp/ep * ...
               t_f = bytes / ring_bw, of which OVERLAP * t_c is hidden behind compute
  EP all-to-all per MoE layer: dispatch + combine, fwd and bwd = 4 transfers of
               tokens_per_chip * k * d * 2 bytes * (ep-1)/ep; t_a = bytes / a2a_bw, not hidden
  step         t = t_c + max(0, t_f - OVERLAP * t_c) + t_a;  MFU = F / (t * chips * peak)
  memory       16 bytes of state per parameter, split over chips (must fit in 80% of HBM,
               activations assumed rematerialised).
  """
  tokens = tokens_per_chip * chips
  flops = (6 * model.active_params + 12 * model.layers * model.d_model * model.seq_len) * tokens
  t_c = (4 / 3 if remat else 1.0) * flops / (chips * chip.peak_flops * MATMUL_EFFICIENCY)
  dense = model.total_params - model.expert_params
  frac = lambda n: (n - 1) / n if n > 1 else 0.0
  fsdp_bytes = 6 * dense * frac(chips) + 6 * model.expert_params / ep * frac(chips // ep)
  t_f = fsdp_bytes / chip.ring_bw
  a2a_bytes = 4 * model.moe_layers * tokens_per_chip * model.top_k * model.d_model * 2 * frac(ep)
  t_a = a2a_bytes / chip.a2a_bw
  t = t_c + max(0.0, t_f - OVERLAP * t_c) + t_a
  mem = BYTES_PER_PARAM_STATE * model.total_params / chips
  return {"model": model.name, "chip": chip.name, "chips": chips, "ep": ep, "remat": remat,
          "tokens_per_chip": tokens_per_chip, "t_compute_s": t_c, "t_fsdp_s": t_f, "t_a2a_s": t_a,
          "step_s": t, "mfu": flops / (t * chips * chip.peak_flops),
          "state_gb_per_chip": mem / 1e9, "fits": mem <= 0.8 * chip.hbm_bytes}


def choose_layout(model, chip, chips, tokens_per_chip, remat=True):
  options = [analytic_step(model, chip, chips, ep, tokens_per_chip, remat)
             for ep in (1, 2, 4, 8, 16, 32, 64) if ep <= chips and chips % ep == 0]
  fitting = [o for o in options if o["fits"]] or options
  return min(fitting, key=lambda o: o["step_s"]), options


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  measured = []
  for name, mesh in LAYOUTS.items():
    r = measure(name, mesh)
    measured.append(r)
    print(f"{name:24s} step {r['step_ms']:8.1f} ms  " + "  ".join(
        f"{k} {v / 1e6:7.2f}MB" for k, v in r["collective_bytes"].items() if v), flush=True)
  ep_layout = "EP (data=2, expert=4)"
  ragged = ragged_volume(LAYOUTS[ep_layout])
  padded = next(r for r in measured if r["layout"] == ep_layout)["collective_bytes"]["all-to-all"]
  print(f"{ep_layout} ragged (lowered for {ragged['platform']}): "
        f"{ragged['ragged_all_to_all_ops']} ragged_all_to_all ops, at most "
        f"{ragged['max_bytes_per_device'] / 1e6:.2f} MB vs padded {padded / 1e6:.2f} MB", flush=True)
  lines = ["| layout | all-to-all | all-gather | reduce-scatter | all-reduce | "
           "collective-permute | step (8 simulated CPU devices) |", "|---" * 7 + "|"]
  for r in measured:
    b = r["collective_bytes"]
    lines.append(f"| {r['layout']} | " + " | ".join(f"{b[c] / 1e6:.2f} MB" for c in COLLECTIVES)
                 + f" | {r['step_ms']:.0f} ms |")
  lines.append(f"| {ep_layout}, all_to_all=ragged (lowered for TPU, not run) | at most "
               f"{ragged['max_bytes_per_device'] / 1e6:.2f} MB in "
               f"{ragged['ragged_all_to_all_ops']} ragged ops | | | | | |")
  analytic = []
  for model, chip, chips, tpc, remat in [
      (MIXTRAL, V5P, 64, 8192, False), (MIXTRAL, V5P, 64, 8192, True),
      (DEEPSEEK_V3, V5P, 256, 8192, True), (MIXTRAL, H100, 64, 8192, True),
      (DEEPSEEK_V3, H100, 256, 8192, True)]:
    best, options = choose_layout(model, chip, chips, tpc, remat)
    analytic.append({"best": best, "options": options})
  lines += ["", "| model | mesh | remat | chosen layout | state/chip | compute | FSDP comm | "
            "all-to-all | step | MFU |", "|---" * 10 + "|"]
  for a in analytic:
    b = a["best"]
    lines.append(f"| {b['model']} | {b['chips']} x {b['chip']} | {'full' if b['remat'] else 'none'}"
                 f" | FSDP {b['chips']} + EP {b['ep']}"
                 f" | {b['state_gb_per_chip']:.0f} GB{'' if b['fits'] else ' (does not fit)'} | "
                 f"{b['t_compute_s']:.2f} s | {b['t_fsdp_s']:.2f} s | {b['t_a2a_s']:.2f} s | "
                 f"{b['step_s']:.2f} s | {b['mfu']:.1%} |")
  table = "\n".join(lines)
  print(table)
  with open(os.path.join(_OUT.value, "results.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(_OUT.value, "results.json"), "w") as f:
    json.dump({"measured": measured, "ragged": ragged, "analytic": analytic}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
