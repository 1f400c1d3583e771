"""Device meshes from config: axes (data, fsdp, expert, tensor).

  data    pure data parallelism: parameters replicated, batch split.
  fsdp    batch split and parameters/optimizer state sharded along their ``embed`` axis
          (ZeRO-3 style; gathered per layer by XLA).
  expert  batch split for dense parts, expert banks split along ``expert``.
  tensor  Megatron-style split of ``mlp``/``heads``/``vocab``.

One size may be -1: it takes whatever devices the others leave.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from moejax.errors import ConfigError

AXES = ("data", "fsdp", "expert", "tensor")


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
  sizes = {a: int(mesh_cfg[a]) for a in AXES}
  free = [a for a, s in sizes.items() if s == -1]
  bad = [a for a, s in sizes.items() if s == 0 or s < -1]
  if bad:
    raise ConfigError(f"config.mesh.{bad[0]}: must be a positive size or -1, got {sizes[bad[0]]}")
  if len(free) > 1:
    raise ConfigError(f"config.mesh: at most one axis may be -1, got {free}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise ConfigError(f"config.mesh: fixed axes multiply to {fixed}, which does not divide the "
                       f"{num_devices} devices, so config.mesh.{free[0]}=-1 cannot fill them")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(f"config.mesh: data*fsdp*expert*tensor = "
                     f"{'*'.join(str(sizes[a]) for a in AXES)} = {fixed}, but there are "
                     f"{num_devices} devices; the sizes must multiply to the device count "
                     "(or set one to -1)")
  return sizes


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """A mesh with Auto axes: XLA's partitioner propagates shardings from the logical-axis
  annotations (Explicit axes, jax 0.10's default for ``jax.make_mesh``, would turn each
  annotation into an assertion)."""
  if devices is None:
    devices = jax.devices()
    n = int(mesh_cfg.get("num_devices", -1))
    if n > len(devices):
      raise ConfigError(f"config.mesh.num_devices={n} but only {len(devices)} devices exist")
    devices = devices if n == -1 else devices[:n]
  devices = list(devices)
  sizes = mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in AXES)
  auto = (AxisType.Auto,) * len(AXES)
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, AXES, devices=devices, axis_types=auto)
  return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=auto)


def batch_axes_size(mesh: Mesh) -> int:
  """How many ways the batch is split (data * fsdp * expert)."""
  return mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
