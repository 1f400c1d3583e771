"""moejax entry point.

  python run.py --config=configs/deepseekmoe.py --workdir=runs/dsm --mode=train \
      --config.model.moe.num_experts=8 --config.data.path=../shared/data/tinyshakespeare.txt
  python run.py --workdir=runs/dsm --mode=eval      # the model as trained: runs/dsm/config.json
  python run.py --workdir=runs/dsm --mode=sample --config.sample.prompt="ROMEO:"
  python run.py --workdir=runs/dsm --mode=analyze   # routing traces + report: runs/dsm/analysis

Re-running ``train`` in the same workdir resumes from its latest checkpoint; settings that define
the trained model cannot change on resume, eval or sample (the error names each one). Without
--config, ``train`` in a workdir that holds a config.json (a compressed or imported model)
trains that model: ``python run.py --mode=train --workdir=runs/dsm-pruned --config.train.steps=100``.
Exit status: 0 done, 1 training diverged (non-finite loss), 2 bad settings, 130 interrupted.
"""
import importlib.util
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from moejax import config as config_lib
from moejax import logs
from moejax.parallel import distributed
from moejax.train import trainer

FLAGS = flags.FLAGS
_DEFAULT_CONFIG = "configs/default.py"
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG,
    "Experiment config file (train); eval/sample use the workdir's config.json and apply only "
    "the --config.* overrides.")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/default", "Checkpoints, metrics and config.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample", "analyze", "upcycle"],
                          "What to do (analyze: routing traces and report, config.analyze; "
                          "upcycle: step 0 of an MoE from config.upcycle.source).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for multi-host runs "
    "(or env MOEJAX_COORDINATOR_ADDRESS); unset on one host.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def _fail(message: str, code: int = 2):
  print(f"run.py: error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def _flag_value(argv, name):
  for arg in argv[1:]:
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
  return None


def _explain_flag_error(argv, error: Exception) -> str:
  """One line for a flag the parser refused: unknown key, bad config file, bad value."""
  config_path = _flag_value(argv, "config") or _DEFAULT_CONFIG
  if not os.path.isfile(config_path):
    return f"--config={config_path}: file not found"
  try:
    spec = importlib.util.spec_from_file_location("_moejax_config", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    known = config_lib.flatten(module.get_config())
  except Exception as e:  # noqa: BLE001  (whatever the file raised, in one line)
    return f"--config={config_path}: cannot load it: {type(e).__name__}: {e}"
  for arg in argv[1:]:
    if arg.startswith("--config."):
      key = arg[len("--config."):].split("=", 1)[0]
      if key not in known:
        return str(config_lib.unknown_key_error(key, known))
  lines = [line for line in str(error).splitlines() if line.strip()]
  return lines[0] if lines else type(error).__name__


def _parse_flags(argv):
  try:
    return FLAGS(argv)
  except Exception as e:   # absl/config_flags raise several types; none needs a traceback
    _fail(_explain_flag_error(argv, e))


def _load_config():
  path = config_flags.get_config_filename(FLAGS["config"])
  if not os.path.isfile(path):
    _fail(f"--config={path}: file not found")
  try:
    return _CONFIG.value
  except Exception as e:   # the config file itself raised: say which file, keep it one line
    _fail(f"--config={path}: cannot load it: {str(e).strip().splitlines()[-1]}")


def _train_config(workdir):
  """--mode=train: the --config file; without one, a workdir that holds a config.json (a run
  to resume, an imported or compressed model to fine-tune) trains from it, with the --config.*
  overrides (model-defining ones are refused as on resume)."""
  if not FLAGS["config"].present:
    from moejax.train import workdir as workdir_lib
    saved = workdir_lib.load_config(workdir)
    if saved is not None:
      logs.progress(f"config: {os.path.join(workdir, 'config.json')} (no --config given)")
      return config_lib.apply_overrides(saved, config_flags.get_override_values(FLAGS["config"]))
  return _load_config()


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {argv[1:]}")
  logs.setup_console_logging()
  mode, workdir = _MODE.value, _WORKDIR.value
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if mode == "train":
      result = trainer.train(_train_config(workdir), workdir)
      if result["interrupted"]:
        sys.exit(130)
      return
    if mode == "upcycle":
      trainer.upcycle_only(_load_config(), workdir)
      return
    overrides = config_flags.get_override_values(FLAGS["config"])
    if FLAGS["config"].present:
      logs.progress(f"note: --mode={mode} uses {os.path.join(workdir, 'config.json')}; "
                    "--config contributes only its --config.* overrides")
    if mode == "eval":
      trainer.eval_only(workdir, overrides)
    elif mode == "analyze":
      trainer.analyze_only(workdir, overrides)
    else:
      trainer.sample_only(workdir, overrides)
  except config_lib.ConfigError as e:
    _fail(str(e))
  except trainer.NonFiniteLossError as e:
    _fail(str(e), code=1)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
