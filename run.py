"""moejax entry point.

  python run.py --config=configs/deepseekmoe.py --workdir=runs/dsm --mode=train \
      --config.model.moe.num_experts=8 --config.data.path=../shared/data/tinyshakespeare.txt

Re-running ``train`` in the same workdir resumes from its latest checkpoint.
"""
from absl import app, flags
from ml_collections import config_flags

from moejax import config as config_lib
from moejax.parallel import distributed

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/default", "Checkpoints, metrics and config.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "What to do.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for multi-host runs "
    "(or env MOEJAX_COORDINATOR_ADDRESS); unset on one host.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  try:
    config_lib.validate(config)
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from moejax.train import trainer  # after validation: bad configs fail before JAX does work
    modes = {"train": trainer.train, "eval": trainer.eval_only, "sample": trainer.sample_only}
    modes[_MODE.value](config, _WORKDIR.value)
  except config_lib.ConfigError as e:  # also raised after the mesh is known (divisibility)
    raise app.UsageError(str(e)) from None


if __name__ == "__main__":
  app.run(main)
