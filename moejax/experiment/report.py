"""What an experiment script leaves in its output directory: results.md (the tables, also
printed), results.json (every run, curves included) and plots."""
from __future__ import annotations

import json
import os

from moejax.experiment import plots
from moejax.logs import progress as say


def write_results(out_dir: str, text: str, data) -> None:
  """``text`` -> results.md (and stdout), ``data`` -> results.json."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(data, f)
  print(text)


def step_time_table(times: dict, baseline: str) -> str:
  """Markdown table of seconds per step (``Study.step_times``) and the ratio to ``baseline``."""
  lines = [f"| config | ms / step | vs {baseline} |", "|---|---|---|"]
  for name, sec in times.items():
    lines.append(f"| {name} | {sec * 1e3:.1f} | {sec / times[baseline]:.2f}x |")
  return "\n".join(lines)


def write_study(result, out_dir: str, text: str, *, title: str,
                curves=("val_loss", "load_max_over_mean")) -> None:
  """One study: results.md/json and curves.png (mean ± 1 std over seeds). For scripts: selects
  matplotlib's non-interactive backend."""
  write_results(out_dir, text, result.to_json())
  import matplotlib
  matplotlib.use("Agg")
  plots.save(plots.plot_curves(result, curves, title=title), os.path.join(out_dir, "curves.png"))
  say(f"wrote {out_dir}/results.md, results.json, curves.png")
