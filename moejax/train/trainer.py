"""Training, evaluation and sampling: the ``Trainer`` (one run) and the three ``run.py`` modes.

``Trainer`` is the Python API (notebooks, scripts) and what ``run.py`` drives:

    trainer = Trainer(config, workdir)     # validates, reads data, builds, restores if it can
    trainer.train()                        # to config.train.steps, or .train(steps=100) more
    trainer.evaluate(); trainer.sample("The "); trainer.save()
    trainer = Trainer.from_workdir(workdir)   # the model as trained: config.json + checkpoint

A resumed run is bit-identical to an uninterrupted one: the data stream is random-access by
step and every random number is a function of (seed, step). The loop never saves a non-finite
state, and Ctrl-C saves a checkpoint at the current step before stopping.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from moejax import config as config_lib
from moejax import logs
from moejax.errors import ConfigError
from moejax.inference import steer as steer_lib
from moejax.inference.generate import generate
from moejax.logs import progress as say
from moejax.parallel.mesh import batch_axes_size, make_mesh
from moejax.train import data as data_lib
from moejax.train import metrics as metrics_lib
from moejax.train import upcycle as upcycle_lib
from moejax.train import workdir as workdir_lib
from moejax.train.checkpoint import Checkpointer
from moejax.train.optimizer import frozen_mask, make_optimizer
# The functional core, re-exported: tests, benchmarks and users build steps from these.
from moejax.train.steps import (build_model, evaluate, init_params, init_state,  # noqa: F401
                                loss_fn, make_eval_step, make_train_step, train_batch, val_batch)


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/inf loss or gradient; nothing was saved for that step."""


@dataclasses.dataclass
class TrainResult:
  """What ``Trainer.train`` did: the last logged metrics, where it stopped and why."""
  step: int
  metrics: dict
  finished: bool            # reached config.train.steps
  interrupted: bool = False  # stopped by Ctrl-C (a checkpoint was saved if there is a workdir)


@jax.jit
def _first_non_finite(bad, finite, loss, step):
  """Keeps the first step whose loss or gradients were not finite (and whether the loss was)."""
  new = jnp.stack([jnp.asarray(step, jnp.int32), jnp.isfinite(loss).astype(jnp.int32)])
  return jnp.where((bad[0] < 0) & ~finite, new, bad)


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def describe_model(model, params) -> str:
  c = model.cfg
  n_params = sum(x.size for x in jax.tree.leaves(params))
  s = c.moe
  kind = "dense" if s is None else (
      f"MoE: {s.num_routed} routed experts of hidden "
      f"{list(s.routed_sizes) if s.heterogeneous else s.fine_hidden}, top-{s.routed_k}"
      f"{f', {s.num_shared_experts} shared' if s.num_shared_experts else ''}, router={s.router}, "
      f"dispatch={s.dispatch}")
  return f"{kind}, {c.num_layers} layers, d_model={c.d_model}, {n_params / 1e6:.2f}M params"


class _Sigint:
  """Turns the first Ctrl-C into a request to stop after the current step (main thread only);
  a second Ctrl-C interrupts at once."""

  def __enter__(self):
    self.requested, self._old = False, None
    if threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGINT, self._handle)
    return self

  def _handle(self, signum, frame):
    # No I/O here: the handler can run in the middle of a write to the same stream or log file.
    if self.requested:
      raise KeyboardInterrupt
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGINT, self._old)


