"""Shardings of the training state and batches, derived from logical axis names."""
from __future__ import annotations

import math

import jax
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moejax.errors import ConfigError
from moejax.parallel.rules import LOGICAL_AXIS_RULES


def param_shardings(logical_specs, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def state_shardings(state_shape, logical_specs, tx: optax.GradientTransformation, mesh: Mesh,
                    rules=LOGICAL_AXIS_RULES) -> dict:
  """Shardings for {step, params, opt_state}: optimizer moments follow their parameters."""
  params = param_shardings(logical_specs, mesh, rules)
  replicated = NamedSharding(mesh, P())
  opt = optax.tree_map_params(tx, lambda _, s: s, state_shape["opt_state"], params,
                              transform_non_params=lambda _: replicated,
                              is_leaf=lambda x: isinstance(x, NamedSharding))
  return {"step": replicated, "params": params, "opt_state": opt}


def check_divisible(params_shape, logical_specs, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> None:
  """Raises one ConfigError naming the first parameter whose dimension the mesh cannot split."""
  flat_specs = jax.tree.leaves(logical_specs, is_leaf=lambda s: isinstance(s, P))
  flat = jax.tree_util.tree_flatten_with_path(params_shape)[0]
  for (path, leaf), spec in zip(flat, flat_specs):
    mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules)
    for dim, (size, logical, axes) in enumerate(zip(leaf.shape, spec, mesh_spec)):
      axes = (axes,) if isinstance(axes, str) else (axes or ())
      ways = math.prod(mesh.shape[a] for a in axes)
      if size % ways:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        raise ConfigError(
            f"config.mesh: parameter {name} dimension {dim} (logical {logical!r}, size {size}) "
            f"cannot be split {ways} ways over mesh axes {axes}; choose "
            f"{'*'.join('config.mesh.' + a for a in axes)} dividing {size}, or change the model")


def batch_sharding(mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> NamedSharding:
  return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length"), rules))


def describe(logical_specs, mesh: Mesh | None = None, rules=LOGICAL_AXIS_RULES) -> str:
  """One line per parameter: path, logical axes, PartitionSpec (the golden-snapshot format).

  The PartitionSpec depends only on the rules; with a mesh, each line also gives the number of
  shards per dimension.
  """
  lines = []
  flat = jax.tree_util.tree_flatten_with_path(
      logical_specs, is_leaf=lambda s: isinstance(s, P))[0]
  for path, spec in flat:
    mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules)
    line = (f"{jax.tree_util.keystr(path, simple=True, separator='/')}  "
            f"logical={tuple(spec)}  spec={mesh_spec}")
    if mesh is not None:
      ways = [math.prod(mesh.shape[a] for a in ((x,) if isinstance(x, str) else (x or ())))
              for x in mesh_spec]
      line += f"  shards={ways}"
    lines.append(line)
  return "\n".join(lines) + "\n"
