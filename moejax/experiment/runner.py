"""Multi-seed, paired, resumable experiments: every script in ``experiments/`` runs on this.

    study = Study({"dense": dense_cfg, "moe": moe_cfg}, seeds=[0, 1, 2], work_root="/tmp/x")
    result = study.run()                  # prints an estimate first, then progress per run
    print(result.table()); print(result.comparison_table("val_loss"))

Seeds: run (config c, seed s) is ``c`` with ``config.seed = s`` and nothing else changed. The
seed drives the parameter initialisation, router noise and the data order, so within one seed
every config trains on exactly the same batches (checked: the runner fingerprints the data and
refuses a study whose configs would read different batches), and configs are compared by their
per-seed differences (``stats.compare``).

Resuming: each run has its own workdir ``work_root/<config>/seed_<s>``; a finished run leaves a
``result.json`` there (written atomically) and is never trained again; an interrupted one resumes
from its last checkpoint, bit-identical to an uninterrupted run. Re-running the same command
after a crash, Ctrl-C or a job time limit therefore continues where it stopped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
import time
from typing import Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from moejax import config as config_lib
from moejax.analysis.params import param_counts
from moejax.errors import ConfigError
from moejax.experiment import stats
from moejax.logs import progress as say
from moejax.train import metrics as metrics_lib
from moejax.train.trainer import Trainer, _fmt_time

RESULT_FILE = "result.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclasses.dataclass(frozen=True)
class RunResult:
  """One (config, seed) run: final scalars and curves [(step, value)]."""
  config: str
  seed: int
  metrics: dict          # val_loss, val_ppl, val_bpb, train_ce, tokens_per_sec, ...
  curves: dict           # train_ce, val_loss, (MoE) load_max_over_mean, router_entropy
  data_fingerprint: str  # hash of the first training batches: equal across configs of a seed
  flat_config: dict


def _load_imbalance(record: dict) -> float | None:
  """max/mean expert load, averaged over MoE layers (1 = perfectly balanced)."""
  loads = [np.asarray(v) for k, v in record.items() if k.endswith("/expert_load")]
  if not loads:
    return None
  return float(np.mean([l.max() / max(l.mean(), 1e-12) for l in loads]))


def curves_from_history(history: list[dict]) -> dict:
  train = [r for r in history if r.get("split") == "train"]
  val = [r for r in history if r.get("split") == "val"]
  curves = {"train_ce": [(r["step"], r["ce"]) for r in train],
            "val_loss": [(r["step"], r["val_loss"]) for r in val]}
  imb = [(r["step"], _load_imbalance(r)) for r in train]
  if imb and imb[0][1] is not None:
    curves["load_max_over_mean"] = imb
    curves["router_entropy"] = [(r["step"], r["router_entropy"]) for r in train]
  return curves


def data_fingerprint(trainer: Trainer, batches: int = 2) -> str:
  h = hashlib.sha256()
  for i in range(batches):
    h.update(trainer.data.batch(i).tobytes())
  h.update(trainer.data.val_batch(0).tobytes())
  return h.hexdigest()[:16]


def _write_json(path: str, obj) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".result-")
  with os.fdopen(fd, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)   # a crash never leaves a half-written result that looks finished


@dataclasses.dataclass
class Estimate:
  """Measured on a short probe per config: seconds per run and for the whole study."""
  per_run: dict          # config -> seconds for one run
  pending: dict          # config -> runs left
  details: dict          # config -> (setup+compile s, s/step, s/eval)

  @property
  def total(self) -> float:
    return sum(self.per_run[c] * n for c, n in self.pending.items())


class Study:
  """Configs x seeds, run seed by seed (so a partial study already has paired results).

  ``collect(trainer) -> dict`` adds scalars of your own to each run's metrics (after training).
  ``paired=False`` allows configs whose data settings differ (then only unpaired summaries make
  sense; ``comparisons`` refuses).
  """

  def __init__(self, configs: Mapping[str, ml_collections.ConfigDict], seeds: Sequence[int],
               work_root: str, *, collect: Callable[[Trainer], dict] | None = None,
               paired: bool = True, progress: str | None = "log"):
    if not configs:
      raise ConfigError("Study: no configs")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
      raise ConfigError(f"Study seeds: need distinct non-negative integers, got {seeds}")
    for name, c in configs.items():
      if not _NAME.match(name):
        raise ConfigError(f"Study config name {name!r}: use letters, digits and _ . + - "
                          f"(it names a directory)")
      config_lib.validate(c)
    self.configs, self.seeds, self.work_root = dict(configs), seeds, work_root
    self.collect, self.paired, self.progress = collect, paired, progress
    if paired:
      self._check_same_data()

  def _check_same_data(self) -> None:
    names = list(self.configs)
    ref = config_lib.flatten(self.configs[names[0]].data)
    for name in names[1:]:
      other = config_lib.flatten(self.configs[name].data)
      diff = sorted(k for k in ref if ref[k] != other.get(k))
      if diff:
        raise ConfigError(
            f"Study: configs {names[0]!r} and {name!r} read different data "
            f"({', '.join(f'data.{k}: {ref[k]!r} vs {other[k]!r}' for k in diff)}), so their "
            f"runs of one seed would not see the same batches; make the data settings equal or "
            f"pass paired=False")

  # ------------------------------------------------------------------ runs
  def config_for(self, name: str, seed: int) -> ml_collections.ConfigDict:
    """The config of run (name, seed): only ``seed`` differs from the given config."""
    return config_lib.apply_overrides(self.configs[name], {"seed": seed})

  def workdir(self, name: str, seed: int) -> str:
    return os.path.join(self.work_root, name, f"seed_{seed}")

  def runs(self) -> list[tuple[str, int]]:
    return [(name, seed) for seed in self.seeds for name in self.configs]

  def load(self, name: str, seed: int) -> RunResult | None:
    """The finished run's result, or None; a result from other settings is an error."""
    path = os.path.join(self.workdir(name, seed), RESULT_FILE)
    if not os.path.exists(path):
      return None
    with open(path) as f:
      r = json.load(f)
    want = json.loads(json.dumps(config_lib.flatten(self.config_for(name, seed))))
    # settings added to moejax after the run was made count at their defaults
    have = {**json.loads(json.dumps(config_lib.flatten(config_lib.base_config()))),
            **r["flat_config"]}
    diff = sorted(k for k in want if want[k] != have.get(k))
    if diff:
      raise ConfigError(
          f"{path}: a finished run with other settings ({', '.join(diff[:5])}"
          f"{', ...' if len(diff) > 5 else ''}); use another work_root or delete that directory")
    r["curves"] = {k: [tuple(p) for p in v] for k, v in r["curves"].items()}
    return RunResult(**r)

  def pending(self) -> list[tuple[str, int]]:
    return [(n, s) for n, s in self.runs() if self.load(n, s) is None]

  def estimate(self, probe_steps: int = 3) -> Estimate:
    """Times setup + compilation, ``probe_steps`` steps and one evaluation per config (in
    memory, nothing written) and extrapolates to every run still to do."""
    pending: dict[str, int] = {}
    for name, _ in self.pending():
      pending[name] = pending.get(name, 0) + 1
    per_run, details = {}, {}
    for name in pending:
      config = self.config_for(name, self.seeds[0])
      t0 = time.perf_counter()
      trainer = Trainer(config)
      trainer.train(steps=1, progress=None)
      jax.block_until_ready(trainer.state)
      t1 = time.perf_counter()
      trainer.train(steps=probe_steps, progress=None)
      jax.block_until_ready(trainer.state)
      t2 = time.perf_counter()
      trainer.evaluate()
      t3 = time.perf_counter()
      trainer.evaluate()
      t4 = time.perf_counter()
      step_s, eval_s = (t2 - t1) / probe_steps, t4 - t3
      t = config.train
      n_evals = (t.steps - 1) // t.eval_every + 1
      per_run[name] = (t1 - t0) + (t3 - t2 - eval_s) + t.steps * step_s + n_evals * eval_s
      details[name] = (t1 - t0 + t3 - t2 - eval_s, step_s, eval_s)
    return Estimate(per_run, pending, details)

  def step_times(self, steps: int = 10, rounds: int = 3) -> dict[str, float]:
    """Seconds per training step of each config (seed 0, in memory), from ``rounds`` rounds
    that run ``steps`` steps of every config in turn (median): a paired timing in one
    process, robust to load that the runs' own tokens/s (measured hours apart) are not."""
    from moejax.experiment.timing import interleaved_medians
    total = (rounds + 1) * steps                          # + the warm-up (compiling) round

    def config(name):
      c = self.config_for(name, self.seeds[0])
      return config_lib.apply_overrides(c, {
          "train.steps": total, "train.eval_every": total + 1,
          "train.warmup_steps": min(c.train.warmup_steps, total - 1)})
    trainers = {name: Trainer(config(name)) for name in self.configs}

    def run(trainer):
      def go():
        trainer.train(steps=steps, progress=None)
        jax.block_until_ready(trainer.state)
      return go
    times = interleaved_medians({n: run(t) for n, t in trainers.items()}, rounds)
    for t in trainers.values():
      t.close()
    return {n: v / steps for n, v in times.items()}

  def run(self, *, estimate: bool = True, probe_steps: int = 3) -> "StudyResult":
    """Runs what is not finished yet, prints progress, returns every finished run."""
    runs, todo = self.runs(), self.pending()
    say(f"study: {len(self.configs)} configs x {len(self.seeds)} seeds = {len(runs)} runs "
        f"({len(runs) - len(todo)} finished, {len(todo)} to run) in {self.work_root}")
    est = None
    if estimate and todo:
      est = self.estimate(probe_steps)
      for name, n in est.pending.items():
        setup, step_s, eval_s = est.details[name]
        say(f"  {name:<16} setup+compile {setup:5.1f}s, {step_s:.3f}s/step, {eval_s:.2f}s/eval"
            f" -> {_fmt_time(est.per_run[name])} per run x {n}")
      say(f"  estimated total {_fmt_time(est.total)} (probe of {probe_steps} steps per config;"
          f" finishes around {time.strftime('%H:%M', time.localtime(time.time() + est.total))})")
    taken: dict[str, list[float]] = {}
    start = time.perf_counter()
    unfinished = []
    for i, (name, seed) in enumerate(todo):
      say(f"[{i + 1}/{len(todo)}] {name} seed {seed}: {self.workdir(name, seed)}")
      t0 = time.perf_counter()
      res = self._run_one(name, seed)
      taken.setdefault(name, []).append(time.perf_counter() - t0)
      if res is None:
        unfinished.append((name, seed))
        continue
      left = todo[i + 1:]
      remaining = sum(np.mean(taken[n]) if n in taken else (est.per_run[n] if est else 0.0)
                      for n, _ in left)
      say(f"[{i + 1}/{len(todo)}] {name} seed {seed} done in {_fmt_time(taken[name][-1])} | "
          f"val loss {res.metrics['val_loss']:.4f} | elapsed "
          f"{_fmt_time(time.perf_counter() - start)}, remaining ~{_fmt_time(remaining)}")
    if unfinished:
      say(f"{len(unfinished)} run(s) stopped before train.steps (train.max_steps_per_run); run "
          f"the same command again to continue them")
    return self.result()

  def _run_one(self, name: str, seed: int) -> RunResult | None:
    config, workdir = self.config_for(name, seed), self.workdir(name, seed)
    trainer = Trainer(config, workdir)
    try:
      if trainer.step:
        say(f"  resuming at step {trainer.step}")
      out = trainer.train(progress=self.progress)
      if out.interrupted:
        raise KeyboardInterrupt(f"study interrupted during {name} seed {seed}; a checkpoint was "
                                f"saved: run again to resume")
      if not out.finished:
        return None
      ev = trainer.evaluate_and_record()
      history = metrics_lib.read_metrics(workdir)
      train_rows = [r for r in history if r.get("split") == "train"]
      total, active = param_counts(trainer.model, trainer.params)
      metrics = {"val_loss": ev["val_loss"], "val_ppl": ev["val_ppl"], "val_bpb": ev["val_bpb"],
                 "train_ce": train_rows[-1]["ce"],
                 "tokens_per_sec": float(np.nanmedian([r["tokens_per_sec"] for r in train_rows])),
                 "total_params": total, "active_params": active,
                 "tokens": config.train.steps * config.data.batch_size * config.data.seq_len}
      for key in ("drop_fraction", "router_entropy", "experts_per_token", "active_heads"):
        if key in train_rows[-1]:
          metrics[key] = float(np.mean([r[key] for r in train_rows]))
      curves = curves_from_history(history)
      if "load_max_over_mean" in curves:
        metrics["load_max_over_mean"] = float(np.mean([v for _, v in curves["load_max_over_mean"]]))
      if self.collect is not None:
        metrics.update(self.collect(trainer))
      res = RunResult(name, seed, metrics, curves, data_fingerprint(trainer),
                      json.loads(json.dumps(config_lib.flatten(config))))
    finally:
      trainer.close()
    self._check_pairing(res)
    _write_json(os.path.join(workdir, RESULT_FILE), dataclasses.asdict(res))
    return res

  def _check_pairing(self, res: RunResult) -> None:
    if not self.paired:
      return
    for name in self.configs:
      other = self.load(name, res.seed) if name != res.config else None
      if other is not None and other.data_fingerprint != res.data_fingerprint:
        raise RuntimeError(f"{res.config} and {name} saw different batches at seed {res.seed}: "
                           f"the paired comparison would be invalid")

  def add_metrics(self, name: str, seed: int, metrics: dict) -> RunResult:
    """Adds ``metrics`` to a finished run's saved result (measurements added to a study after
    its models were trained, e.g. a new method applied to them); returns the updated run."""
    res = self.load(name, seed)
    if res is None:
      raise ValueError(f"{name} seed {seed} has no finished result to add metrics to")
    res.metrics.update(metrics)
    _write_json(os.path.join(self.workdir(name, seed), RESULT_FILE), dataclasses.asdict(res))
    return res

  def result(self) -> "StudyResult":
    done = [r for n, s in self.runs() if (r := self.load(n, s)) is not None]
    return StudyResult(list(self.configs), list(self.seeds), done, self.paired)


