"""GShard (Lepikhin et al. 2020): top-2 routing with renormalised gates, capacity-based dispatch.

16 experts of hidden 256, 2 active: active FFN size 512 (= dense), total 4096 (= switch).
"""
from moejax.config import base_config


def get_config():
  c = base_config()
  e = c.model.moe
  e.num_experts, e.top_k, e.expert_hidden = 16, 2, 256
  e.renormalize = True
  e.dispatch, e.capacity_factor = "capacity", 2.0
  e.load_balance_weight = 0.01
  return c
