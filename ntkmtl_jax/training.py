"""The training loop: one multi-task method on one benchmark, epoch by epoch, with model
selection, learning-rate schedules, checkpoints and resume.

    bench = ntkmtl_jax.benchmarks.get_benchmark("multidigits")
    result = fit(bench, bench.config.replace(method="ntkmtl", max_steps=300))
    result.metrics         # {"left acc": 0.93, ...}: the test metrics of the selected model
    result.history.losses  # (steps, k) task losses, one row per step

`fit` runs a `Config` (the method, its optimiser and the protocol) on a `Benchmark` (model
functions, train / validation / test `Split`s and metrics). After every epoch, and when
`max_steps` stops the run, a benchmark with a validation split is scored on it; the best
model (by `Benchmark.selection_score`) is scored on the test split, and that is the
result. Without a validation split the final model is scored on the test split. The
learning rate follows a per-epoch schedule (constant, cosine, step, or plateau on the
validation score), applied as a factor after the optimiser through
`optax.inject_hyperparams`, so any optax transformation can be the optimiser. With a
`workdir`, crash-safe checkpoints (`ntkmtl_jax.checkpoints`: state, history and run state in
one orbax checkpoint) are written at those points, and a run started again with the same
`workdir` resumes where it stopped, with the same batches and augmentation.
The `ntkmtl` command and the `experiments/` scripts both run this loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ntkmtl_jax
from ntkmtl_jax import TrainState, TrainStep, kernel
from ntkmtl_jax.checkpoints import RunCheckpoints, RunMismatchError, fingerprint
from ntkmtl_jax.data.splits import Split, epoch_batches
from ntkmtl_jax.models.multitask import TaskFunctions

if TYPE_CHECKING:
  from ntkmtl_jax.benchmarks import Benchmark

PyTree = Any
SCHEDULES = ("constant", "cosine", "step", "plateau")


@dataclasses.dataclass
class Config:
  """The settings of one run: benchmark options, method, optimiser and protocol.

  Attributes:
    benchmark: the benchmark's registry name.
    data_dir: where the benchmark's data lives (tfds data_dir or the MTAN `.npy` root).
    data: the benchmark's data options (image size, split sizes, ...).
    model: the benchmark's model options (widths, ...).
    method: a name from `ntkmtl_jax.methods.names()` ("ntkmtl" is the official step:
      NTKMTL scaled by k, shared gradient clipped to `max_grad_norm`, plain head gradients).
    method_hparams: per method, the published hyper-parameters used on this benchmark.
    hparams: hyper-parameters of this run's method (override `method_hparams`).
    optimizer: "adam", "adamw" or "sgd" (or give `fit` any optax transformation).
    learning_rate: the optimiser's base learning rate.
    weight_decay: decoupled weight decay for "adamw".
    batch_size: training batch size.
    num_epochs: epochs to run (None: as many as `max_steps` needs).
    max_steps: stop after this many train steps (None: run all epochs).
    lr_schedule: "constant", "cosine" (per epoch, to 0 at the end), "step" (times
      `lr_gamma` every `lr_step_size` epochs) or "plateau" (times `plateau_factor` when the
      validation score has not improved for `plateau_patience` epochs, not below
      `plateau_min_lr`).
    max_grad_norm: global-norm clip of the shared update for gradient-based methods (None:
      no clipping). That is what the NTKMTL and FairGrad repositories do for NTKMTL and
      FairGrad (inside their own backward passes) and the original nash-mtl repository for
      Nash-MTL; the NTKMTL and FAMO repositories' other gradient methods (MGDA, IMTL-G,
      their Nash-MTL, ...) call the clip before the backward pass, where it does nothing,
      and so run unclipped there. Loss-weighting methods are not clipped, as in those
      repositories.
    eval_batch_size: batch of the evaluation passes.
    probe_every: for methods whose step does not produce the shared-parameter eigenvalues,
      compute lambda_i = ||g_i||^2 every `probe_every` steps outside the step (0: never).
    strategy: how task backward passes run (`make_train_step`'s `strategy`).
    seed: seeds the parameters and the order of the batches.
    init_prng: the random-number generator of the parameter initialisation (a
      `jax.random.key` impl); the paper benchmarks use "rbg": on XLA:CPU, initialising a
      network of a hundred layers with threefry keys spends tens of seconds compiling
      random-number code.
    log_every: steps between progress-bar refreshes (and host transfers of the metrics).
    checkpoint_every: with a workdir, also checkpoint every this many steps (0: at epoch
      ends and where `max_steps` stops the run only).
  """
  benchmark: str = ""
  data_dir: str | None = None
  data: dict = dataclasses.field(default_factory=dict)
  model: dict = dataclasses.field(default_factory=dict)
  method: str = "ls"
  method_hparams: dict = dataclasses.field(default_factory=dict)
  hparams: dict = dataclasses.field(default_factory=dict)
  optimizer: str = "adam"
  learning_rate: float = 1e-3
  weight_decay: float = 0.0
  batch_size: int = 32
  num_epochs: int | None = 1
  max_steps: int | None = None
  lr_schedule: str = "constant"
  lr_step_size: int = 100
  lr_gamma: float = 0.5
  plateau_factor: float = 0.7
  plateau_patience: int = 10
  plateau_min_lr: float = 1e-5
  max_grad_norm: float | None = 1.0
  eval_batch_size: int = 64
  probe_every: int = 0
  strategy: str = "auto"
  seed: int = 0
  init_prng: str = "threefry2x32"
  log_every: int = 50
  checkpoint_every: int = 0

  def replace(self, **changes) -> "Config":
    return dataclasses.replace(self, **changes)

  @property
  def method_key(self) -> str:
    """The method's registry name ("NTKMTL-SR" -> "ntkmtl_sr")."""
    return method_key(self.method)

  def method_hyperparameters(self) -> dict:
    """The published hyper-parameters of the method, overridden by `hparams`."""
    return {**self.method_hparams.get(self.method_key, {}), **self.hparams}

  def run_length(self, steps_per_epoch: int) -> tuple[int, int]:
    """(epochs, steps) of the run, given the batches in one epoch."""
    if self.num_epochs is None and self.max_steps is None:
      raise ValueError("Config: set num_epochs or max_steps (or both).")
    epochs = (self.num_epochs if self.num_epochs is not None
              else math.ceil(self.max_steps / steps_per_epoch))
    steps = epochs * steps_per_epoch
    return epochs, steps if self.max_steps is None else min(steps, self.max_steps)


def method_key(name: str) -> str:
  """The registry form of a method name ("NTKMTL-SR" -> "ntkmtl_sr")."""
  return name.strip().lower().replace("-", "_")


def method_traits(method) -> tuple[str, bool, bool]:
  """What the loop reads of a method: (name, is a gradient method, eigenvalues in its step).

  The one place that reads a method's attributes. A gradient method needs per-task gradients
  (not only the losses or the representation's kernel); the step of NTKMTL with shared
  parameter kernels returns lambda_i itself, other methods get them from a probe.
  """
  needs = method.needs
  eigenvalues_in_step = needs.kind in ("sq_norms", "kernel") and method.name.startswith("ntkmtl")
  return method.name, needs.task_gradients, eigenvalues_in_step


def build_optimizer(config: Config, num_tasks: int,
                    shared) -> tuple[Any, optax.GradientTransformation]:
  """The method and the optimiser chain for `config`.

  "ntkmtl" with at most an `exponent` is the official step (`official_ntkmtl`); gradient
  methods get the shared-gradient clipping to `max_grad_norm`, loss-weighting methods none.

  Args:
    config: the run's `Config`.
    num_tasks: k.
    shared: the shared-parameter mask function of the model.

  Returns:
    (method, optax transformation applied to the method's update).
  """
  name, hp = config.method_key, config.method_hyperparameters()
  max_norm = config.max_grad_norm if config.max_grad_norm is not None else math.inf
  if name == "ntkmtl" and set(hp) <= {"exponent"}:
    method, clip = ntkmtl_jax.official_ntkmtl(num_tasks, shared, max_norm=max_norm, **hp)
  else:
    method = ntkmtl_jax.methods.get(name, num_tasks, shared=shared, **hp)
    clip = (ntkmtl_jax.clip_shared_by_global_norm(max_norm, shared)
            if method_traits(method)[1] and config.max_grad_norm is not None
            else optax.identity())
  makers = {"adam": lambda: optax.adam(config.learning_rate),
            "adamw": lambda: optax.adamw(config.learning_rate,
                                         weight_decay=config.weight_decay),
            "sgd": lambda: optax.sgd(config.learning_rate)}
  if config.optimizer not in makers:
    raise ValueError(f"Unknown optimizer {config.optimizer!r}: choose one of {sorted(makers)}.")
  return method, optax.chain(clip, makers[config.optimizer]())


def learning_rate_factor(config: Config, epoch: int, num_epochs: int,
                         plateau_scale: float) -> float:
  """The factor on the base learning rate in `epoch` (0-based) under `config.lr_schedule`."""
  if config.lr_schedule == "constant":
    return 1.0
  if config.lr_schedule == "cosine":
    return 0.5 * (1.0 + math.cos(math.pi * epoch / max(num_epochs, 1)))
  if config.lr_schedule == "step":
    return config.lr_gamma ** (epoch // config.lr_step_size)
  if config.lr_schedule == "plateau":
    return max(plateau_scale, config.plateau_min_lr / config.learning_rate)
  raise ValueError(f"Unknown lr_schedule {config.lr_schedule!r}: use one of {SCHEDULES}.")


def with_learning_rate_factor(optimizer: optax.GradientTransformation
                              ) -> optax.GradientTransformation:
  """`optimizer` followed by an injectable scale (the schedule's factor, initially 1)."""
  return optax.chain(optimizer, optax.inject_hyperparams(optax.scale)(step_size=1.0))


def set_learning_rate_factor(state: TrainState, factor: float) -> TrainState:
  """`state` with the factor of `with_learning_rate_factor`'s optimiser replaced."""
  inner, scale = state.optimizer_state
  hyper = dict(scale.hyperparams)
  hyper["step_size"] = jnp.asarray(factor, hyper["step_size"].dtype)
  return state._replace(optimizer_state=(inner, scale._replace(hyperparams=hyper)))


@dataclasses.dataclass
class History:
  """What happened during one run, as NumPy arrays (T steps taken, k tasks).

  Attributes:
    steps: (T,) step numbers 1..T.
    losses: (T, k) training losses of each task on each step's batch.
    weights: (T, k) the method's task weights at each step.
    grad_norm: (T,) norm of the aggregated shared update.
    eigen_steps: (E,) steps at which `eigenvalues` were recorded.
    eigenvalues: (E, k) lambda_i, the largest eigenvalue of task i's NTK block over the
      shared parameters (for n = 1, ||g_i||^2): from the train step for NTKMTL, or from a
      separate probe every `probe_every` steps for the other methods.
    eigen_source: "step", "probe" or "" (none recorded).
    skip_cause: (T,) why each step was skipped: 0 applied, 1 non-finite losses, 2 non-finite
      update from the method, 3 non-finite new parameters or optimiser/method/model state.
  """
  steps: np.ndarray
  losses: np.ndarray
  weights: np.ndarray
  grad_norm: np.ndarray
  eigen_steps: np.ndarray
  eigenvalues: np.ndarray
  eigen_source: str = ""
  skip_cause: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))

  def to_dict(self) -> dict:
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in out.items()}

  @classmethod
  def from_dict(cls, d: dict) -> "History":
    return cls(**{f.name: (np.asarray(d.get(f.name, ()), np.float64)
                           if f.name != "eigen_source" else d[f.name])
                  for f in dataclasses.fields(cls)})