class Trainer:
  """One run: validated config, mesh, data, model, optimizer, sharded state, checkpoints.

  Everything that can be wrong with the settings (config values, data, workdir, a model that
  differs from the one saved in ``workdir``) raises ``ConfigError`` before a model is built.
  ``workdir=None`` trains in memory (no checkpoints or metrics files; ``history`` still fills).
  """

  def __init__(self, config, workdir: str | None = None, *, restore: bool = True):
    config_lib.validate(config)
    self.config, self.workdir = config, workdir
    self.mesh = make_mesh(config.mesh)
    ways = batch_axes_size(self.mesh)
    if config.data.batch_size % ways:
      raise ConfigError(
          f"config.data.batch_size: must be divisible by the batch-splitting mesh axes "
          f"(data*fsdp*expert = {ways}), got {config.data.batch_size}")
    self.data = data_lib.make_data(config.data, config.seed)
    saved_step = None
    if workdir is not None:
      workdir_lib.prepare(workdir)
      saved_step = workdir_lib.latest_checkpoint(workdir) if restore else None
      saved = workdir_lib.load_config(workdir)
      if saved_step is not None and saved is not None:
        diffs = workdir_lib.check_compatible(saved, config, workdir, "resume")
        if diffs:
          say(workdir_lib.describe_changes(diffs, workdir))
    self.model = build_model(config)
    dense = None
    if saved_step is None and config.upcycle.source:   # checked before any state is built
      dense = self._upcycle_source(config)
    self.tx = make_optimizer(config.train, frozen_mask(self.model.cfg))
    self.state, self.shardings, self.specs = init_state(self.model, config, self.tx, self.mesh)
    if dense is not None:
      self.state = self._upcycled(dense)
    self.ckpt = Checkpointer(workdir, config.train.keep_checkpoints) if workdir else None
    self.eval_step = make_eval_step(self.model, self.shardings, self.mesh)
    self._train_step = None
    self.history: list[dict] = []       # every record logged by this object
    if saved_step is not None:
      self.restore(saved_step)
    self.weak_model = None        # self-contrast decoding's weak model (steer.contrast_weight)
    self._steer()

  def _steer(self) -> None:
    """Applies ``config.steer`` (inference only): skip thresholds calibrated on the first
    ``steer.calibration_batches`` training batches, the contrast model for eval and sampling."""
    st = self.config.steer
    if not steer_lib.is_active(st):
      return
    if st.skip_rate > 0:
      batches = [self.data.batch(i)[:, :-1] for i in range(st.calibration_batches)]
      self.model = steer_lib.steered(self.model, st, self.params, batches)
    if st.contrast_weight > 0:
      self.weak_model = steer_lib.weak_model(self.model, st)
    self.eval_step = make_eval_step(self.model, self.shardings, self.mesh, self.weak_model,
                                    st.contrast_weight)
    lines = steer_lib.describe(self.model.cfg.steer)
    if self.weak_model is not None:
      lines += (f"\nself-contrast: (1 + {st.contrast_weight:g}) x logits - "
                f"{st.contrast_weight:g} x logits routed {st.contrast_routing}")
    say("steering:\n  " + lines.replace("\n", "\n  ").strip())

  def _upcycle_source(self, config):
    """The dense run named by ``upcycle.source``, checked against this model (no compute)."""
    src = config.upcycle.source
    dense_config = workdir_lib.load_config(src)
    if workdir_lib.latest_checkpoint(src) is None or dense_config is None:
      raise ConfigError(f"config.upcycle.source={src}: not the workdir of a trained run "
                        "(no checkpoint or no config.json)")
    upcycle_lib.check_source(dense_config, config)
    upcycle_lib.check_fit(build_model(dense_config).cfg, self.model.cfg, config.upcycle.method)
    return src

  def _upcycled(self, src: str) -> dict:
    dense = Trainer.from_workdir(src, mode="upcycle")
    dense.close()
    u = self.config.upcycle
    params = upcycle_lib.upcycle_params(
        dense.params, self.state["params"], self.model.cfg, u.method,
        jax.random.fold_in(jax.random.key(self.config.seed), 2), u.drop_fraction)
    params = jax.device_put(params, self.shardings["params"])
    opt_state = jax.jit(self.tx.init, out_shardings=self.shardings["opt_state"])(params)
    say(f"up-cycled from {src} (step {dense.step}, method {u.method})")
    return {"step": self.state["step"], "params": params, "opt_state": opt_state}

  @classmethod
  def from_workdir(cls, workdir: str, overrides: dict | None = None, *,
                   mode: str = "eval") -> "Trainer":
    """The model as trained in ``workdir`` (its config.json + latest checkpoint).

    ``overrides`` ({'data.path': ..., 'sample.temperature': 0}) may change anything that does
    not define the trained model; a model setting raises ``ConfigError`` naming it.
    """
    workdir_lib.require_trained(workdir, mode)
    saved = workdir_lib.load_config(workdir)
    config = config_lib.apply_overrides(saved, overrides or {})
    action = {"eval": "evaluate", "sample": "sample from", "analyze": "analyze"}.get(mode, mode)
    workdir_lib.check_compatible(saved, config, workdir, action)
    return cls(config, workdir)

  # ------------------------------------------------------------------ state
  @property
  def step(self) -> int:
    return int(self.state["step"])

  @property
  def params(self):
    return self.state["params"]

  def save(self) -> str:
    """Checkpoints the current state (atomically) with the workdir's config.json, so the
    workdir is complete for eval, sample, resume and conversion; returns the step's directory."""
    if self.ckpt is None:
      raise ValueError("Trainer(workdir=None) has nowhere to save; pass a workdir")
    if jax.process_index() == 0:
      workdir_lib.save_config(self.workdir, self.config)
    self.ckpt.save(self.step, self.state)
    self.ckpt.wait()
    return f"{self.ckpt.directory}/{self.step}"

  def restore(self, step: int | None = None) -> int:
    """Loads a checkpoint (the latest by default) into the state's shardings."""
    if self.ckpt is None:
      raise ValueError("Trainer(workdir=None) has no checkpoints to restore")
    try:
      state = self.ckpt.restore(self.state, step)
    except Exception as e:   # orbax: structure, shape or dtype mismatch, a damaged checkpoint
      first = str(e).strip().splitlines()[0]
      raise ConfigError(f"--workdir={self.workdir}: checkpoint does not fit this model "
                        f"({first[:300]})") from None
    if state["opt_state"] is None:     # parameters only (an imported model): fresh moments
      say(f"{self.workdir}: the checkpoint holds parameters only (imported); starting a fresh "
          "optimizer state")
      state["opt_state"] = jax.jit(self.tx.init, out_shardings=self.shardings["opt_state"])(
          state["params"])
    self.state = state
    return self.step

  # ------------------------------------------------------------------ training
  def train(self, steps: int | None = None, *, progress: str | None = "log") -> TrainResult:
    """Trains to ``config.train.steps`` (or ``steps`` more, at most to it).

    progress: "log" prints a line every ``train.log_every`` steps, "bar" shows a progress bar
    (tqdm; notebooks), None is silent. Logs to ``history`` (and the workdir's metrics.jsonl and
    TensorBoard). Raises ``NonFiniteLossError`` at the first step with a NaN/inf loss or
    gradient, having saved nothing for it.
    """
    if progress not in ("log", "bar", None):
      raise ValueError(f"progress must be 'log', 'bar' or None, got {progress!r}")
    refuse_steer(self.config)
    if self.model.cfg.moe is not None and self.model.cfg.moe.expert_bank == "ternary_packed":
      raise ConfigError("model.moe.expert_bank='ternary_packed' is the inference form of ternary "
                        "experts (2-bit codes have no gradient): train with 'ternary_swiglu' "
                        "and pack with python -m moejax.convert --from=moejax --to=packed")
    t, start = self.config.train, self.step
    stop = t.steps if not t.max_steps_per_run else min(t.steps, start + t.max_steps_per_run)
    if steps is not None:
      stop = min(stop, start + steps)
    if self._train_step is None:
      self._train_step = make_train_step(self.model, self.tx, self.config, self.shardings,
                                         self.mesh)
    main = jax.process_index() == 0
    writer = metrics_lib.MetricsWriter(self.workdir, start, enabled=main) if self.workdir else None
    if self.workdir and main and start < stop:
      workdir_lib.save_config(self.workdir, self.config)   # the run really starts here
    bar = _bar(start, stop, t.steps) if progress == "bar" else None
    log = lambda msg: say(msg) if progress == "log" else None
    try:
      result = self._loop(start, stop, writer, bar, log)
    finally:
      if bar is not None:
        bar.close()
      if writer is not None:
        writer.close()
      if self.ckpt is not None:
        self.ckpt.wait()
    return result

  def _loop(self, start, stop, writer, bar, log) -> TrainResult:
    t = self.config.train
    tokens_per_step = self.config.data.batch_size * self.config.data.seq_len
    timer_start, timer_step, last = None, start, {}
    paused = 0.0       # seconds spent in evaluations: not training throughput
    # [first non-finite step or -1, was its loss finite]: updated on the device every step,
    # read by the host only where it syncs anyway (log lines, evals, saves), so no extra sync.
    bad = jnp.array([-1, 1], jnp.int32)
    with _Sigint() as sigint:
      for step in range(start, stop):
        self.state, metrics = self._train_step(self.state, train_batch(self.data, step, self.mesh))
        done = step + 1
        bad = _first_non_finite(bad, metrics["finite"], metrics["loss"], done)
        if timer_start is None:        # exclude compilation from throughput and ETA
          jax.block_until_ready(self.state["step"])
          timer_start, timer_step = time.perf_counter(), done
        if bar is not None:
          bar.update(1)
        stopping = sigint.requested      # read once: a Ctrl-C during this step acts on the next
        if stopping:
          say("interrupt: saving a checkpoint at this step (Ctrl-C again to abort)")
        log_now = done % t.log_every == 0 or done == stop or done == start + 1 or stopping
        eval_now = done % t.eval_every == 0 and done != t.steps
        save_now = stopping or done % t.checkpoint_every == 0 or done == stop
        if log_now or eval_now or save_now:     # the host syncs here anyway
          self._check_finite(bad, metrics)
        if log_now:
          elapsed = time.perf_counter() - timer_start - paused
          rate = (done - timer_step) / elapsed if done > timer_step and elapsed > 0 else None
          last = self._log_train(done, metrics, rate, tokens_per_step, writer, bar, log)
        if eval_now:
          t_eval = time.perf_counter()
          ev = self.evaluate()
          paused += time.perf_counter() - t_eval
          self._record(writer, done, {"split": "val", **ev})
          log(f"eval  {done:>5} | val loss {ev['val_loss']:.4f} | ppl {ev['val_ppl']:.3f}")
        if save_now and self.ckpt is not None:
          self.ckpt.save(done, self.state)
        if stopping:
          where = f"checkpoint saved in {self.workdir}" if self.ckpt else "no workdir: not saved"
          say(f"interrupted at step {done}/{t.steps}: {where}; train again to resume")
          return TrainResult(done, last, finished=False, interrupted=True)
    return TrainResult(self.step, last, finished=self.step >= t.steps)

  def _check_finite(self, bad, metrics) -> None:
    first, loss_ok = (int(x) for x in jax.device_get(bad))
    if first < 0:
      return
    kept = None
    if self.ckpt is not None:
      self.ckpt.wait()
      kept = workdir_lib.latest_checkpoint(self.workdir)
    saved = (f"the last checkpoint (step {kept}) is kept" if kept is not None
             else "there is no earlier checkpoint")
    raise NonFiniteLossError(
        f"training stopped: non-finite {'gradient' if loss_ok else 'loss'} at step {first} "
        f"(now at step {self.step}: loss {float(metrics['loss'])}, grad norm "
        f"{float(metrics['grad_norm'])}); nothing was saved since, {saved}. Lower "
        f"train.learning_rate (now {self.config.train.learning_rate}) or set train.grad_clip.")

  def _log_train(self, done, metrics, rate, tokens_per_step, writer, bar, log) -> dict:
    metrics = jax.device_get(metrics)
    moe = metrics_lib.flatten_intermediates(metrics.pop("moe"))
    metrics.pop("finite")
    last = {k: float(v) for k, v in metrics.items()}
    last.update(metrics_lib.summarize_moe(moe))
    last["tokens_per_sec"] = rate * tokens_per_step if rate else float("nan")
    self._record(writer, done, {"split": "train", **last, **moe})
    t = self.config.train
    moe_txt = (f" | drop {last['drop_fraction']:.2%} | H(router) {last['router_entropy']:.2f}"
               if "drop_fraction" in last else "")
    speed = f"{last['tokens_per_sec']:,.0f} tok/s" if rate else "compiled"
    eta = _fmt_time((t.steps - done) / rate) if rate else "?"
    log(f"step {done:>5}/{t.steps} | loss {last['loss']:.4f} (ce {last['ce']:.4f}, aux "
        f"{last['aux']:.4f}) | lr {last['lr']:.2e} | {speed}{moe_txt} | ETA {eta}")
    if bar is not None:
      bar.set_postfix(loss=f"{last['loss']:.3f}", refresh=False)
    return last

  def _record(self, writer, step: int, record: dict) -> None:
    self.history.append({"step": step, **{k: np.asarray(v).tolist() if not isinstance(v, str)
                                          else v for k, v in record.items()}})
    if writer is not None:
      writer.write(step, record)

  # ------------------------------------------------------------------ eval, sampling
  def evaluate(self, max_batches: int | None = None) -> dict:
    """Validation loss/perplexity/bits-per-byte, and ``val_data``: which data they come from."""
    n = self.config.data.eval_batches if max_batches is None else max_batches
    return evaluate(self.eval_step, self.params, self.data, n, self.mesh)

  def evaluate_and_record(self) -> dict:
    """``evaluate`` at the current step, also logged to ``history`` and the workdir's metrics
    (a re-evaluated step replaces its row)."""
    ev = self.evaluate()
    writer = None
    if self.workdir:
      writer = metrics_lib.MetricsWriter(self.workdir, self.step,
                                         enabled=jax.process_index() == 0)
    self._record(writer, self.step, {"split": "val", **ev})
    if writer is not None:
      writer.close()
    return ev

  def sample(self, prompt: str | list[str] | None = None, num_tokens: int | None = None,
             temperature: float | None = None, seed: int | None = None, *,
             top_k: int | None = None, top_p: float | None = None,
             stop: str | None = None) -> str | list[str]:
    """Continues ``prompt`` (a string, or a list of strings generated as one batch) and returns
    prompt + continuation; every argument defaults to ``config.sample``; temperature 0 is
    greedy. ``generate`` gives the tokens, timings and cache size instead."""
    single = isinstance(prompt, str) or prompt is None
    texts, _ = self.sample_with_result([prompt] if single else list(prompt), num_tokens,
                                       temperature, seed, top_k=top_k, top_p=top_p, stop=stop)
    return texts[0] if single else texts

  def sample_with_result(self, prompts: list[str | None], *args, **kwargs):
    """-> (prompt + continuation texts, the ``GenerateResult``); arguments as ``generate``."""
    prompts = [self.config.sample.prompt if p is None else p for p in prompts]
    result = self.generate(prompts, *args, **kwargs)
    return [data_lib.decode(np.concatenate([data_lib.encode(p), t]))
            for p, t in zip(prompts, result.tokens)], result

  def generate(self, prompts: list[str] | None = None, num_tokens: int | None = None,
               temperature: float | None = None, seed: int | None = None, *,
               top_k: int | None = None, top_p: float | None = None, stop: str | None = None):
    """``moejax.generate`` on this run's model and parameters with ``config.sample``'s
    defaults (``prompts``: strings, byte-level; ``num_tokens`` 0: up to the model's
    max_length) -> ``GenerateResult``."""
    s = self.config.sample
    pick = lambda value, default: default if value is None else value
    stop, ids = pick(stop, s.stop), [data_lib.encode(pick(p, s.prompt)) for p in prompts or [None]]
    num_tokens = pick(num_tokens, s.num_tokens) or max(                 # 0: fill max_length
        self.model.cfg.max_length - max(len(i) for i in ids), 1)
    return generate(self.model, self.params, ids, num_tokens,
                    temperature=pick(temperature, s.temperature),
                    top_k=pick(top_k, s.top_k), top_p=pick(top_p, s.top_p),
                    seed=pick(seed, s.seed), stop=stop or None, weak_model=self.weak_model,
                    contrast_weight=self.config.steer.contrast_weight)

  def close(self) -> None:
    if self.ckpt is not None:
      self.ckpt.close()


