"""Training, evaluation and sampling loops: one readable file, the big_vision way.

State is a plain dict {step, params, opt_state} so orbax saves and restores it as is. Every
source of randomness is a function of (config.seed, step), and the data stream is random-access
by step, so a resumed run is bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh

from moejax import config as config_lib
from moejax.models.transformer import ModelConfig, Transformer
from moejax.parallel import sharding as sharding_lib
from moejax.parallel.mesh import batch_axes_size, make_mesh
from moejax.parallel.rules import LOGICAL_AXIS_RULES
from moejax.train import data as data_lib
from moejax.train import metrics as metrics_lib
from moejax.train.checkpoint import Checkpointer
from moejax.train.optimizer import learning_rate_schedule, make_optimizer
from moejax.train.sampling import sample

_MUTABLE = ["losses", "intermediates"]


def build_model(config) -> Transformer:
  return Transformer(ModelConfig.from_config(config.model))


def _init_tokens(config):
  return jnp.zeros((1, config.data.seq_len), jnp.int32)


def init_params(model: Transformer, config, rng: jax.Array):
  """Returns (params, logical_specs): unboxed f32 params and their logical axis names."""
  boxed = model.init({"params": rng}, _init_tokens(config))["params"]
  return nn.meta.unbox(boxed), nn.get_partition_spec(boxed)


def init_state(model, config, tx, mesh: Mesh):
  """Initialises {step, params, opt_state} directly into its shardings on ``mesh``.

  Returns (state, shardings, logical_specs). Nothing is materialised unsharded, so a model
  larger than one device's memory initialises fine.
  """
  rng = jax.random.fold_in(jax.random.key(config.seed), 0)
  tokens = _init_tokens(config)
  specs = nn.get_partition_spec(
      jax.eval_shape(lambda r: model.init({"params": r}, tokens)["params"], rng))

  def _init(r):
    params = nn.meta.unbox(model.init({"params": r}, tokens)["params"])
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  shape = jax.eval_shape(_init, rng)
  sharding_lib.check_divisible(shape["params"], specs, mesh)
  shardings = sharding_lib.state_shardings(shape, specs, tx, mesh)
  with jax.set_mesh(mesh):
    state = jax.jit(_init, out_shardings=shardings)(rng)
  return state, shardings, specs


def loss_fn(model, params, batch, rng, deterministic):
  """Mean next-token cross-entropy + sown auxiliary losses. -> (total, (ce, aux, intermediates))."""
  inputs, targets = batch[:, :-1], batch[:, 1:]
  with nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    logits, mutated = model.apply({"params": params}, inputs, deterministic=deterministic,
                                  rngs={"router": rng}, mutable=_MUTABLE)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  aux = sum(jnp.sum(x) for x in jax.tree.leaves(mutated.get("losses", {})))
  aux = jnp.asarray(aux, jnp.float32)
  return ce + aux, (ce, aux, mutated.get("intermediates", {}))


def _on_mesh(fn, mesh):
  """Runs a jitted function with ``mesh`` current, so logical constraints resolve on it."""
  def call(*args):
    with jax.set_mesh(mesh):
      return fn(*args)
  call.jitted, call.mesh = fn, mesh        # for .lower(...) in benchmarks and tests
  return call


def make_train_step(model, tx, config, shardings, mesh: Mesh):
  schedule = learning_rate_schedule(config.train)
  base_rng = jax.random.fold_in(jax.random.key(config.seed), 1)

  def train_step(state, batch):
    rng = jax.random.fold_in(base_rng, state["step"])
    grad_fn = jax.value_and_grad(lambda p: loss_fn(model, p, batch, rng, False), has_aux=True)
    (loss, (ce, aux, inter)), grads = grad_fn(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
                 "opt_state": opt_state}
    metrics = {"loss": loss, "ce": ce, "aux": aux, "grad_norm": optax.tree.norm(grads),
               "lr": schedule(state["step"]), "moe": inter}
    return new_state, metrics

  step = jax.jit(train_step, in_shardings=(shardings, sharding_lib.batch_sharding(mesh)),
                 out_shardings=(shardings, None), donate_argnums=(0,))
  return _on_mesh(step, mesh)


def make_eval_step(model, shardings, mesh: Mesh):
  def eval_step(params, batch):
    _, (ce, _, inter) = loss_fn(model, params, batch, jax.random.key(0), True)
    return ce, inter
  step = jax.jit(eval_step, in_shardings=(shardings["params"], sharding_lib.batch_sharding(mesh)))
  return _on_mesh(step, mesh)


def put_batch(read_rows, batch_size: int, seq_len: int, mesh: Mesh) -> jax.Array:
  """Global [B, L+1] batch sharded over the batch axes; each device reads only its own rows via
  ``read_rows(rows)``, so a process never touches rows that live on other hosts."""
  cache = {}

  def shard(index):
    rows = range(*index[0].indices(batch_size))
    if rows not in cache:                 # devices that replicate a slice read it once
      cache[rows] = read_rows(rows)
    return cache[rows]

  return jax.make_array_from_callback((batch_size, seq_len + 1),
                                      sharding_lib.batch_sharding(mesh), shard)


def train_batch(data: data_lib.TextData, step: int, mesh: Mesh) -> jax.Array:
  return put_batch(lambda rows: data.batch(step, rows), data.batch_size,
                   data.seq_len, mesh)


def val_batch(data: data_lib.TextData, i: int, mesh: Mesh) -> jax.Array:
  return put_batch(lambda rows: data.val_batch(i, rows), data.batch_size,
                   data.seq_len, mesh)


def evaluate(eval_step, params, data: data_lib.TextData, max_batches: int, mesh: Mesh) -> dict:
  n = min(data.num_val_batches, max_batches)
  losses = [float(eval_step(params, val_batch(data, i, mesh))[0]) for i in range(n)]
  loss = float(np.mean(losses))
  return {"val_loss": loss, "val_ppl": math.exp(loss), "val_bpb": loss / math.log(2)}


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _describe(config, params) -> str:
  m = config.model
  n_params = sum(x.size for x in jax.tree.leaves(params))
  kind = "dense" if m.moe.num_experts == 0 else (
      f"MoE N={m.moe.num_experts} K={m.moe.top_k} m={m.moe.segments} "
      f"shared={m.moe.num_shared_experts} router={m.moe.router} dispatch={m.moe.dispatch}")
  return f"{kind}, {m.num_layers} layers, d_model={m.d_model}, {n_params / 1e6:.2f}M params"


class _Run:
  """What every mode needs: validated config, mesh, model, optimizer, sharded state, data."""

  def __init__(self, config, workdir):
    config_lib.validate(config)
    self.mesh = make_mesh(config.mesh)
    ways = batch_axes_size(self.mesh)
    if config.data.batch_size % ways:
      raise config_lib.ConfigError(
          f"config.data.batch_size: must be divisible by the batch-splitting mesh axes "
          f"(data*fsdp*expert = {ways}), got {config.data.batch_size}")
    os.makedirs(workdir, exist_ok=True)
    self.config, self.workdir = config, workdir
    self.model = build_model(config)
    self.tx = make_optimizer(config.train)
    self.state, self.shardings, self.specs = init_state(self.model, config, self.tx, self.mesh)
    self.ckpt = Checkpointer(workdir, config.train.keep_checkpoints)
    self.data = data_lib.make_data(config.data, config.seed)
    self.eval_step = make_eval_step(self.model, self.shardings, self.mesh)

  def evaluate(self):
    return evaluate(self.eval_step, self.state["params"], self.data, self.config.data.eval_batches,
                    self.mesh)


def train(config, workdir: str) -> dict:
  """Trains (resuming from the latest checkpoint in ``workdir``), then evaluates and samples."""
  run = _Run(config, workdir)
  model, tx, state, ckpt, data, mesh = run.model, run.tx, run.state, run.ckpt, run.data, run.mesh
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json(indent=2))
  if ckpt.latest_step() is not None:
    state = ckpt.restore(state)
    print(f"resumed from {workdir} at step {int(state['step'])}", flush=True)
  print(f"model: {_describe(config, state['params'])}", flush=True)
  print(f"data: {data.source}: {data.num_train_tokens} train / {data.num_val_tokens} val tokens",
        flush=True)

  t = config.train
  print(f"mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.default_backend()} devices, "
        f"{jax.process_count()} process(es)", flush=True)
  train_step = make_train_step(model, tx, config, run.shardings, mesh)
  writer = metrics_lib.MetricsWriter(workdir, enabled=jax.process_index() == 0)
  tokens_per_step = config.data.batch_size * config.data.seq_len
  start = int(state["step"])
  timer_start, timer_step = None, start
  last = {}
  stop = t.steps if not t.max_steps_per_run else min(t.steps, start + t.max_steps_per_run)
  for step in range(start, stop):
    state, metrics = train_step(state, train_batch(data, step, mesh))
    done = step + 1
    if timer_start is None:                    # exclude compilation from throughput and ETA
      jax.block_until_ready(state["step"])
      timer_start, timer_step = time.perf_counter(), done
    if done % t.log_every == 0 or done == t.steps or done == start + 1:
      metrics = jax.device_get(metrics)
      moe = metrics_lib.flatten_intermediates(metrics.pop("moe"))
      elapsed = time.perf_counter() - timer_start
      rate = (done - timer_step) / elapsed if done > timer_step and elapsed > 0 else float("nan")
      last = {k: float(v) for k, v in metrics.items()}
      last.update(metrics_lib.summarize_moe(moe))
      last["tokens_per_sec"] = rate * tokens_per_step
      writer.write(done, {"split": "train", **last, **moe})
      moe_txt = (f" | drop {last['drop_fraction']:.2%} | H(router) {last['router_entropy']:.2f}"
                 if "drop_fraction" in last else "")
      eta = _fmt_time((t.steps - done) / rate) if rate == rate else "?"
      speed = (f"{last['tokens_per_sec']:,.0f} tok/s" if rate == rate else "compiled")
      print(f"step {done:>5}/{t.steps} | loss {last['loss']:.4f} (ce {last['ce']:.4f}, aux "
            f"{last['aux']:.4f}) | lr {last['lr']:.2e} | {speed}"
            f"{moe_txt} | ETA {eta}", flush=True)
    if done % t.eval_every == 0 and done != t.steps:
      run.state = state
      ev = run.evaluate()
      writer.write(done, {"split": "val", **ev})
      print(f"eval  {done:>5} | val loss {ev['val_loss']:.4f} | ppl {ev['val_ppl']:.3f}",
            flush=True)
    if done % t.checkpoint_every == 0 or done == stop:
      ckpt.save(done, state)
  ckpt.close()
  if stop < t.steps:
    print(f"stopped at step {stop}/{t.steps} (train.max_steps_per_run={t.max_steps_per_run}); "
          f"run train again with --workdir={workdir} to resume", flush=True)
    return {"state": state, "train": last, "eval": None, "sample": None}

  run.state = state
  ev = run.evaluate()
  writer.write(int(state["step"]), {"split": "val", **ev})
  print(f"final | step {int(state['step'])} | val loss {ev['val_loss']:.4f} | "
        f"val ppl {ev['val_ppl']:.3f} | {ev['val_bpb']:.3f} bits/byte", flush=True)
  if jax.process_index() == 0:
    print(f"plots: {_plot(workdir)}", flush=True)
  text = _sample_text(model, state["params"], config)
  print(f"sample (temperature {config.sample.temperature}):\n{text}", flush=True)
  return {"state": state, "train": last, "eval": ev, "sample": text}


def _plot(workdir: str) -> str:
  try:
    from moejax.analysis.plots import plot_run
    return plot_run(workdir)
  except ImportError as e:  # matplotlib is optional for library users
    return f"skipped ({e})"


def _restored(config, workdir) -> _Run:
  run = _Run(config, workdir)
  run.state = run.ckpt.restore(run.state)
  run.ckpt.close()
  return run


def eval_only(config, workdir: str) -> dict:
  run = _restored(config, workdir)
  state = run.state
  ev = run.evaluate()
  print(f"eval | step {int(state['step'])} | val loss {ev['val_loss']:.4f} | "
        f"val ppl {ev['val_ppl']:.3f} | {ev['val_bpb']:.3f} bits/byte", flush=True)
  print(json.dumps(ev), flush=True)
  return ev


def _sample_text(model, params, config) -> str:
  s = config.sample
  tokens = sample(model, params, data_lib.encode(s.prompt), s.num_tokens, config.data.seq_len,
                  s.temperature, jax.random.key(s.seed))
  return data_lib.decode(tokens)


def sample_only(config, workdir: str) -> str:
  run = _restored(config, workdir)
  text = _sample_text(run.model, run.state["params"], config)
  print(text, flush=True)
  return text