# What `History.skip_cause` codes mean (0: the step was applied).
SKIP_CAUSES = {1: "losses", 2: "update", 3: "state"}
# A run that skipped more than this fraction of its steps did not train: `skip_report` says so.
MAX_SKIPPED_FRACTION = 0.5


def skip_report(result: "RunResult", max_fraction: float = MAX_SKIPPED_FRACTION) -> str | None:
  """One line saying that `result` skipped most of its steps and why, or None if it trained."""
  if not result.steps or result.skipped <= max_fraction * result.steps:
    return None
  causes = ", ".join(f"non-finite {name}: {count}"
                     for name, count in result.skipped_by_cause.items() if count)
  return (f"{result.method} seed {result.seed} skipped {result.skipped} of its {result.steps} "
          f"steps ({causes}), so it did not train as configured. Check the learning rate, the "
          "method's hyper-parameters and the data for NaN/inf.")


@dataclasses.dataclass
class RunResult:
  """The record of one run.

  Attributes:
    method: the method's registry name.
    seed: the seed (parameter init and batch order).
    hparams: the hyper-parameters given to the method.
    metrics: test metrics of the selected model (the final one without a validation
      split); {} when no step was taken.
    wall_time: seconds for the run, compilation and evaluation included.
    steps: the number of steps taken.
    skipped: steps skipped because something came out non-finite (`skipped_by_cause`).
    interrupted: whether the run was stopped (Ctrl-C) before its end.
    history: the `History`.
    val_metrics: validation metrics of the selected model (None without validation).
    best_epoch: the epoch of the selected model (None without validation).
    evaluations: one entry per validation pass: epoch, step, val, score (and test when
      that model became the best).
    step_time_s: median wall time of a train step after the first two.
    params, model_state: the final parameters and model state (not serialised).
  """
  method: str
  seed: int
  hparams: dict
  metrics: dict
  wall_time: float
  steps: int
  skipped: int
  interrupted: bool
  history: History
  val_metrics: dict | None = None
  best_epoch: int | None = None
  evaluations: list = dataclasses.field(default_factory=list)
  step_time_s: float | None = None
  params: PyTree = None
  model_state: PyTree = None

  @property
  def skipped_by_cause(self) -> dict:
    """Skipped steps per cause: non-finite `losses`, `update` (the method's) or `state`
    (new parameters, optimiser, method or model state)."""
    cause = np.asarray(self.history.skip_cause)
    return {name: int(np.sum(cause == code))
            for code, name in SKIP_CAUSES.items()}

  @property
  def last_losses(self) -> np.ndarray:
    """The task losses of the last step ((k,), empty before the first)."""
    return self.history.losses[-1] if len(self.history.losses) else np.zeros(0)

  def to_dict(self, with_history: bool = True) -> dict:
    out = dict(method=self.method, seed=self.seed, hparams=_jsonable(self.hparams),
               metrics=self.metrics, wall_time=self.wall_time, steps=self.steps,
               skipped=self.skipped, skipped_by_cause=self.skipped_by_cause,
               interrupted=self.interrupted, val_metrics=self.val_metrics, best_epoch=self.best_epoch,
               evaluations=self.evaluations, step_time_s=self.step_time_s)
    if with_history:
      out["history"] = self.history.to_dict()
    return out

  @classmethod
  def from_dict(cls, d: dict) -> "RunResult":
    return cls(method=d["method"], seed=d["seed"], hparams=d["hparams"], metrics=d["metrics"],
               wall_time=d["wall_time"], steps=d["steps"], skipped=d["skipped"],
               interrupted=d["interrupted"], history=History.from_dict(d["history"]),
               val_metrics=d.get("val_metrics"), best_epoch=d.get("best_epoch"),
               evaluations=d.get("evaluations", []), step_time_s=d.get("step_time_s"))