@dataclasses.dataclass
class StudyResult:
  configs: list[str]
  seeds: list[int]
  runs: list[RunResult]
  paired: bool = True

  @property
  def complete(self) -> bool:
    return len(self.runs) == len(self.configs) * len(self.seeds)

  def get(self, config: str, seed: int) -> RunResult | None:
    return next((r for r in self.runs if r.config == config and r.seed == seed), None)

  def _seeds_with_all(self, names) -> list[int]:
    return [s for s in self.seeds if all(self.get(n, s) is not None for n in names)]

  def values(self, metric: str, config: str, seeds=None) -> list[float]:
    seeds = [s for s in self.seeds if self.get(config, s)] if seeds is None else seeds
    return [self.get(config, s).metrics[metric] for s in seeds]

  def summary(self, metric: str) -> dict[str, stats.Summary]:
    out = {}
    for c in self.configs:
      seeds = [s for s in self.seeds if self.get(c, s)]
      if seeds:
        out[c] = stats.summarize(self.values(metric, c, seeds), seeds)
    return out

  def comparisons(self, metric: str, pairs=None, *, higher_is_better: bool = False,
                  confidence: float = 0.95) -> list[stats.Comparison]:
    """Paired comparisons on the seeds both configs finished; all pairs by default."""
    if not self.paired:
      raise ValueError("comparisons need a paired study (same data for every config)")
    if pairs is None:
      pairs = [(a, b) for i, a in enumerate(self.configs) for b in self.configs[i + 1:]]
    out = []
    for a, b in pairs:
      seeds = self._seeds_with_all([a, b])
      if seeds:
        out.append(stats.compare(a, b, self.values(metric, a, seeds),
                                 self.values(metric, b, seeds), metric=metric,
                                 confidence=confidence, higher_is_better=higher_is_better))
    return out

  def curve(self, config: str, name: str):
    """(steps, mean, std) across seeds of one curve."""
    return stats.band([r.curves[name] for r in self.runs if r.config == config])

  # ------------------------------------------------------------------ reports
  def table(self, metrics: Sequence[str] = ("val_loss", "tokens_per_sec")) -> str:
    """Markdown: mean ± std across seeds, per-seed values in brackets."""
    head = "| config | seeds | " + " | ".join(metrics) + " |"
    lines = [head, "|" + "---|" * (len(metrics) + 2)]
    for c in self.configs:
      seeds = [s for s in self.seeds if self.get(c, s)]
      if not seeds:
        continue
      cells = []
      for m in metrics:
        if any(m not in self.get(c, s).metrics for s in seeds):
          cells.append("-")      # e.g. drop_fraction of a dense model
          continue
        s = stats.summarize(self.values(m, c, seeds), seeds)
        fmt = _fmt_value(m)
        if s.n == 1 or len(set(s.values)) == 1:   # e.g. parameter counts
          cells.append(fmt(s.mean))
          continue
        per = ", ".join(fmt(v) for v in s.values)
        cells.append(f"{fmt(s.mean)} ± {fmt(s.std)} ({per})")
      lines.append(f"| {c} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

  def comparison_table(self, metric: str = "val_loss", pairs=None, *,
                       higher_is_better: bool = False, confidence: float = 0.95) -> str:
    comps = self.comparisons(metric, pairs, higher_is_better=higher_is_better,
                             confidence=confidence)
    lines = [f"| a vs b | mean(a - b) {metric} | per-seed a - b | {confidence:.0%} CI | "
             f"seeds a {'higher' if higher_is_better else 'lower'} | verdict |",
             "|---|---|---|---|---|---|"]
    for c in comps:
      lines.append(
          f"| {c.a} vs {c.b} | {c.mean_diff:+.4f} | {', '.join(f'{d:+.4f}' for d in c.diffs)} | "
          f"[{c.ci[0]:+.4f}, {c.ci[1]:+.4f}] | {c.a_wins}/{c.n} | "
          f"{'**' + c.verdict + '**' if c.resolved else c.verdict} |")
    return "\n".join(lines)

  def to_json(self) -> dict:
    return {"configs": self.configs, "seeds": self.seeds,
            "runs": [dataclasses.asdict(r) for r in self.runs]}


def _fmt_value(metric: str):
  if metric in ("tokens_per_sec", "total_params", "active_params", "tokens", "routed_params",
                "attention_flops"):
    return lambda v: f"{v:,.0f}"
  if metric in ("drop_fraction",):
    return lambda v: f"{v:.2%}"
  return lambda v: f"{v:.4f}"
