"""Routing traces: which experts every token used, per MoE layer, from the model's own forward.

The MoE block sows the routing its experts run (after any steering) to the ``"traces"``
collection; ``apply_with_traces`` makes that collection mutable, so a trace is the forward pass
itself, never a second implementation of routing that could drift from it.

A trace file (``WORKDIR/analysis/traces_<source>.npz``) needs only NumPy to read:

  tokens      [N] int32            the token ids, in order (windows of data.seq_len)
  layers      [M] int32            the model layer index of each MoE layer (a Chain-of-Experts
                                   layer appears once per iteration)
  experts     [M, N, k] int32      routed experts per token; -1 where fewer than k were used
                                   (top-p, null experts, steering)
  gates       [M, N, k] float32    their combine weights (0 where experts is -1)
  num_experts []                   routed experts per layer (E)
  probs       [M, N, E] float32    the router's probabilities (only with analyze.probs=True)
"""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util


@dataclasses.dataclass
class Traces:
  """One source's routing; see the module docstring for the arrays."""
  source: str
  tokens: np.ndarray
  layers: np.ndarray
  experts: np.ndarray
  gates: np.ndarray
  num_experts: int
  probs: np.ndarray | None = None

  @property
  def num_tokens(self) -> int:
    return len(self.tokens)

  def take(self, start: int, stop: int) -> "Traces":
    """Tokens [start, stop) (e.g. a fitting part and a held-out part)."""
    probs = None if self.probs is None else self.probs[:, start:stop]
    return dataclasses.replace(self, tokens=self.tokens[start:stop],
                               experts=self.experts[:, start:stop],
                               gates=self.gates[:, start:stop], probs=probs)

  def save(self, path: str) -> str:
    arrays = dict(tokens=self.tokens.astype(np.int32), layers=self.layers.astype(np.int32),
                  experts=self.experts.astype(np.int32), gates=self.gates.astype(np.float32),
                  num_experts=np.int32(self.num_experts))
    if self.probs is not None:
      arrays["probs"] = self.probs.astype(np.float32)
    tmp = path + ".tmp.npz"           # never a half-written trace under the final name
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return path

  @classmethod
  def load(cls, path: str) -> "Traces":
    with np.load(path) as f:
      return cls(source=os.path.splitext(os.path.basename(path))[0].removeprefix("traces_"),
                 tokens=f["tokens"], layers=f["layers"], experts=f["experts"],
                 gates=f["gates"], num_experts=int(f["num_experts"]),
                 probs=f["probs"] if "probs" in f else None)


@functools.partial(jax.jit, static_argnames=("model", "probs"))
def apply_with_traces(model, params, tokens, probs: bool = False):
  """tokens [B, L] -> (logits, {collection: sown values}) with the traces (and the router
  probabilities with ``probs``) and the ``intermediates`` (steering counts) collected."""
  mutable = ["traces", "intermediates"] + (["router_probs"] if probs else [])
  return model.apply({"params": params}, tokens, mutable=mutable)


def per_layer(tree) -> list[tuple[int, dict]]:
  """{'layer_3': {'moe': {'experts': (a, b)}}} -> [(3, {'experts': (a, b)})] in layer order."""
  out = []
  for path, value in traverse_util.flatten_dict(tree).items():
    out.append((int(path[0].split("_")[1]), path[-1], value))
  layers = sorted({layer for layer, _, _ in out})
  return [(layer, {name: value for l, name, value in out if l == layer}) for layer in layers]


def collect(model, params, windows: np.ndarray, batch_size: int, *, source: str = "",
            probs: bool = False, progress=None) -> Traces:
  """Routing of every token of ``windows`` [W, L] (run ``batch_size`` windows at a time; the
  last batch is padded and the padding dropped)."""
  rows, length = windows.shape
  parts: dict = {}
  for start in range(0, rows, batch_size):
    chunk = windows[start:start + batch_size]
    real = len(chunk)
    if real < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - real, length), chunk.dtype)])
    _, sown = apply_with_traces(model, params, jnp.asarray(chunk, jnp.int32), probs=probs)
    keep = real * length
    for layer, values in per_layer(sown["traces"]):
      for it, (e, g) in enumerate(zip(values["expert_index"], values["gate"])):
        slot = parts.setdefault((layer, it), {"experts": [], "gates": [], "probs": []})
        slot["experts"].append(np.asarray(e)[:keep])
        slot["gates"].append(np.asarray(g)[:keep])
    if probs:
      for layer, values in per_layer(sown["router_probs"]):
        for it, p in enumerate(values["probs"]):
          parts[(layer, it)]["probs"].append(np.asarray(p)[:keep])
    if progress is not None:
      progress(min(start + batch_size, rows), rows)
  if not parts:
    raise ValueError("the model has no routed MoE layer to trace")
  keys = sorted(parts)
  k = max(parts[key]["experts"][0].shape[1] for key in keys)
  pad = lambda a, fill: np.pad(a, ((0, 0), (0, k - a.shape[1])), constant_values=fill)
  experts = np.stack([pad(np.concatenate(parts[key]["experts"]), -1) for key in keys])
  gates = np.stack([pad(np.concatenate(parts[key]["gates"]), 0.0) for key in keys])
  num_experts = model.cfg.moe.num_routed
  p = np.stack([np.concatenate(parts[key]["probs"])[:, :num_experts] for key in keys]) \
      if probs else None
  return Traces(source=source, tokens=windows.reshape(-1).astype(np.int32),
                layers=np.asarray([layer for layer, _ in keys], np.int32),
                experts=experts.astype(np.int32), gates=gates.astype(np.float32),
                num_experts=num_experts, probs=p)