def _jsonable(value):
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (bool, int, float, str)) or value is None:
    return value
  return repr(value)


# The jitted functions of a model and the train steps of (model, method, optimiser)
# combinations, built once so later runs (other seeds) reuse their compilations.
_JITTED: dict[tuple, Callable] = {}
_STEPS: dict[tuple, tuple[TrainStep, Any]] = {}


def _jitted(kind: str, functions: TaskFunctions) -> Callable:
  key = (kind, functions)
  if key not in _JITTED:
    if kind == "probe":

      def probe(params, model_state, batch):
        losses = lambda p, b: functions.loss_fn(p, model_state, b)[0]
        return kernel.ntk_weights(losses, params, batch, num_chunks=1,
                                  shared=functions.shared, strategy="unroll").eigenvalues

      _JITTED[key] = jax.jit(probe)
    else:
      _JITTED[key] = jax.jit(getattr(functions, kind))
  return _JITTED[key]


def build_step(benchmark: "Benchmark", config: Config, *, method=None,
               optimizer: optax.GradientTransformation | None = None) -> tuple[TrainStep, Any]:
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
    cache_key = (functions, benchmark.num_tasks, config.method_key,
                 repr(sorted(config.method_hyperparameters().items())), config.optimizer,
                 config.learning_rate, config.weight_decay, config.max_grad_norm,
                 config.strategy)
    if cache_key in _STEPS:
      return _STEPS[cache_key]
  if method is None or optimizer is None:
    built_method, built_optimizer = build_optimizer(config, benchmark.num_tasks,
                                                    functions.shared)
    method = built_method if method is None else method
    optimizer = built_optimizer if optimizer is None else optimizer
  step = ntkmtl_jax.make_train_step(
      functions.loss_fn, method, with_learning_rate_factor(optimizer),
      strategy=config.strategy, has_state=True, encode=functions.encode,
      decode=functions.decode)
  if cache_key is not None:
    _STEPS[cache_key] = step, method
  return step, method


