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


def make_optimizer(t) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity(),
      optax.adamw(learning_rate_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                  mask=_decay_mask),
  )
