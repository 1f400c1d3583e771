"""The functional core of training: state init, loss, jitted train/eval steps, sharded batches.

State is a plain dict {step, params, opt_state} so orbax saves and restores it as is. Every
source of randomness is a function of (config.seed, step).

Steps are compiled for one mesh: the mesh is installed *inside* the traced function, so calling
``step.jitted`` outside ``jax.set_mesh`` compiles the same program (the MoE layer chooses its
expert-parallel path from the mesh it sees while tracing).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh

from moejax.models.transformer import ModelConfig, Transformer
from moejax.parallel import sharding as sharding_lib
from moejax.parallel.rules import LOGICAL_AXIS_RULES
from moejax.train import data as data_lib
from moejax.train.optimizer import learning_rate_schedule
from moejax.inference import steer as steer_lib

# losses: sown auxiliary losses; intermediates: metrics; param_updates: deltas for parameters
# that are not trained by gradients (a router's selection bias or threshold), added after the
# optimiser step (see apply_param_updates).
_MUTABLE = ["losses", "intermediates", "param_updates"]


def build_model(config) -> Transformer:
  """The model of ``config.model``, with ``config.steer``'s routing edits (inference only;
  ``steer.skip_rate`` needs data to calibrate: ``moejax.inference.steer.steered`` does it)."""
  cfg = ModelConfig.from_config(config.model, config.data.seq_len)
  steers = steer_lib.layer_steers(config.get("steer", {}), cfg)
  return Transformer(dataclasses.replace(cfg, steer=steers) if steers else cfg)


def _init_tokens(config):
  return jnp.zeros((1, config.data.seq_len), jnp.int32)


def init_params(model: Transformer, rng: jax.Array, seq_len: int = 8):
  """Returns (params, logical_specs): unboxed f32 params and their logical axis names."""
  boxed = model.init({"params": rng}, jnp.zeros((1, seq_len), jnp.int32))["params"]
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


def apply_model(model, params, tokens, rng=None, deterministic=True):
  """-> (logits, mutated collections {'losses', 'intermediates'}) under the logical-axis rules."""
  rngs = {"router": rng} if rng is not None else {}
  with nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    return model.apply({"params": params}, tokens, deterministic=deterministic, rngs=rngs,
                       mutable=_MUTABLE)


def aux_loss(mutated) -> jax.Array:
  """Sum of every sown (already weighted) auxiliary loss, float32."""
  return jnp.asarray(sum(jnp.sum(x) for x in jax.tree.leaves(mutated.get("losses", {}))),
                     jnp.float32)


def loss_fn(model, params, batch, rng, deterministic, *, with_updates: bool = False):
  """Mean next-token cross-entropy + sown auxiliary losses. -> (total, (ce, aux, intermediates))
  (and the sown ``param_updates`` as a fourth entry with ``with_updates``)."""
  inputs, targets = batch[:, :-1], batch[:, 1:]
  logits, mutated = apply_model(model, params, inputs, rng, deterministic)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  aux = aux_loss(mutated)
  alpha = model.cfg.moe.consistency_loss_weight if model.cfg.moe is not None else 0.0
  if alpha > 0 and not deterministic:
    # THOR (see layers/routers/stochastic.py): a second pass with independent random experts;
    # mean of both cross-entropies + alpha x the symmetric KL between the two predictions.
    logits2, mutated2 = apply_model(model, params, inputs, jax.random.fold_in(rng, 1), False)
    ce = (ce + optax.softmax_cross_entropy_with_integer_labels(logits2, targets).mean()) / 2
    aux = (aux + aux_loss(mutated2)) / 2
    lp, lq = jax.nn.log_softmax(logits), jax.nn.log_softmax(logits2)
    sym_kl = jnp.mean(jnp.sum((jnp.exp(lp) - jnp.exp(lq)) * (lp - lq), axis=-1)) / 2
    aux = aux + alpha * sym_kl
  out = (ce, aux, mutated.get("intermediates", {}))
  if with_updates:
    out += (jax.lax.stop_gradient(mutated.get("param_updates", {})),)
  return ce + aux, out


def apply_param_updates(params, updates):
  """params + the sown deltas, at the same paths ({'layer_1': {'moe': {'router':
  {'selection_bias': (delta,)}}}} adds delta to params['layer_1']['moe']['router']
  ['selection_bias']); every other parameter is returned unchanged."""
  if not updates:
    return params
  params = dict(params)
  for name, sub in updates.items():
    if isinstance(sub, tuple):       # sow's tuple of values: the leaf itself
      params[name] = params[name] + sum(sub)
    else:
      params[name] = apply_param_updates(params[name], sub)
  return params


def _in_mesh(fn, mesh: Mesh):
  """``fn`` traced with ``mesh`` as the abstract mesh, wherever the jitted call happens."""
  def traced(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)
  return traced


def _on_mesh(fn, mesh):
  """Runs a jitted function with ``mesh`` current, so logical constraints resolve on it."""
  def call(*args):
    with jax.set_mesh(mesh):
      return fn(*args)
  call.jitted, call.mesh = fn, mesh        # for .lower(...) in benchmarks and tests
  return call


def make_train_step(model, tx, config, shardings, mesh: Mesh):
  """(state, batch) -> (state, metrics). ``metrics['finite']`` is False when the loss or any
  gradient is NaN/inf: the caller checks it without a host sync every step (see Trainer)."""
  schedule = learning_rate_schedule(config.train)
  base_rng = jax.random.fold_in(jax.random.key(config.seed), 1)

  def train_step(state, batch):
    rng = jax.random.fold_in(base_rng, state["step"])
    grad_fn = jax.value_and_grad(
        lambda p: loss_fn(model, p, batch, rng, False, with_updates=True), has_aux=True)
    (loss, (ce, aux, inter, param_updates)), grads = grad_fn(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = apply_param_updates(optax.apply_updates(state["params"], updates), param_updates)
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
    grad_norm = optax.tree.norm(grads)
    metrics = {"loss": loss, "ce": ce, "aux": aux, "grad_norm": grad_norm,
               "lr": schedule(state["step"]), "moe": inter,
               "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm)}
    return new_state, metrics

  step = jax.jit(_in_mesh(train_step, mesh),
                 in_shardings=(shardings, sharding_lib.batch_sharding(mesh)),
                 out_shardings=(shardings, None), donate_argnums=(0,))
  return _on_mesh(step, mesh)


def make_eval_step(model, shardings, mesh: Mesh, weak_model=None, contrast_weight: float = 0.0):
  """-> jitted (params, batch) -> (cross-entropy, intermediates). With ``weak_model`` the loss
  is that of self-contrast logits (1 + b) model - b weak_model (b = ``contrast_weight``)."""
  def eval_step(params, batch):
    if weak_model is None or not contrast_weight:
      _, (ce, _, inter) = loss_fn(model, params, batch, jax.random.key(0), True)
      return ce, inter
    inputs, targets = batch[:, :-1], batch[:, 1:]
    strong, mutated = apply_model(model, params, inputs)
    weak, _ = apply_model(weak_model, params, inputs)
    logits = steer_lib.contrast_logits(strong, weak, contrast_weight)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    return ce, mutated.get("intermediates", {})
  step = jax.jit(_in_mesh(eval_step, mesh),
                 in_shardings=(shardings["params"], sharding_lib.batch_sharding(mesh)))
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
  """Mean validation cross-entropy over the first ``max_batches`` batches of the held-out split;
  the result names its data (``val_data``) so a number is never read without its source."""
  n = min(data.num_val_batches, max_batches)
  losses, steered = [], []
  for i in range(n):
    ce, inter = eval_step(params, val_batch(data, i, mesh))
    losses.append(float(ce))
    steered.append(steer_lib.steer_counts(inter))
  loss = float(np.mean(losses))
  out = {"val_loss": loss, "val_ppl": math.exp(loss), "val_bpb": loss / math.log(2),
         "val_data": f"{data.source}, validation split: {n} batches x {data.batch_size} x "
                     f"{data.seq_len} tokens"}
  summary = steer_lib.summarize(steered)
  if summary:
    out["steer"] = summary
  return out
