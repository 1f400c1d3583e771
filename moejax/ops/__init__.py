"""Kernels behind the MoE layers: ``gmm`` (grouped matmul) and ``tgmm`` (its weight gradient),
with interchangeable backends (see grouped_matmul.py), and ``gmm_ternary`` over 2-bit packed
ternary weights (ternary_matmul.py)."""
from moejax.ops.grouped_matmul import backends, gmm, register_backend, resolve_backend, tgmm
from moejax.ops.ternary_matmul import gmm_ternary

__all__ = ["backends", "gmm", "gmm_ternary", "register_backend", "resolve_backend", "tgmm"]
