"""AdamW with linear warmup + cosine decay and global-norm gradient clipping (optax)."""
from __future__ import annotations

import jax
import optax


def learning_rate_schedule(t) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.learning_rate, warmup_steps=t.warmup_steps,
      decay_steps=t.steps, end_value=t.learning_rate * t.min_lr_ratio)


def _decay_mask(params):
  # No weight decay on norm scales (1-D params); decay matrices and expert banks.
  return jax.tree.map(lambda p: p.ndim > 1, params)


def frozen_mask(model_config):
  """params -> bool tree, True for parameters that training must leave exactly as they are
  (the shared experts with ``model.moe.shared_trainable=False``); None when nothing is."""
  moe = model_config.moe
  if moe is None or moe.shared_trainable or not moe.num_shared_experts:
    return None

  def mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(getattr(k, "key", None) == "shared" for k in path), params)
  return mask


def make_optimizer(t, frozen=None) -> optax.GradientTransformation:
  """``frozen``: params -> bool tree of parameters to keep fixed: their gradients are zeroed
  before clipping (so they do not shrink the others') and they get no weight decay."""
  decay = _decay_mask
  if frozen is not None:
    decay = lambda p: jax.tree.map(lambda d, f: d and not f, _decay_mask(p), frozen(p))
  tx = optax.chain(
      optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity(),
      optax.adamw(learning_rate_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                  mask=decay),
  )
  if frozen is None:     # the state layout of every checkpoint written without freezing
    return tx
  return optax.chain(optax.masked(optax.set_to_zero(), frozen), tx)
