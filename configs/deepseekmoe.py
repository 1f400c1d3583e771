"""DeepSeekMoE (Dai et al. 2024): fine-grained segmentation + shared experts, dropless.

Same N=16, K=2, d_ff=256 as gshard.py, segmented m=4: 64 fine experts of hidden 64, 1 shared
and 63 routed, 7 routed active (the paper's 2B layout scaled down). Active FFN size 8*64 = 512
(= dense), total 4096 (= switch, gshard). Gates are not renormalised (paper eq. 10).
"""
from moejax.config import base_config


def get_config():
  c = base_config()
  e = c.model.moe
  e.num_experts, e.top_k, e.expert_hidden = 16, 2, 256
  e.segments, e.num_shared_experts = 4, 1
  e.renormalize = False
  e.dispatch = "dropless"
  e.load_balance_weight = 0.01   # alpha_1 of the 2B model
  return c
