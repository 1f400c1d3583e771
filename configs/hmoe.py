"""HMoE (Wang et al. 2024, arXiv 2408.10681): 8 SwiGLU experts of different hidden sizes on the
paper's arithmetic ladder {9, 11, ..., 23} scaled to 8 x 512 hidden units in all (the parameters
of 8 experts of 512), top-2, with the parameter penalty (0.1) in place of the load-balance loss.

The paper's top-P form: --config.model.moe.router=top_p --config.model.moe.top_p=0.6
--config.model.moe.top_k=4 (at most 4 experts) --config.model.moe.entropy_loss_weight=0.03.
Other ladders: --config.model.moe.expert_size_ladder=geometric|hybrid, or list the sizes with
--config.model.moe.expert_sizes='(928,720,...)' (and expert_size_ladder=none).
"""
from moejax.config import base_config


def get_config():
  c = base_config()
  e = c.model.moe
  e.num_experts, e.top_k, e.expert_hidden = 8, 2, 512
  e.expert_size_ladder = "arithmetic"
  e.renormalize = True
  e.dispatch = "dropless"
  e.load_balance_weight = 0.0
  e.parameter_penalty_weight = 0.1
  return c
