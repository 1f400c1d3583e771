"""experiments/notebooks/quickstart.ipynb runs end to end (nbclient, CPU, a few steps)."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import FAST_COMPILE, ROOT

NOTEBOOK = os.path.join(ROOT, "experiments", "notebooks", "quickstart.ipynb")


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  monkeypatch.setenv("QUICKSTART_STEPS", "30")                 # the documented overrides
  monkeypatch.setenv("QUICKSTART_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE)                # one CPU device, as on Colab
  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert all("id" in c for c in nb.cells)      # nbformat 4.5: cell ids (soon required)
  NotebookClient(nb, timeout=600, kernel_name="python3", resources={
      "metadata": {"path": str(tmp_path)}}).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "same greedy sample: True" in outputs
  assert "**Expert placement**" in outputs and "off: cross-entropy" in outputs
  assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "30")
