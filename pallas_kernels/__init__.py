"""Pallas grouped-matmul kernels (TPU/Mosaic and GPU/Triton) with one differentiable entry point.

  from pallas_kernels import gmm, tgmm, make_group_metadata
  from pallas_kernels import gmm_ternary, pack_planes     # 2-bit packed ternary weights
"""
from pallas_kernels.metadata import GroupMetadata, local_rows, make_group_metadata
from pallas_kernels.ops import TARGETS, Tiling, default_target, default_tiling, gmm, tgmm
from pallas_kernels.ternary import gmm_ternary, pack_planes, unpack_planes

__all__ = ["GroupMetadata", "local_rows", "make_group_metadata", "TARGETS", "Tiling",
           "default_target", "default_tiling", "gmm", "tgmm", "gmm_ternary", "pack_planes",
           "unpack_planes"]