def _bar(start: int, stop: int, total: int):
  from tqdm.auto import tqdm
  return tqdm(total=stop - start, initial=0, desc=f"steps {start}->{stop} of {total}", unit="step")


# ---------------------------------------------------------------------- run.py modes
def _plot(workdir: str) -> str:
  try:
    from moejax.analysis.plots import plot_run
    return plot_run(workdir)
  except ImportError as e:  # matplotlib is optional for library users
    return f"skipped ({e})"


def _eval_line(prefix: str, step: int, ev: dict) -> str:
  return (f"{prefix} | step {step} | val loss {ev['val_loss']:.4f} | val ppl {ev['val_ppl']:.3f} | "
          f"{ev['val_bpb']:.3f} bits/byte\n  data: {ev['val_data']}")


def refuse_steer(config) -> None:
  if steer_lib.is_active(config.steer):
    raise ConfigError("config.steer: steering edits a trained model's routing at inference "
                      "(--mode=eval|sample|analyze); leave steer.* at their defaults to train")


def train(config, workdir: str) -> dict:
  """``--mode=train``: trains (resuming from the latest checkpoint), evaluates, plots, samples."""
  refuse_steer(config)
  trainer = Trainer(config, workdir)
  logs.log_to_file(workdir, jax.process_index())
  start = trainer.step
  if start:
    say(f"resumed from {workdir} at step {start}")
  say(f"model: {describe_model(trainer.model, trainer.params)}")
  say(f"data: {trainer.data.source}: {trainer.data.num_train_tokens} train / "
      f"{trainer.data.num_val_tokens} val tokens")
  say(f"mesh: {dict(trainer.mesh.shape)} over {jax.device_count()} {jax.default_backend()} "
      f"devices, {jax.process_count()} process(es)")
  try:
    result = trainer.train()
  finally:
    trainer.close()
  out = {"state": trainer.state, "train": result.metrics, "eval": None, "sample": None,
         "interrupted": result.interrupted}
  if result.interrupted:
    return out
  if not result.finished:
    say(f"stopped at step {result.step}/{config.train.steps} (train.max_steps_per_run="
        f"{config.train.max_steps_per_run}); run train again with --workdir={workdir} to resume")
    return out
  ev = trainer.evaluate_and_record()
  say(_eval_line("final", result.step, ev))
  if jax.process_index() == 0:
    say(f"plots: {_plot(workdir)}")
  out["eval"], out["sample"] = ev, trainer.sample()
  say(f"sample (temperature {config.sample.temperature}):\n{out['sample']}")
  return out


