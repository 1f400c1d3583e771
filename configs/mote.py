"""MoTE (arXiv 2506.14435): the dense FFN kept as a frozen full-precision shared expert, plus
8 routed ternary experts ({-1, 0, 1} x scale, 8-bit activations, trained straight-through),
top-1 routed, all up-cycled from a trained dense run (configs/dense.py):

  python run.py --config=configs/mote.py --workdir=runs/mote --mode=train \\
      --config.upcycle.source=runs/dense

Expert widths equal the dense FFN (512), so every expert starts as a copy of it.
"""
from moejax.config import base_config


def get_config():
  c = base_config()
  e = c.model.moe
  e.num_experts, e.top_k, e.expert_hidden = 9, 2, 512     # 1 shared + 8 routed, 1 routed active
  e.num_shared_experts = 1
  e.expert_bank = "ternary_swiglu"
  e.shared_trainable = False
  e.renormalize = False
  e.dispatch = "dropless"
  c.upcycle.method = "copy"
  return c
