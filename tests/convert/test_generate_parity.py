"""Conversion + decoding together against transformers: a tiny random Hugging Face model of each
family moejax imports, converted, generates (greedy, float32, a batch of two prompts of
different lengths) exactly the tokens transformers' ``generate`` gives from the original.

The cases also carry settings the logits tests leave at their defaults: a DeepSeek-V3
config.json without ``rope_interleave`` (transformers: interleaved) and with rms_norm_eps 1e-3
(its latent norms keep 1e-6), a Qwen2-MoE without q/k/v biases."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import moejax  # noqa: E402
from moejax.convert import import_hf  # noqa: E402
from tests.convert.test_hf import (check_close, hf_logits, hf_model,  # noqa: E402
                                   moejax_logits, restored)

NEW = 32
PROMPTS = [[5, 17, 99, 3, 44, 120, 7, 200, 31], [64, 2, 250]]
PARITY = {
    "mixtral": {},
    "qwen3_moe": {},
    "olmoe": {},
    "qwen2_moe": {"qkv_bias": False},
    "deepseek_v3": {"rms_norm_eps": 1e-3},
}


def hf_generate(model, prompts, n):
  """transformers' greedy generate over the left-padded batch, no early stop at eos."""
  width = max(map(len, prompts))
  ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
  with torch.no_grad():
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
  return out[:, width:].numpy()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PARITY))
def test_converted_model_generates_what_transformers_generates(name, tmp_path):
  model = hf_model(name, **PARITY[name])
  src = tmp_path / "hf"
  model.save_pretrained(src)
  if name == "deepseek_v3":                 # the key absent: transformers reads True
    cfg = json.loads((src / "config.json").read_text())
    assert cfg.pop("rope_interleave") is True
    (src / "config.json").write_text(json.dumps(cfg))
    model = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    assert model.config.rope_interleave is True
  import_hf(str(src), str(tmp_path / "wd"), progress=False)
  config, params = restored(str(tmp_path / "wd"))
  if name == "deepseek_v3":
    assert config.model.mla.latent_norm_eps == 1e-6 and config.model.norm_eps == 1e-3
  tokens = np.random.default_rng(0).integers(0, 256, (2, 12))
  check_close(moejax_logits(config, params, tokens), hf_logits(model, tokens))
  got = moejax.generate(moejax.build_model(config), params, PROMPTS, NEW)
  want = hf_generate(model, PROMPTS, NEW)
  for row, tokens in enumerate(got.tokens):
    np.testing.assert_array_equal(tokens, want[row], err_msg=f"{name} prompt {row}")
