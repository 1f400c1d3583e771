"""The workdir of a run, and its ``config.json`` as the source of truth for the trained model.

Eval, sample and resume rebuild the model from ``config.json``, never from whatever config the
command line happens to name. Settings split in two:

* settings that define the trained model (everything under ``model.`` except the execution
  options in ``EXECUTION_KEYS``): changing one would load the checkpoint into a different
  function, or fail deep inside orbax on a shape; such a change is refused, naming each key;
* everything else (data, steps, optimizer schedule, sampling, mesh, execution options): may
  change; each change is printed, so a number never silently comes from other settings.

Every check here runs before anything is written to the workdir.
"""
from __future__ import annotations

import json
import os
import tempfile

import ml_collections

from moejax.config import base_config, flatten
from moejax.errors import ConfigError

CONFIG_FILE = "config.json"

# model.* settings that choose how the same model is computed, not what it computes.
# (max_length bounds generation; decode/decode_path choose how a generated token is computed)
EXECUTION_KEYS = frozenset({"model.moe.gmm_backend", "model.moe.expert_parallel",
                            "model.moe.all_to_all", "model.moe.row_align", "model.max_length",
                            "model.mla.decode", "model.moe.decode_path"})


def defines_model(key: str) -> bool:
  return key.startswith("model.") and key not in EXECUTION_KEYS


def prepare(workdir: str) -> None:
  """Creates ``workdir`` if needed and checks that it is a writable directory."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir}: is a file, not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-test-"):
      pass
  except OSError as e:
    raise ConfigError(f"--workdir={workdir}: cannot write there ({e.strerror})") from None


def latest_checkpoint(workdir: str) -> int | None:
  """The newest finished checkpoint step, read from the directory names (orbax writes each step
  under a temporary name and renames it when complete). Creates nothing."""
  root = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(root):
    return None
  steps = [int(n) for n in os.listdir(root) if n.isdigit()]
  return max(steps) if steps else None


def require_trained(workdir: str, mode: str) -> None:
  """eval/sample need a trained workdir; checked before anything is created in it."""
  if not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir}: no such directory; --mode={mode} needs the "
                      "workdir of a training run")
  if latest_checkpoint(workdir) is None:
    raise ConfigError(f"--workdir={workdir}: holds no checkpoint; train first "
                      f"(--mode=train --workdir={workdir})")
  if not os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
    raise ConfigError(f"--workdir={workdir}: has checkpoints but no {CONFIG_FILE}, so the model "
                      "they belong to is unknown")


def load_config(workdir: str) -> ml_collections.ConfigDict | None:
  """The saved config, with settings added to moejax since it was written at their defaults."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"--workdir={workdir}: cannot read {CONFIG_FILE} ({e})") from None
  config = ml_collections.ConfigDict(saved)
  have = flatten(config)
  for key, value in flatten(base_config()).items():
    if key not in have:
      *parents, leaf = key.split(".")
      node = config
      for p in parents:
        if p not in node:
          node[p] = ml_collections.ConfigDict()
        node = node[p]
      node[leaf] = value
  return config


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes ``config.json`` atomically (a reader never sees half a file)."""
  path = os.path.join(workdir, CONFIG_FILE)
  fd, tmp = tempfile.mkstemp(dir=workdir, prefix=".config-", suffix=".json")
  with os.fdopen(fd, "w") as f:
    f.write(config.to_json(indent=2))
  os.replace(tmp, path)


def _normal(value):
  return json.loads(json.dumps(value))       # tuples and lists compare equal, as in the file


def changes(old: ml_collections.ConfigDict, new: ml_collections.ConfigDict):
  """[(key, old value, new value)] for every setting that differs; missing = None."""
  a, b = flatten(old), flatten(new)
  out = []
  for key in list(a) + [k for k in b if k not in a]:
    va, vb = _normal(a.get(key)), _normal(b.get(key))
    if va != vb:
      out.append((key, a.get(key), b.get(key)))
  return out


def _lines(diffs) -> str:
  return "\n".join(f"  {k}: {old!r} -> {new!r}" for k, old, new in diffs)


def check_compatible(saved, requested, workdir: str, action: str) -> list:
  """Refuses changes of model-defining settings (all listed, one line each); returns the other
  changes for the caller to print (sampling options are per call: not returned)."""
  diffs = changes(saved, requested)
  model = [d for d in diffs if defines_model(d[0])]
  if model:
    raise ConfigError(
        f"--workdir={workdir} holds a model trained with other settings; these define the "
        f"trained model and cannot change to {action} it:\n{_lines(model)}\n"
        f"Use a new --workdir, or the settings in {os.path.join(workdir, CONFIG_FILE)}.")
  return [d for d in diffs if not d[0].startswith("sample.")]


def describe_changes(diffs, workdir: str) -> str:
  return (f"note: settings differ from {os.path.join(workdir, CONFIG_FILE)} (allowed: they do "
          f"not change the trained model):\n{_lines(diffs)}")
