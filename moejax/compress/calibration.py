"""What compression measures on calibration text: per MoE layer, the routing each token got,
the layer's input, and (for second-order scores) the loss gradient at the layer's output.

One jitted forward per batch with the block's ``traces``, ``router_probs`` and ``moe_inputs``
collections mutable (moejax/layers/moe.py sows them for free otherwise); with ``gradients`` the
same forward runs under ``jax.grad`` with respect to the block's zero ``perturbations`` at its
output, which is the gradient of the mean next-token loss with respect to that output.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moejax.analysis.traces import per_layer
from moejax.errors import ConfigError


@dataclasses.dataclass
class LayerStats:
  """One MoE layer over T calibration tokens."""
  x: np.ndarray            # [T, D] the block's input (after the pre-FFN norm)
  index: np.ndarray        # [T, k] routed experts (-1: unused slot)
  gate: np.ndarray         # [T, k] combine weights (0 where unused)
  probs: np.ndarray        # [T, E] router probabilities
  grad: np.ndarray | None  # [T, D] d loss / d block output (mean loss over the T tokens)

  @property
  def num_experts(self) -> int:
    return self.probs.shape[1]

  def counts(self) -> np.ndarray:
    """Slots routed to each expert (activation frequency)."""
    ok = self.index >= 0
    return np.bincount(self.index[ok], minlength=self.num_experts).astype(np.float64)

  def gate_mass(self) -> np.ndarray:
    ok = self.index >= 0
    return np.bincount(self.index[ok], weights=self.gate[ok],
                       minlength=self.num_experts).astype(np.float64)


def windows(tokens: np.ndarray, seq_len: int, max_tokens: int, what: str) -> np.ndarray:
  """[W, seq_len + 1] windows (inputs and next-token targets) from the start of ``tokens``."""
  rows = min(len(tokens) - 1, max_tokens) // seq_len
  if rows < 1:
    raise ConfigError(f"{what}: {len(tokens)} tokens, fewer than one window of data.seq_len + 1 "
                      f"= {seq_len + 1}; give a longer text")
  return np.stack([tokens[i * seq_len:(i + 1) * seq_len + 1] for i in range(rows)]).astype(np.int32)


@functools.partial(jax.jit, static_argnames=("model", "gradients"))
def _calibrate(model, params, batch, gradients: bool):
  inputs, targets = batch[:, :-1], batch[:, 1:]
  collections = ["traces", "router_probs", "moe_inputs"]

  def loss(perturbations):
    variables = {"params": params}
    if perturbations is not None:
      variables["perturbations"] = perturbations
    logits, sown = model.apply(variables, inputs, mutable=collections)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(), sown

  if not gradients:
    return loss(None)[1], None
  zeros = model.apply({"params": params}, inputs, mutable=["perturbations"])[1]["perturbations"]
  grads, sown = jax.grad(loss, has_aux=True)(zeros)
  return sown, grads


def collect(model, params, batches: np.ndarray, *, gradients: bool = False,
            batch_size: int = 8, progress=None) -> dict[int, LayerStats]:
  """{MoE layer: LayerStats} over the windows ``batches`` [W, L+1]."""
  parts: dict[int, dict[str, list]] = {}
  n = len(batches)
  for start in range(0, n, batch_size):
    chunk = jnp.asarray(batches[start:start + batch_size])
    sown, grads = _calibrate(model, params, chunk, gradients)
    # the grad is of the batch mean; scale to the mean over all calibration tokens
    scale = len(chunk) / n
    values = dict(per_layer(sown["traces"]))     # fresh dicts, one per layer
    for source in ("router_probs", "moe_inputs"):
      for layer, v in per_layer(sown[source]):
        values[layer].update(v)
    if grads is not None:
      for layer, v in per_layer(grads):
        values[layer]["grad"] = (np.asarray(v["output"]) * scale,)
    for layer, v in values.items():
      slot = parts.setdefault(layer, {})
      for name in ("expert_index", "gate", "probs", "x", "grad"):
        if name in v:
          slot.setdefault(name, []).append(np.asarray(v[name][0]))
    if progress is not None:
      progress(min(start + batch_size, n), n)
  if not parts:
    raise ConfigError("the model has no routed MoE layer to compress")
  return {layer: LayerStats(x=np.concatenate(p["x"]).astype(np.float32),
                            index=np.concatenate(p["expert_index"]),
                            gate=np.concatenate(p["gate"]),
                            probs=np.concatenate(p["probs"]),
                            grad=np.concatenate(p["grad"]) if "grad" in p else None)
          for layer, p in sorted(parts.items())}