def upcycle_only(config, workdir: str) -> dict:
  """``--mode=upcycle``: writes step 0 of a new MoE run up-cycled from ``upcycle.source`` and
  evaluates it beside the dense model; ``--mode=train`` with the same workdir continues it."""
  if not config.upcycle.source:
    raise ConfigError("--mode=upcycle: set --config.upcycle.source=<dense run's workdir>")
  if workdir_lib.latest_checkpoint(workdir) is not None:
    raise ConfigError(f"--workdir={workdir}: already holds checkpoints; up-cycling writes step 0 "
                      "of a new run: use an empty workdir")
  trainer = Trainer(config, workdir)
  logs.log_to_file(workdir, jax.process_index())
  if jax.process_index() == 0:
    workdir_lib.save_config(workdir, config)
  path = trainer.save()
  trainer.close()
  ev = trainer.evaluate()
  dense = Trainer.from_workdir(config.upcycle.source, mode="upcycle")
  dense.close()
  dense_ev = dense.evaluate()
  say(f"saved {path}")
  say(_eval_line("dense source", dense.step, dense_ev))
  say(_eval_line(f"up-cycled ({config.upcycle.method})", trainer.step, ev))
  return {"eval": ev, "dense_eval": dense_ev}


def _restored(workdir: str, overrides: dict | None, mode: str) -> Trainer:
  trainer = Trainer.from_workdir(workdir, overrides, mode=mode)
  logs.log_to_file(workdir, jax.process_index())
  trainer.close()          # nothing more to save; the restored state stays in memory
  return trainer


