"""Meshes, sharding rules, expert parallelism and multi-host set-up.

Importing the package registers expert parallelism with the MoE block
(layers/expert_execution.py); ``import moejax`` does.
"""
from moejax.parallel import expert_parallel  # noqa: F401  (registers the execution)