def initial_state(benchmark: "Benchmark", config: Config, step: TrainStep) -> TrainState:
  """The `TrainState` a run of `config` starts from."""
  sample = benchmark.train.take(np.arange(min(config.batch_size, len(benchmark.train))))
  params, model_state = _jitted("init", benchmark.functions)(
      jax.random.key(config.seed, impl=config.init_prng), sample)
  return step.init(params, model_state, jax.random.fold_in(jax.random.key(config.seed), 2))


def evaluate(benchmark: "Benchmark", params, model_state, split: Split,
             batch_size: int) -> dict:
  """The benchmark's metrics of the model on `split` (batches in order)."""
  predict = _jitted("predict", benchmark.functions)
  accumulator = benchmark.new_accumulator()
  for batch in epoch_batches(split, batch_size, seed=None):
    accumulator.update(jax.tree.map(np.asarray, predict(params, model_state, batch)), batch)
  return accumulator.result()


# Checkpoints.


def restore_checkpoint(benchmark: "Benchmark", config: Config, workdir: str,
                       which: str = "best") -> TrainState:
  """The `TrainState` that `fit` saved in `workdir`: "best" (the selected model) or "latest"."""
  from ntkmtl_jax.checkpoints import RunCheckpoints
  step, _ = build_step(benchmark, config)
  template = initial_state(benchmark, config, step)
  checkpoints = RunCheckpoints(workdir)
  if which == "best":
    return checkpoints.restore_best(template)
  restored = checkpoints.restore(template)
  if restored is None:
    raise FileNotFoundError(f"No usable checkpoint in {workdir}.")
  return restored[0]


