"""Reading Hugging Face config.json files as transformers does: every field the importer reads
defaults, when absent, to transformers' own default (checked against its config classes), and
changes the import when present; the converter's console output; a workdir saved from Python
converts."""
import copy
import inspect
import json
import os
import subprocess
import sys

import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from moejax.convert import export_hf  # noqa: E402
from moejax.convert.hf_config import HF_DEFAULTS, config_from_hf, rope_interleave  # noqa: E402
from moejax.errors import ConversionError  # noqa: E402
from tests.conftest import ROOT, tiny_config  # noqa: E402
from tests.convert.test_hf import BASE, CASES, hf_model  # noqa: E402

CLASSES = {"mixtral": "MixtralConfig", "qwen3_moe": "Qwen3MoeConfig", "olmoe": "OlmoeConfig",
           "qwen2_moe": "Qwen2MoeConfig", "deepseek_v3": "DeepseekV3Config"}
# read only together with another field that is off in these configs (Qwen's window needs
# use_sliding_window); DeepSeek-V3's head sizes are qk_nope/qk_rope_head_dim and its latent
# attention has no key/value heads
NOT_READ_ALONE = {("qwen3_moe", "sliding_window"), ("qwen2_moe", "sliding_window"),
                  ("deepseek_v3", "head_dim"), ("deepseek_v3", "num_key_value_heads")}
ALIASES = ("num_local_experts", "num_experts", "n_routed_experts")


@pytest.mark.parametrize("family", list(CLASSES))
def test_defaults_are_transformers_defaults(family):
  cls = getattr(transformers, CLASSES[family])
  signature = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}
  instance = cls()
  for key, ours in HF_DEFAULTS[family].items():
    if key == "rope_theta":
      assert instance.rope_parameters["rope_theta"] == ours
    elif key in signature:
      assert signature[key] == ours, (family, key, signature[key], ours)
    else:   # not a field of this family: the model code's fallback (head_dim: hidden/heads)
      assert ours in (None, False) and (key != "head_dim" or family == "deepseek_v3"
                                        or not hasattr(instance, key)), (family, key)


def _full(family):
  cls_name, _, extra = CASES[family]
  return getattr(transformers, cls_name)(**{**BASE, **extra}).to_dict()


def _import(hf):
  """What the import makes of ``hf``: its config overrides and the weight layout it reads."""
  try:
    fam, overrides = config_from_hf(hf)
    return overrides, rope_interleave(fam, hf)
  except ConversionError as e:
    return str(e)


def _changed(value):
  if isinstance(value, bool):
    return not value
  if isinstance(value, int):
    return value + 1
  if isinstance(value, float):
    return value * 2 if value else 0.1
  if isinstance(value, str):
    return "gelu"
  return [0] if value is None or isinstance(value, list) else None


@pytest.mark.parametrize("family", list(CLASSES))
def test_every_field_absent_is_its_default_and_present_is_read(family):
  full = _full(family)
  for key, default in HF_DEFAULTS[family].items():
    absent, present = copy.deepcopy(full), copy.deepcopy(full)
    drop = (("rope_parameters", "rope_theta") if key == "rope_theta"
            else ALIASES if key in ALIASES else (key,))
    for k in drop:
      absent.pop(k, None)
    for k in drop:
      present.pop(k, None)
    present[key] = default
    assert _import(absent) == _import(present), (family, key)
    if (family, key) in NOT_READ_ALONE:
      continue
    other = copy.deepcopy(present)
    other[key] = _changed(default)
    if key == "head_dim" and family != "qwen3_moe":
      other[key] = 16                            # a head size the other fields allow
    assert _import(other) != _import(present), (family, key, "not read")


@pytest.mark.slow
def test_converter_prints_what_it_did_and_nothing_else(tmp_path):
  hf_model("mixtral").save_pretrained(tmp_path / "hf")
  env = dict(os.environ, PYTHONPATH=ROOT)
  p = subprocess.run([sys.executable, "-m", "moejax.convert", "--from=hf", "--to=moejax",
                      str(tmp_path / "hf"), str(tmp_path / "wd")],
                     capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  assert p.returncode == 0, p.stderr
  lines = p.stdout.strip().splitlines()
  assert len(lines) == 1 and p.stderr == "", (p.stdout, p.stderr)
  assert "imported mixtral" in lines[0] and " tensors, " in lines[0] and " MiB, " in lines[0]


def test_a_workdir_saved_from_python_converts(tmp_path):
  """Trainer.save() writes config.json with the checkpoint: the converter accepts it."""
  from moejax.train.trainer import Trainer
  c = tiny_config("deepseekmoe")
  c.model.moe.num_shared_experts, c.model.moe.renormalize = 0, True   # Mixtral's layout
  c.model.moe.num_experts, c.model.moe.segments = 4, 1
  trainer = Trainer(c, str(tmp_path / "wd"))
  trainer.save()
  trainer.close()
  assert os.path.isfile(tmp_path / "wd" / "config.json")
  out = export_hf(str(tmp_path / "wd"), str(tmp_path / "hf"), progress=False)
  assert out["family"] == "mixtral"
  assert json.loads((tmp_path / "hf" / "config.json").read_text())[
      "max_position_embeddings"] == c.data.seq_len
