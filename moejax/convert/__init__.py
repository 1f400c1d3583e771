"""Checkpoint conversion between moejax workdirs and Hugging Face / PyTorch checkpoints.

  from moejax.convert import import_hf, export_hf
  import_hf("path/to/hf_model", "runs/converted")     # then run.py --workdir=runs/converted
  export_hf("runs/gshard", "path/to/hf_out")          # AutoModelForCausalLM.from_pretrained

CLI: ``python -m moejax.convert --from=hf --to=moejax SRC DST`` (and ``--from=moejax --to=hf``,
``--from=moejax --to=torch``: a self-contained PyTorch module, torch_model.py, for the variants
Hugging Face has no class for).
Families and their tables: ``moejax/convert/families.py``.
"""
from moejax.convert.families import FAMILIES
from moejax.convert.hf import export_hf, import_hf, load_hf_params
from moejax.convert.torch_export import export_torch
from moejax.errors import ConversionError

__all__ = ["FAMILIES", "ConversionError", "export_hf", "export_torch", "import_hf",
           "load_hf_params"]
