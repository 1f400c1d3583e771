"""Compression of a trained MoE into a smaller regular workdir: expert pruning (frequency,
gate mass, task, domain), neuron-level pruning (HEAPr), merging (M-SMoE) and per-expert mixed
precision (MC#).

  python -m moejax.compress --workdir=runs/x --out=runs/x-pruned --method=frequency --keep=0.5
  moejax.compress("runs/x", "runs/x-pruned", method="merge", keep=0.5)

See methods.py for each method's score and pipeline.py for what is written and measured.
"""
from moejax.compress.methods import METHODS  # noqa: F401
from moejax.compress.pipeline import compress  # noqa: F401
