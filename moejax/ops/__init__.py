"""Kernels behind the MoE layers: ``gmm`` (grouped matmul) and ``tgmm`` (its weight gradient),
with interchangeable backends (see grouped_matmul.py)."""
from moejax.ops.grouped_matmul import backends, gmm, register_backend, resolve_backend, tgmm

__all__ = ["backends", "gmm", "register_backend", "resolve_backend", "tgmm"]
