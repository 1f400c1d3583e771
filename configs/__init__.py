"""Named experiment configs. Installed as ``moejax.configs`` (see setup.py), so
``moejax.get_config("gshard")`` works without a source checkout; ``run.py --config=configs/x.py``
loads the same files by path."""
