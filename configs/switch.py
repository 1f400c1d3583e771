"""Switch Transformer (Fedus et al. 2021): top-1 routing, capacity factor 1.25, drops overflow.

8 experts of hidden 512: active FFN size 512 (= dense), total 4096.
"""
from moejax.config import base_config


def get_config():
  c = base_config()
  e = c.model.moe
  e.num_experts, e.top_k, e.expert_hidden = 8, 1, 512
  e.renormalize = False          # Switch scales by the raw router probability
  e.dispatch, e.capacity_factor = "capacity", 1.25
  e.load_balance_weight = 0.01
  return c
