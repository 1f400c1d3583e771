"""The default experiment (`make run`): DeepSeekMoE-style tiny LM on the embedded corpus."""
from moejax.configs import deepseekmoe


def get_config():
  return deepseekmoe.get_config()
