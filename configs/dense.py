"""Dense baseline: every layer a SwiGLU FFN of hidden 512 (the active size of every MoE config)."""
from moejax.config import base_config


def get_config():
  c = base_config()
  c.model.moe.num_experts = 0
  c.model.ffn_hidden = 512
  return c