@contextlib.contextmanager
def replaced_file(path: str, mode: str = "w", **open_kwargs):
  """A new file beside `path`, renamed over `path` when the block ends without an error.

  A crash or Ctrl-C never leaves half a file, and a symlink planted at `path` is replaced,
  not followed (the temporary file is created exclusively, so one planted at its name is
  never opened either).
  """
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                             prefix=os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, mode, **open_kwargs) as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    if os.path.lexists(tmp):
      os.unlink(tmp)
    raise


def write_json(path: str, data: dict):
  """Writes `data` to `path` (see `replaced_file`)."""
  with replaced_file(path) as f:
    json.dump(data, f, indent=1, default=float, allow_nan=True)


class _Recorder:
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
      record["skip_cause"] = (1 * metrics["nonfinite_losses"] + 2 * metrics["nonfinite_update"]
                              + 3 * metrics["nonfinite_state"])
    self.pending.append(record)

  def flush(self):
    for record in jax.device_get(self.pending):
      for key, value in record.items():
        self.host[key].append(np.asarray(value, np.float64))
    self.pending = []

  def arrays(self) -> dict:
    self.flush()
    shapes = dict(losses=(0, self.k), weights=(0, self.k), grad_norm=(0,),
                  eigenvalues=(0, self.k), skip_cause=(0,))
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
    return History(steps=np.arange(1, taken + 1, dtype=np.float64), losses=a["losses"],
                   weights=a["weights"], grad_norm=a["grad_norm"],
                   eigen_steps=np.asarray(eigen_steps, np.float64), eigenvalues=eigenvalues,
                   eigen_source=source, skip_cause=a["skip_cause"])


