"""Ragged all-to-all: send each peer only the rows that exist, with a gather-free custom VJP.

``jax.lax.ragged_all_to_all`` (XLA on GPU and TPU) moves K slices of a device's ``operand``:
slice i, rows ``[input_offsets[i], input_offsets[i] + send_sizes[i])``, goes to peer
``i // (K / n)`` and is written there at row ``output_offsets[i]`` (an offset in the *receiver's*
buffer); ``recv_sizes`` lists what each device receives, in the same slice order as seen by the
receiver. A ``RaggedExchange`` holds those four arrays plus the two that describe the same
exchange from the receiving side, so that the exchange can be run backwards (the VJP, and the
return trip of the expert outputs) without further collectives.

XLA:CPU does not implement the collective (UNIMPLEMENTED in jaxlib 0.10). There ``emulate=True``
runs an all-gather based version with identical semantics, so the ragged exchange logic (offsets,
layout, truncation, gradients) is tested on CPU meshes; it moves n x the data and is a
correctness stand-in, not a fast path.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RaggedExchange:
  """One ragged all-to-all in ``jax.lax.ragged_all_to_all``'s convention; all int32 [K].

  Sending side:   input_offsets, send_sizes, output_offsets (row on the receiver).
  Receiving side: recv_sizes, recv_offsets (= all_to_all(output_offsets): where slice i from
                  its source landed here), source_offsets (= all_to_all(input_offsets): where
                  that slice came from in the source's operand).
  """
  input_offsets: Array
  send_sizes: Array
  output_offsets: Array
  recv_sizes: Array
  recv_offsets: Array
  source_offsets: Array

  def reversed(self) -> "RaggedExchange":
    """The exchange that sends every received slice back to where it came from."""
    return RaggedExchange(self.recv_offsets, self.recv_sizes, self.source_offsets,
                          self.send_sizes, self.input_offsets, self.output_offsets)


def ragged_all_to_all(operand: Array, exchange: RaggedExchange, out_rows: int, axis_name: str,
                      emulate: bool = False) -> Array:
  """[out_rows, ...] buffer holding the received slices; rows nobody wrote are zero.

  Differentiable in ``operand``: the cotangent travels back by ``exchange.reversed()`` (rows
  that were not sent get zero), which needs no offsets exchange, unlike JAX's generic
  transpose rule.
  """
  return _exchange(operand, exchange, out_rows, axis_name, emulate)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _exchange(operand, exchange, out_rows, axis_name, emulate):
  return _run(operand, exchange, out_rows, axis_name, emulate)


def _exchange_fwd(operand, exchange, out_rows, axis_name, emulate):
  return _run(operand, exchange, out_rows, axis_name, emulate), (exchange, operand.shape[0])


def _exchange_bwd(out_rows, axis_name, emulate, res, g):
  exchange, in_rows = res
  back = _run(g, exchange.reversed(), in_rows, axis_name, emulate)
  return back, None


_exchange.defvjp(_exchange_fwd, _exchange_bwd)


def _run(operand, ex: RaggedExchange, out_rows, axis_name, emulate):
  output = jnp.zeros((out_rows,) + operand.shape[1:], operand.dtype)
  if not emulate:
    return jax.lax.ragged_all_to_all(operand, output, ex.input_offsets, ex.send_sizes,
                                     ex.output_offsets, ex.recv_sizes, axis_name=axis_name)
  return _emulated(operand, output, ex, axis_name)


def _emulated(operand, output, ex: RaggedExchange, axis_name):
  """The documented semantics, built from all_gather: every output row finds the (source,
  slice) that covers it, if any, and reads that row of the source's operand."""
  n = jax.lax.axis_size(axis_name)
  me = jax.lax.axis_index(axis_name)
  per_peer = ex.send_sizes.shape[0] // n
  rows_in = operand.shape[0]
  every = jax.lax.all_gather(operand, axis_name).reshape((n * rows_in,) + operand.shape[1:])
  mine = lambda a: jax.lax.dynamic_slice_in_dim(jax.lax.all_gather(a, axis_name),
                                                me * per_peer, per_peer, axis=1).reshape(-1)
  start, size, src_start = mine(ex.output_offsets), mine(ex.send_sizes), mine(ex.input_offsets)
  src = jnp.repeat(jnp.arange(n), per_peer)                                   # [n * per_peer]
  r = jnp.arange(output.shape[0])[:, None]
  inside = (r >= start) & (r < start + size)                                  # [R, n * per_peer]
  flat = jnp.sum(jnp.where(inside, src * rows_in + src_start + r - start, 0), axis=1)
  hit = jnp.any(inside, axis=1).reshape((-1,) + (1,) * (operand.ndim - 1))
  return jnp.where(hit, every[flat], output)
