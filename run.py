"""moejax entry point.

  python run.py --config=configs/deepseekmoe.py --workdir=runs/dsm --mode=train \
      --config.model.moe.num_experts=8 --config.data.path=../shared/data/tinyshakespeare.txt

Re-running ``train`` in the same workdir resumes from its latest checkpoint.
"""
from absl import app, flags
from ml_collections import config_flags

from moejax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/default", "Checkpoints, metrics and config.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "What to do.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  try:
    config_lib.validate(config)
  except config_lib.ConfigError as e:
    raise app.UsageError(str(e)) from None
  from moejax.train import trainer  # after validation: bad configs fail before JAX starts work
  {"train": trainer.train, "eval": trainer.eval_only, "sample": trainer.sample_only}[_MODE.value](
      config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
