"""The training loop: one multi-task method on one benchmark, epoch by epoch.

    bench = ntkmtl_jax.benchmarks.get_benchmark("multidigits")
    result = fit(bench, bench.config.replace(method="ntkmtl", max_steps=300))
    result.metrics         # {"left acc": 0.93, ...}: the test metrics of the selected model
    result.history.losses  # (steps, k) task losses, one row per step

`fit` runs a `Config` (the method, its optimiser and the protocol) on a `Benchmark` (model
functions, train / validation / test `Split`s, metrics and `Benchmark.evaluate`). The loop
itself is a straight line over epochs and batches; what happens around the steps is a few
small hooks, each one concept:

- `EigenvalueProbe`: lambda_i = ||g_i||^2 every `probe_every` steps, for methods whose
  step does not produce the shared-parameter eigenvalues.
- `ProgressLog`: the tqdm bar and the step times; metrics move to the host every
  `log_every` steps (`Recorder`).
- `Selection`: after every epoch (and where `max_steps` stops the run) a benchmark with a
  validation split is scored on it (`Benchmark.selection_score`); the best model is scored on
  the test split, and that is the result (`Config.selection`: or no selection, the mean of
  the last epochs' test metrics); the plateau schedule reads the same score.
- `Checkpointing`: with a `workdir`, crash-safe checkpoints (`ntkmtl_jax.checkpoints`: state,
  history and the typed `RunState` in one orbax checkpoint) at epoch ends, where the run
  stops, every `checkpoint_every` steps and on Ctrl-C; a run started again with the same
  `workdir` resumes where it stopped, with the same batches and augmentation.

The learning rate follows a per-epoch schedule (`ntkmtl_jax.optimizer`). The `ntkmtl`
command runs this loop for every benchmark but MT10 (a reinforcement-learning loop of its
own, `ntkmtl_jax.benchmarks.mt10`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
import optax

from ntkmtl_jax import io, kernel
from ntkmtl_jax.interrupt import StopRequests
from ntkmtl_jax.locking import workdir_lock
from ntkmtl_jax.checkpoints import RunCheckpoints, RunMismatchError
from ntkmtl_jax.config import RESUMABLE, Config
from ntkmtl_jax.data.splits import epoch_batches, prefetch
from ntkmtl_jax.models.multitask import TaskFunctions
from ntkmtl_jax.optimizer import (
  build_optimizer,
  learning_rate_factor,
  set_learning_rate_factor,
  with_learning_rate_factor,
)
from ntkmtl_jax.results import History, RunResult
from ntkmtl_jax.step import TrainState, TrainStep, make_train_step
from ntkmtl_jax.strategy import Strategy

if TYPE_CHECKING:
  from ntkmtl_jax.benchmarks import Benchmark

PyTree = Any


@dataclasses.dataclass
class RunState:
  """Where a run stands between two steps; saved (as JSON) with every checkpoint.

  Attributes:
    epoch: the current epoch (0-based).
    batch: batches of `epoch` already taken.
    best_score, best_epoch, val_metrics, metrics: the selected model so far: its validation
      score, epoch, validation metrics and test metrics (None before the first selection).
    plateau_scale, plateau_best, plateau_wait: the plateau schedule's factor, best score and
      epochs without improvement.
    evaluations: one entry per evaluation (epoch, step; val and score with a validation
      split; test where that model became the best, or where it is reported).
    reported: with `selection="last_epochs"`, the test metrics of the last epochs so far.
    step_times: wall seconds of the steps that were timed (the first ones and every
      `log_every`-th).
    fingerprint: the run's config (`Config.fingerprint`), checked on resume.
    changes_on_resume: the settings of `config.RESUMABLE` a resume changed: one entry per
      resume that changed any, {"step": ..., "changes": {field: [old, new]}}.
    finished: whether the run took all its steps.
  """

  epoch: int = 0
  batch: int = 0
  best_score: float = -math.inf
  best_epoch: int | None = None
  val_metrics: dict | None = None
  metrics: dict | None = None
  plateau_scale: float = 1.0
  plateau_best: float = -math.inf
  plateau_wait: int = 0
  evaluations: list = dataclasses.field(default_factory=list)
  reported: list = dataclasses.field(default_factory=list)
  step_times: list = dataclasses.field(default_factory=list)
  fingerprint: dict = dataclasses.field(default_factory=dict)
  changes_on_resume: list = dataclasses.field(default_factory=list)
  finished: bool = False

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> RunState:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


class Recorder:
  """Per-step metrics, moved to the host every `log_every` steps, and eigenvalue probes."""

  KEYS = ("losses", "weights", "grad_norm", "eigenvalues", "skip_cause")

  def __init__(self, num_tasks: int):
    self.k = num_tasks
    self.host = {key: [] for key in self.KEYS}
    self.pending = []
    self.probe_steps, self.probe_values = [], []

  def add(self, metrics: dict):
    record = {key: metrics[key] for key in self.KEYS if key in metrics}
    if "nonfinite_losses" in metrics:  # the three causes exclude each other
      record["skip_cause"] = (
        1 * metrics["nonfinite_losses"]
        + 2 * metrics["nonfinite_update"]
        + 3 * metrics["nonfinite_state"]
      )
    self.pending.append(record)

  def flush(self):
    for record in jax.device_get(self.pending):
      for key, value in record.items():
        self.host[key].append(np.asarray(value, np.float64))
    self.pending = []

  def arrays(self) -> dict:
    self.flush()
    shapes = dict(
      losses=(0, self.k),
      weights=(0, self.k),
      grad_norm=(0,),
      eigenvalues=(0, self.k),
      skip_cause=(0,),
    )
    out = {key: np.stack(v) if v else np.zeros(shapes[key]) for key, v in self.host.items()}
    out["probe_steps"] = np.asarray(self.probe_steps, np.float64)
    out["probe_values"] = np.asarray(self.probe_values, np.float64).reshape(-1, self.k)
    return out

  def load(self, arrays: dict):
    """Continues from `arrays()` of an earlier run (empty arrays may be left out)."""
    self.host = {key: list(arrays.get(key, ())) for key in self.KEYS}
    self.probe_steps = list(arrays.get("probe_steps", ()))
    self.probe_values = list(arrays.get("probe_values", ()))

  def history(self, eigenvalues_in_step: bool) -> History:
    a = self.arrays()
    taken = len(a["losses"])
    if eigenvalues_in_step and len(a["eigenvalues"]):
      eigen_steps, eigenvalues, source = np.arange(1, taken + 1), a["eigenvalues"], "step"
    elif len(a["probe_steps"]):
      eigen_steps, eigenvalues, source = a["probe_steps"], a["probe_values"], "probe"
    else:
      eigen_steps, eigenvalues, source = np.zeros(0), np.zeros((0, self.k)), ""
    return History(
      steps=np.arange(1, taken + 1, dtype=np.float64),
      losses=a["losses"],
      weights=a["weights"],
      grad_norm=a["grad_norm"],
      eigen_steps=np.asarray(eigen_steps, np.float64),
      eigenvalues=eigenvalues,
      eigen_source=source,
      skip_cause=a["skip_cause"],
    )


# The jitted functions of a model and the train steps of (model, method, optimiser)
# combinations, built once so later runs (other seeds) reuse their compilations.
_JITTED: dict[tuple, Callable] = {}
_STEPS: dict[tuple, tuple[TrainStep, Any]] = {}


def _jitted_probe(functions: TaskFunctions) -> Callable:
  key = ("probe", functions)
  if key not in _JITTED:

    def probe(params, model_state, batch):
      losses = lambda p, b: functions.loss_fn(p, model_state, b)[0]
      return kernel.ntk_weights(
        losses, params, batch, num_chunks=1, shared=functions.shared, strategy="unroll"
      ).eigenvalues

    _JITTED[key] = jax.jit(probe)
  return _JITTED[key]


def strategy_of(config: Config) -> Strategy:
  """The `Strategy` of the train step that `config` describes."""
  return Strategy(passes=config.task_passes, materialize=config.materialize)


def build_step(
  benchmark: Benchmark,
  config: Config,
  *,
  method=None,
  optimizer: optax.GradientTransformation | None = None,
) -> tuple[TrainStep, Any]:
  """The jitted train step of `config` on `benchmark` and its method (built once each).

  Args:
    benchmark: the `Benchmark` (its model functions and number of tasks).
    config: the run's `Config` (method, hyper-parameters, optimiser, strategy).
    method: a method object to use instead of `config.method`.
    optimizer: any optax transformation to use instead of the one `config` describes.

  Returns:
    (the `TrainStep`, whose optimiser ends with the learning-rate factor; the method).
  """
  functions = benchmark.functions
  cache_key = None
  if method is None and optimizer is None:
    cache_key = (
      functions,
      benchmark.num_tasks,
      config.method_key,
      repr(sorted(config.method_hyperparameters().items())),
      config.optimizer,
      config.learning_rate,
      config.weight_decay,
      config.max_grad_norm,
      strategy_of(config),
    )
    if cache_key in _STEPS:
      return _STEPS[cache_key]
  if method is None or optimizer is None:
    built_method, built_optimizer = build_optimizer(config, benchmark.num_tasks, functions.shared)
    method = built_method if method is None else method
    optimizer = built_optimizer if optimizer is None else optimizer
  step = make_train_step(
    functions.loss_fn,
    method,
    with_learning_rate_factor(optimizer),
    strategy=strategy_of(config),
    has_state=True,
    encode=functions.encode,
    decode=functions.decode,
  )
  if cache_key is not None:
    _STEPS[cache_key] = step, method
  return step, method


def initial_state(benchmark: Benchmark, config: Config, step: TrainStep) -> TrainState:
  """The `TrainState` a run of `config` starts from."""
  key = ("init", benchmark.functions)
  if key not in _JITTED:
    _JITTED[key] = jax.jit(benchmark.functions.init)
  sample = benchmark.train.take(np.arange(min(config.batch_size, len(benchmark.train))))
  params, model_state = _JITTED[key](jax.random.key(config.seed, impl=config.init_prng), sample)
  return step.init(params, model_state, jax.random.fold_in(jax.random.key(config.seed), 2))


def eigenvalues_in_step(method, state: TrainState) -> bool:
  """Whether the step's metrics carry lambda_i over the shared parameters: the method's
  statistics come from task backward passes over them (squared norms or kernel blocks) and
  its state records the eigenvalues it used (NTKMTL's `NTKMTLState.eigenvalues`)."""
  return method.needs.kind in ("sq_norms", "kernel") and "eigenvalues" in getattr(
    state.method_state, "_fields", ()
  )


# The hooks around the steps.


class EigenvalueProbe:
  """lambda_i = ||g_i||^2 on the step's batch before step 1 and every `every` steps."""

  def __init__(self, benchmark: Benchmark, every: int, recorder: Recorder):
    self.probe = _jitted_probe(benchmark.functions) if every else None
    self.every, self.recorder = every, recorder

  def before_step(self, taken: int, state: TrainState, batch: dict):
    if self.probe is not None and (taken == 0 or (taken + 1) % self.every == 0):
      self.recorder.probe_steps.append(taken + 1)
      self.recorder.probe_values.append(
        np.asarray(self.probe(state.params, state.model_state, batch), np.float64)
      )


class ProgressLog:
  """The progress bar (step, task losses, weights) and the step times, every `log_every` steps."""

  def __init__(
    self,
    config: Config,
    total: int,
    initial: int,
    description: str,
    enabled: bool,
    recorder: Recorder,
  ):
    self.total, self.every, self.recorder = total, config.log_every, recorder
    self.bar = None
    if enabled:
      from tqdm.auto import tqdm

      self.bar = tqdm(
        total=total, initial=initial, desc=description, unit="step", leave=False, dynamic_ncols=True
      )
    self.say = print if self.bar is None else self.bar.write

  def after_step(self, taken: int, started: float, run: RunState):
    if taken % self.every and taken != self.total and len(run.step_times) >= 3:
      return
    self.recorder.flush()  # waits for the step
    run.step_times.append(time.perf_counter() - started)
    if self.bar is not None:
      fmt = lambda values: "/".join(f"{v:.3g}" for v in values)
      self.bar.update(taken - self.bar.n)
      self.bar.set_postfix_str(
        f"loss {fmt(self.recorder.host['losses'][-1])} | "
        f"w {fmt(self.recorder.host['weights'][-1])}",
        refresh=False,
      )

  def close(self):
    if self.bar is not None:
      self.bar.close()


class Selection:
  """Which model is the result (`Config.selection`), and the plateau schedule that reads the
  validation score.

  After every epoch (and where `max_steps` stops the run): with a validation split, the
  model is scored on it (`Benchmark.selection_score`). "best" and "best_or_later" keep the
  best-scoring model (an equal later score replacing it under "best_or_later") and score it
  on the test split; "last_epochs" selects nothing: the test metrics of each of the last
  `report_epochs` epochs of the run are kept and their mean is the result.
  """

  def __init__(
    self,
    benchmark: Benchmark,
    config: Config,
    name: str,
    num_epochs: int,
    checkpoints: RunCheckpoints | None,
    say: Callable[[str], None],
  ):
    self.benchmark, self.config, self.label = benchmark, config, f"{config.benchmark}/{name}"
    # An STL run is selected on its own task's metrics.
    self.stl_task = config.method_hyperparameters().get("task", 0) if name == "stl" else None
    self.first_reported = num_epochs - config.report_epochs
    self.checkpoints, self.say = checkpoints, say

  def _test(self, state: TrainState) -> dict:
    return self.benchmark.evaluate(
      state.params, state.model_state, "test", self.config.eval_batch_size
    )

  def after_epoch(self, epoch: int, state: TrainState, run: RunState):
    bench, config = self.benchmark, self.config
    entry = dict(epoch=epoch, step=int(state.step))
    if config.selection == "last_epochs" and epoch >= self.first_reported:
      entry["test"] = test = self._test(state)
      run.reported = [*run.reported, test][-config.report_epochs :]
      run.metrics = mean_metrics(run.reported)
      self.say(
        f"[{self.label}] epoch {epoch} step {int(state.step)} test "
        + " ".join(f"{n}={v:.4g}" for n, v in test.items())
      )
    if bench.val is None:
      if "test" in entry:
        run.evaluations.append(entry)
      return
    val = bench.evaluate(state.params, state.model_state, "val", config.eval_batch_size)
    score = bench.selection_score(val, task=self.stl_task)
    entry.update(val=val, score=score)
    better = (
      score >= run.best_score if config.selection == "best_or_later" else score > run.best_score
    )
    if config.selection != "last_epochs" and better:
      test = self._test(state) if bench.test is not None else val
      run.best_score, run.best_epoch, run.val_metrics, run.metrics = score, epoch, val, test
      entry["test"] = test
      if self.checkpoints is not None:
        self.checkpoints.save_best(state)
    if config.lr_schedule == "plateau":
      # PyTorch's ReduceLROnPlateau(mode="min", threshold_mode="rel") on -score.
      if -score < -run.plateau_best * (1.0 - config.plateau_threshold):
        run.plateau_best, run.plateau_wait = score, 0
      else:
        run.plateau_wait += 1
        if run.plateau_wait > config.plateau_patience:
          run.plateau_scale, run.plateau_wait = run.plateau_scale * config.plateau_factor, 0
    run.evaluations.append(entry)
    self.say(
      f"[{self.label}] epoch {epoch} step {int(state.step)} val score {score:.4f} "
      + " ".join(f"{n}={v:.4g}" for n, v in val.items())
    )


def mean_metrics(evaluations: list[dict]) -> dict:
  """The metric-wise mean of several evaluations ({metric: value} each): the number the MTAN
  code family reports for NYUv2 and Cityscapes over the last 10 epochs."""
  return {name: float(np.mean([e[name] for e in evaluations])) for name in evaluations[0]}


class Checkpointing:
  """The run's checkpoints: at epoch ends (`epoch_end`: skipped while the last checkpoint is
  younger than `min_interval` seconds), where the run stops and on Ctrl-C (`save`), every
  `every` steps inside an epoch (`periodic`); does nothing without a workdir."""

  def __init__(
    self,
    checkpoints: RunCheckpoints | None,
    config: Config,
    total_steps: int,
    steps_per_epoch: int,
    recorder: Recorder,
  ):
    self.checkpoints, self.total, self.steps_per_epoch = checkpoints, total_steps, steps_per_epoch
    self.every, self.min_interval = config.checkpoint_every, config.checkpoint_min_interval
    self.recorder, self.last = recorder, time.monotonic()

  def save(self, state: TrainState, run: RunState, taken: int):
    if self.checkpoints is not None:
      run.finished = taken >= self.total
      self.checkpoints.save(state, run.to_dict(), self.recorder.arrays())
      self.last = time.monotonic()

  def epoch_end(self, state: TrainState, run: RunState, taken: int, *, last: bool):
    if last or time.monotonic() - self.last >= self.min_interval:
      self.save(state, run, taken)

  def periodic(self, state: TrainState, run: RunState, taken: int):
    if self.every and taken % self.every == 0 and run.batch < self.steps_per_epoch:
      self.save(state, run, taken)


def _finished_results(workdir: str) -> bool:
  """Whether `workdir/results.json` records a run that took all its steps."""
  try:
    with open(os.path.join(workdir, "results.json")) as f:
      return not json.load(f).get("interrupted", True)
  except (OSError, ValueError):
    return False


CONFIG_FILE = "config.json"


def _saved_config(workdir: str) -> dict | None:
  """The fingerprint `fit` wrote to `workdir/config.json` (None: none there)."""
  try:
    with open(os.path.join(workdir, CONFIG_FILE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _refuse_other_config(workdir: str, saved: dict | None, wanted: dict) -> list[str]:
  """The fields in which `saved` differs from `wanted`; raises RunMismatchError when one of
  them may not change on resume (not in `RESUMABLE`)."""
  if saved is None:
    return []
  unset = "<unset>"
  differ = sorted(
    k for k in set(wanted) | set(saved) if saved.get(k, unset) != wanted.get(k, unset)
  )
  refused = [k for k in differ if k not in RESUMABLE]
  if refused:
    shown = ", ".join(f"{k} {saved.get(k, unset)!r} -> {wanted.get(k, unset)!r}" for k in refused)
    raise RunMismatchError(
      f"{workdir} holds another run (different {shown}); choose another directory, or pass "
      "overwrite=True (--overwrite) to discard it."
    )
  return differ


def resume_run(
  checkpoints: RunCheckpoints | None,
  config: Config,
  state: TrainState,
  recorder: Recorder,
  resume: bool,
  overwrite: bool,
) -> tuple[TrainState, RunState]:
  """The state and run state to start from, after checking what the workdir holds (a fresh
  run without checkpoints).

  A resume continues only a run of the same configuration: every field of `Config` but those
  of `config.RESUMABLE` (which may change, and are recorded in `changes_on_resume`). With
  `overwrite`, an unfinished run is discarded whatever differs; a finished one never is
  (whether or not its checkpoints restore into this config): delete its directory by name.
  """
  fresh = state, RunState(fingerprint=config.fingerprint())
  if checkpoints is None:
    return fresh
  workdir = checkpoints.workdir
  finished = _finished_results(workdir)
  if not checkpoints.steps():
    if finished:
      raise RunMismatchError(
        f"{workdir} holds the results.json of a finished run (its checkpoints are gone); "
        "refusing to write over it: delete that directory yourself or choose another one."
      )
    return fresh
  wanted = fresh[1].fingerprint
  if not overwrite:  # compare the configs before restoring anything
    _refuse_other_config(workdir, _saved_config(workdir), wanted)
  restored = checkpoints.restore(state)
  if restored is not None:
    finished = finished or RunState.from_dict(restored[1]).finished
  if overwrite:
    if finished:
      raise RunMismatchError(
        f"{workdir} holds a finished run; refusing to overwrite it: delete that directory "
        "yourself to start over, or choose another one."
      )
    checkpoints.clear()
    return fresh
  if restored is None:
    raise RunMismatchError(
      f"{workdir} holds checkpoints but none restores into this config; choose another "
      "directory, or pass overwrite=True (--overwrite) to start the run over."
    )
  saved_state, saved, history = restored
  saved = RunState.from_dict(saved)
  differ = _refuse_other_config(workdir, saved.fingerprint, wanted)
  if not resume:
    raise RunMismatchError(
      f"{workdir} holds a run of this config; pass resume=True "
      "(--resume) to continue it or overwrite=True (--overwrite) to "
      "start over."
    )
  recorder.load(history)
  changes = {k: [saved.fingerprint.get(k), wanted[k]] for k in differ}
  print(
    f"Resuming {config.benchmark}/{config.method} at epoch {saved.epoch}, batch "
    f"{saved.batch} (step {int(saved_state.step)})"
    + (
      ""
      if not changes
      else "; changed: " + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
    )
    + "."
  )
  log = saved.changes_on_resume + (
    [dict(step=int(saved_state.step), changes=changes)] if changes else []
  )
  return saved_state, dataclasses.replace(
    saved, finished=False, fingerprint=wanted, changes_on_resume=log
  )


def fit(
  benchmark: Benchmark,
  config: Config,
  workdir: str | None = None,
  *,
  method=None,
  optimizer: optax.GradientTransformation | None = None,
  progress: bool = True,
  description: str | None = None,
  callback: Callable[[int, TrainState, dict], None] | None = None,
  resume: bool = True,
  overwrite: bool = False,
) -> RunResult:
  """Trains `config.method` on `benchmark` and returns the run's record.

  Ctrl-C (SIGINT, or a KeyboardInterrupt) or SIGTERM during training stops the run cleanly:
  the result has `interrupted=True` (`stop_signal` names the signal), the history of the steps
  taken, and metrics of the best model so far (or of the current one, scored then). With a
  `workdir`, the signal stops the run at the next step boundary and checkpoints there, so
  nothing trained is lost; started again, the run resumes from the newest usable checkpoint
  and ends with the parameters an uninterrupted run ends with. While it runs, `workdir` is
  locked (`ntkmtl_jax.locking`): a second process on it fails at once.

  Args:
    benchmark: the `Benchmark` (model functions, splits, metrics, selection rule).
    config: the run's `Config`.
    workdir: where checkpoints and results.json go (None: nothing is written).
    method: a method object (e.g. `ntkmtl_jax.ntkmtl(...)`) instead of `config.method`.
    optimizer: any optax transformation instead of the one `config` describes; the
      learning-rate schedule multiplies its updates.
    progress: show a tqdm progress bar (step, task losses, task weights).
    description: the progress bar's label (default: the method's name and seed).
    callback: called as `callback(t, state, metrics)` after step t (1-based), e.g. a
      `spectra.SpectrumTracker`; it runs on the host, so keep it cheap or sparse.
    resume: continue the run that `workdir` holds (False: refuse to touch it).
    overwrite: discard an unfinished run (of this config or another) that `workdir` holds;
      a finished run is never discarded.

  Returns:
    A `RunResult`.

  Raises:
    RunMismatchError: `workdir` holds a run of another config (without `overwrite`; settings
      in `config.RESUMABLE` may change on resume), a run of this one (with neither `resume`
      nor `overwrite`), or a finished run to overwrite.
    WorkdirBusyError: another process is running in `workdir`.
  """
  with workdir_lock(workdir) if workdir else contextlib.nullcontext():
    return _fit(
      benchmark,
      config,
      workdir,
      method,
      optimizer,
      progress,
      description,
      callback,
      resume,
      overwrite,
    )


def _fit(
  benchmark, config, workdir, method, optimizer, progress, description, callback, resume, overwrite
) -> RunResult:
  started = time.perf_counter()
  steps_per_epoch, num_epochs, total = run_length(benchmark, config)
  name = config.method_key if method is None else method.name
  step, method = build_step(benchmark, config, method=method, optimizer=optimizer)
  state = initial_state(benchmark, config, step)
  recorder = Recorder(benchmark.num_tasks)
  checkpoints = RunCheckpoints(workdir) if workdir else None
  state, run = resume_run(checkpoints, config, state, recorder, resume, overwrite)
  if workdir:
    io.write_json(os.path.join(workdir, CONFIG_FILE), run.fingerprint)
  in_step = eigenvalues_in_step(method, state)
  probe = EigenvalueProbe(benchmark, 0 if in_step else config.probe_every, recorder)
  label = description or f"{name} seed {config.seed}"
  log = ProgressLog(config, total, int(state.step), label, progress, recorder)
  select = Selection(benchmark, config, name, num_epochs, checkpoints, log.say)
  saving = Checkpointing(checkpoints, config, total, steps_per_epoch, recorder)
  taken = int(state.step)  # counted on the host: reading state.step would wait for the step
  interrupted = None  # the signal that stopped the run ("SIGINT" for any KeyboardInterrupt)
  batches = None
  with StopRequests() as stop:
    try:
      for epoch in range(run.epoch, num_epochs):
        if taken >= total and run.batch == 0:
          break  # stopped exactly at an epoch's end, which was already scored
        state = set_learning_rate_factor(
          state, learning_rate_factor(config, epoch, num_epochs, run.plateau_scale)
        )
        stopped = taken >= total  # resumed where `max_steps` stopped an earlier run
        batches = epoch_batches(  # a generator: it reads nothing until iterated
          benchmark.train,
          config.batch_size,
          seed=config.seed,
          epoch=epoch,
          skip=run.batch,
          drop_last=config.drop_last,
        )
        if config.prefetch and not stopped:  # loads the next batches while a step runs
          batches = prefetch(batches, config.prefetch)
        for batch in () if stopped else batches:
          if stop.requested:  # between steps: state, history and position agree
            raise KeyboardInterrupt
          probe.before_step(taken, state, batch)
          step_started = time.perf_counter()
          state, out = step(state, batch)
          taken, run.batch = taken + 1, run.batch + 1
          recorder.add(out)
          if callback is not None:
            callback(taken, state, out)
          log.after_step(taken, step_started, run)
          if taken >= total:
            stopped = run.batch < steps_per_epoch
            break
          saving.periodic(state, run, taken)
        if hasattr(batches, "close"):
          batches.close()  # stops a prefetching thread now, not when `fit` returns
        if not stopped:
          run.epoch, run.batch = epoch + 1, 0
        select.after_epoch(epoch, state, run)
        saving.epoch_end(state, run, taken, last=stopped or run.epoch >= num_epochs)
        if stopped:
          break
    except KeyboardInterrupt as error:
      interrupted = stop.signal_name or (
        "SIGTERM" if type(error).__name__ == "Terminated" else "SIGINT"
      )
      if stop.requested and checkpoints is not None:
        saving.save(state, run, taken)
        log.say(
          f"Interrupted at step {taken}: saved a checkpoint in {workdir} ({interrupted}); run "
          "again with it (--resume) to continue."
        )
    finally:
      if hasattr(batches, "close"):
        batches.close()
      log.close()
  if run.metrics is None and taken > 0:
    # No validation split, or interrupted before its first pass: score the current model.
    run.metrics = benchmark.evaluate(
      state.params, state.model_state, "test", config.eval_batch_size
    )
  result = _result(name, config, state, run, recorder.history(in_step), interrupted, started)
  if workdir:
    io.write_json(os.path.join(workdir, "results.json"), result.to_dict())
  return result


def run_length(benchmark: Benchmark, config: Config) -> tuple[int, int, int]:
  """(steps per epoch, epochs, steps) of a run of `config` on `benchmark`."""
  n = len(benchmark.train)
  steps_per_epoch = n // config.batch_size if config.drop_last else -(-n // config.batch_size)
  if steps_per_epoch < 1:
    raise ValueError(
      f"The training split has {len(benchmark.train)} examples, fewer than the "
      f"batch size {config.batch_size}; lower the batch size."
    )
  return (steps_per_epoch, *config.run_length(steps_per_epoch))


def _result(
  name: str,
  config: Config,
  state: TrainState,
  run: RunState,
  history: History,
  interrupted: str | None,
  started: float,
) -> RunResult:
  times = run.step_times[2:] or run.step_times
  return RunResult(
    method=name,
    seed=config.seed,
    hparams=config.method_hyperparameters(),
    metrics=run.metrics or {},
    wall_time=time.perf_counter() - started,
    steps=int(state.step),
    skipped=int(state.skipped),
    interrupted=interrupted is not None,
    stop_signal=interrupted,
    changes_on_resume=run.changes_on_resume,
    history=history,
    val_metrics=run.val_metrics,
    best_epoch=run.best_epoch,
    evaluations=run.evaluations,
    protocol=config.protocol,
    selection=config.selection,
    step_time_s=float(np.median(times)) if times else None,
    params=state.params,
    model_state=state.model_state,
  )


def restore_checkpoint(
  benchmark: Benchmark, config: Config, workdir: str, which: str = "best"
) -> TrainState:
  """The `TrainState` that `fit` saved in `workdir`: "best" (the selected model) or "latest"."""
  step, _ = build_step(benchmark, config)
  template = initial_state(benchmark, config, step)
  checkpoints = RunCheckpoints(workdir)
  if which == "best":
    return checkpoints.restore_best(template)
  restored = checkpoints.restore(template)
  if restored is None:
    raise FileNotFoundError(f"No usable checkpoint in {workdir}.")
  return restored[0]