def eval_only(workdir: str, overrides: dict | None = None) -> dict:
  """``--mode=eval``: the workdir's model on its (or an overridden) validation data."""
  trainer = _restored(workdir, overrides, "eval")
  ev = trainer.evaluate()
  say(_eval_line("eval", trainer.step, ev))
  if "steer" in ev:
    say(steer_line(ev["steer"]))
  say(json.dumps(ev))
  return ev


def sample_only(workdir: str, overrides: dict | None = None) -> str:
  """``--mode=sample``: continues ``sample.prompt`` with the workdir's model (KV-cache
  generation), then one line of timings and cache size."""
  (text,), result = _restored(workdir, overrides, "sample").sample_with_result([None])
  say(text)
  say(generation_line(result))
  return text


def analyze_only(workdir: str, overrides: dict | None = None):
  """``--mode=analyze``: routing traces of the workdir's model over ``analyze.sources``, with
  report.md, summary.json and plots in WORKDIR/analysis (moejax/analysis/analyze.py)."""
  from moejax.analysis.analyze import analyze
  trainer = _restored(workdir, overrides, "analyze")
  try:
    import matplotlib  # noqa: F401
    plots = jax.process_index() == 0
  except ImportError:
    say("plots: skipped (matplotlib is not installed)")
    plots = False
  result = analyze(trainer, plots=plots)
  say(result.report.strip())
  say(f"wrote {len(result.files)} files to {os.path.join(workdir, 'analysis')}")
  return result


def steer_line(summary: dict) -> str:
  """What steering changed over the evaluation, in one line."""
  return (f"steering changed the experts of {summary['changed_tokens']:.0f} token-layers; "
          f"dropped {summary['dropped_fraction']:.2%}, re-routed "
          f"{summary['rerouted_fraction']:.2%}, skipped {summary['skipped_fraction']:.2%} of "
          f"routed slots (routed-expert FLOPs saved {summary['expert_flops_saved']:.2%})")


def generation_line(result) -> str:
  """'24 new tokens: prefill 120 tokens/s, decode 310 tokens/s (batch 1, cache 4.0 KiB)'."""
  kib = sum(result.cache_bytes.values()) / 1024
  return (f"{sum(len(t) for t in result.tokens)} new tokens: prefill "
          f"{result.prefill_tokens_per_s:.0f} tokens/s, decode {result.decode_tokens_per_s:.0f} "
          f"tokens/s (batch {len(result.tokens)}, cache {kib:.1f} KiB"
          f"{', compilation included' if result.compiled else ''})")