class _StopOnSigint:
  """While entered (in the main thread), a first SIGINT (Ctrl-C) only asks the loop to stop
  at the next step boundary, where the loop checkpoints a consistent state; a second one
  interrupts at once."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def _handle(self, signum, frame):
    if self.requested:
      raise KeyboardInterrupt
    self.requested = True

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGINT, self._handle)
    return self

  def __exit__(self, *unused):
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)
      self._previous = None


def _format(values) -> str:
  return "/".join(f"{v:.3g}" for v in values)


def _progress_bar(total: int, initial: int, description: str, enabled: bool):
  if not enabled:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, desc=description, unit="step", leave=False,
              dynamic_ncols=True)


def _resume(checkpoints: RunCheckpoints, config: Config, run: dict, recorder: "_Recorder",
            state: TrainState, resume: bool, overwrite: bool) -> dict:
  """The run state to start from (with its "state"), after checking what the workdir holds."""
  workdir = checkpoints.workdir
  wanted = fingerprint(config)
  run = dict(run, fingerprint=wanted, finished=False)
  if not checkpoints.steps():
    return dict(run, state=state)
  restored = checkpoints.restore(state)
  if restored is None:
    if not overwrite:
      raise RunMismatchError(f"{workdir} holds checkpoints but none restores; pass "
                             "overwrite=True (--overwrite) to start the run over.")
    checkpoints.clear()
    return dict(run, state=state)
  saved_state, saved_run, history = restored
  same = saved_run["fingerprint"] == wanted
  if overwrite:
    if saved_run.get("finished"):
      raise RunMismatchError(f"{workdir} holds a finished run; refusing to overwrite it: "
                             "delete it or choose another directory.")
    checkpoints.clear()
    return dict(run, state=state)
  if not same:
    differ = sorted(k for k in wanted if saved_run["fingerprint"].get(k) != wanted[k])
    raise RunMismatchError(f"{workdir} holds another run (different {', '.join(differ)}); "
                           "choose another directory, or pass overwrite=True (--overwrite) to "
                           "discard it.")
  if not resume:
    raise RunMismatchError(f"{workdir} holds a run of this config; pass resume=True "
                           "(--resume) to continue it or overwrite=True (--overwrite) to "
                           "start over.")
  recorder.load(history)
  print(f"Resuming {config.benchmark}/{config.method} at epoch {saved_run['epoch']}, batch "
        f"{saved_run['batch']} (step {int(saved_state.step)}).")
  return dict(saved_run, state=saved_state)


def fit(benchmark: "Benchmark", config: Config, workdir: str | None = None, *, method=None,
        optimizer: optax.GradientTransformation | None = None, progress: bool = True,
        description: str | None = None,
        callback: Callable[[int, TrainState, dict], None] | None = None,
        resume: bool = True, overwrite: bool = False) -> RunResult:
  """Trains `config.method` on `benchmark` and returns the run's record.

  Ctrl-C (SIGINT, or a KeyboardInterrupt) during training stops the run cleanly: the result
  has `interrupted=True`, the history of the steps taken, and metrics of the best model so far
  (or of the current one, scored then). With a `workdir`, a SIGINT stops at the next step
  boundary and checkpoints there, so nothing trained is lost. A run with a `workdir` checkpoints at every epoch end,
  where `max_steps` stops it and every `config.checkpoint_every` steps
  (`checkpoints.RunCheckpoints`); started again, it resumes from the newest usable
  checkpoint and ends with the parameters an uninterrupted run ends with.

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
    RunMismatchError: `workdir` holds a run of another config (without `overwrite`), a run
      of this one (with neither `resume` nor `overwrite`), or a finished run to overwrite.
  """
  started = time.perf_counter()
  steps_per_epoch = len(benchmark.train) // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"The training split has {len(benchmark.train)} examples, fewer than the "
                     f"batch size {config.batch_size}; lower the batch size.")
  num_epochs, total_steps = config.run_length(steps_per_epoch)
  given_method = method is not None
  step, method = build_step(benchmark, config, method=method, optimizer=optimizer)
  state = initial_state(benchmark, config, step)
  name, _, eigenvalues_in_step = method_traits(method)
  if not given_method:
    name = config.method_key
  hparams = config.method_hyperparameters()
  stl_task = hparams.get("task", 0) if name == "stl" else None
  probe = (_jitted("probe", benchmark.functions)
           if config.probe_every and not eigenvalues_in_step else None)
  recorder = _Recorder(benchmark.num_tasks)
  run = dict(epoch=0, batch=0, best_score=-math.inf, best_epoch=None, val_metrics=None,
             metrics=None, plateau_scale=1.0, plateau_best=-math.inf, plateau_wait=0,
             evaluations=[], step_times=[])
  checkpoints = RunCheckpoints(workdir) if workdir else None
  if workdir:
    run = _resume(checkpoints, config, run, recorder, state, resume, overwrite)
    state = run.pop("state")

  bar = _progress_bar(total_steps, int(state.step), description or f"{name} seed {config.seed}",
                      progress)
  say = print if bar is None else bar.write

  def checkpoint():
    if workdir:
      run["finished"] = taken >= total_steps
      checkpoints.save(state, run, recorder.arrays())

  def score_and_select(epoch):
    if benchmark.val is None:
      return
    val = evaluate(benchmark, state.params, state.model_state, benchmark.val,
                   config.eval_batch_size)
    score = benchmark.selection_score(val, task=stl_task)
    entry = dict(epoch=epoch, step=int(state.step), val=val, score=score)
    if score > run["best_score"]:
      test = val if benchmark.test is None else evaluate(
          benchmark, state.params, state.model_state, benchmark.test, config.eval_batch_size)
      run.update(best_score=score, best_epoch=epoch, val_metrics=val, metrics=test)
      entry["test"] = test
      if workdir:
        checkpoints.save_best(state)
    if config.lr_schedule == "plateau":
      if score > run["plateau_best"]:
        run.update(plateau_best=score, plateau_wait=0)
      else:
        run["plateau_wait"] += 1
        if run["plateau_wait"] > config.plateau_patience:
          run.update(plateau_scale=run["plateau_scale"] * config.plateau_factor, plateau_wait=0)
    run["evaluations"].append(entry)
    say(f"[{config.benchmark}/{name}] epoch {epoch} step {int(state.step)} val score "
        f"{score:.4f} " + " ".join(f"{n}={v:.4g}" for n, v in val.items()))

  interrupted = False
  taken = int(state.step)  # counted on the host: reading state.step would wait for the step
  sigint = _StopOnSigint()
  try:
    sigint.__enter__()
    for epoch in range(run["epoch"], num_epochs):
      if taken >= total_steps and run["batch"] == 0:
        break  # stopped exactly at an epoch's end, which was already scored
      state = set_learning_rate_factor(state, learning_rate_factor(
          config, epoch, num_epochs, run["plateau_scale"]))
      first_step = taken - run["batch"]
      stopped = taken >= total_steps  # resumed where `max_steps` stopped an earlier run
      batches = () if stopped else epoch_batches(benchmark.train, config.batch_size,
                                                 seed=config.seed, epoch=epoch,
                                                 skip=run["batch"])
      for batch in batches:
        if sigint.requested:  # between steps: state, history and position agree
          raise KeyboardInterrupt
        if probe is not None and (taken == 0 or (taken + 1) % config.probe_every == 0):
          recorder.probe_steps.append(taken + 1)
          recorder.probe_values.append(np.asarray(probe(state.params, state.model_state,
                                                        batch), np.float64))
        start = time.perf_counter()
        state, out = step(state, batch)
        taken += 1
        recorder.add(out)
        run["batch"] = taken - first_step
        if callback is not None:
          callback(taken, state, out)
        if taken % config.log_every == 0 or taken == total_steps or len(run["step_times"]) < 3:
          recorder.flush()  # waits for the step
          run["step_times"].append(time.perf_counter() - start)
          if bar is not None:
            bar.update(taken - bar.n)
            bar.set_postfix_str(f"loss {_format(recorder.host['losses'][-1])} | "
                                f"w {_format(recorder.host['weights'][-1])}", refresh=False)
        if taken >= total_steps:
          stopped = run["batch"] < steps_per_epoch
          break
        if config.checkpoint_every and taken % config.checkpoint_every == 0 and \
            run["batch"] < steps_per_epoch:
          checkpoint()
      if stopped:
        score_and_select(epoch)
        checkpoint()
        break
      run.update(epoch=epoch + 1, batch=0)
      score_and_select(epoch)
      checkpoint()
  except KeyboardInterrupt:
    interrupted = True
    if sigint.requested and workdir:
      checkpoint()
      say(f"Interrupted at step {taken}: saved a checkpoint in {workdir}; run again with it "
          "to resume.")
  finally:
    sigint.__exit__()
    if bar is not None:
      bar.close()
  if run["metrics"] is None and taken > 0:
    # No validation split, or interrupted before its first pass: score the current model.
    test = benchmark.test if benchmark.test is not None else benchmark.val
    run["metrics"] = evaluate(benchmark, state.params, state.model_state, test,
                              config.eval_batch_size)
  times = run["step_times"][2:] or run["step_times"]
  result = RunResult(
      method=name, seed=config.seed, hparams=hparams, metrics=run["metrics"] or {},
      wall_time=time.perf_counter() - started, steps=int(state.step),
      skipped=int(state.skipped), interrupted=interrupted,
      history=recorder.history(eigenvalues_in_step), val_metrics=run["val_metrics"],
      best_epoch=run["best_epoch"], evaluations=run["evaluations"],
      step_time_s=float(np.median(times)) if times else None, params=state.params,
      model_state=state.model_state)
  if workdir:
    write_json(os.path.join(workdir, "results.json"), result.to_dict())
  return result
