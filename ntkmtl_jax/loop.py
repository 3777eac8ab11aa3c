"""The training loop: `fit` one multi-task method on a model and data, record its history.

    result = fit(functions, "ntkmtl", train_data=batches, steps=500,
                 optimizer=OptimizerConfig("adam", 1e-3), evaluate=evaluate)
    result.metrics        # {"left acc": 0.93, ...}
    result.history.losses # (steps, k) task losses, one row per step

`functions` are a model's pure functions in the `models.multitask.TaskFunctions` shape
(`loss_fn(params, model_state, batch) -> ((k,), model_state)`, `encode`, `decode`,
`shared`, `init(key, batch)`); the benchmark scripts and the `ntkmtl` command all call
`fit`. The jitted step of a (model, method, hyper-parameters, optimiser) combination is
built once and reused by later calls (other seeds), so only the first run compiles.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntkmtl_jax import kernel, methods
from ntkmtl_jax.methods.ntkmtl import clip_shared_by_global_norm
from ntkmtl_jax.weighting import Method, is_method
from ntkmtl_jax.models.multitask import TaskFunctions
from ntkmtl_jax.train import TrainStep, make_train_step

PyTree = Any


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The optimiser applied after the multi-task aggregation.

  Attributes:
    name: "adam", "adamw" or "sgd".
    learning_rate: the (constant) learning rate.
    max_grad_norm: if set, the global norm of the shared parameters' aggregated update is
      clipped to it before the optimiser (the official trainers use 1.0 for gradient
      methods).
    weight_decay: decoupled weight decay for "adamw".
    schedule: "constant", or "cosine" (decay to 0 over the run's steps, as the paper's
      CelebA runs; it lets final metrics reflect what was learned rather than the noise
      floor of a constant step size).
  """
  name: str = "adam"
  learning_rate: float = 1e-3
  max_grad_norm: float | None = None
  weight_decay: float = 0.0
  schedule: str = "constant"

  def build(self, shared=None, steps: int | None = None) -> optax.GradientTransformation:
    """The optax transformation, with the shared-gradient clipping first when asked."""
    if self.schedule == "constant":
      lr = self.learning_rate
    elif self.schedule == "cosine":
      if not steps:
        raise ValueError("The cosine schedule needs the number of steps.")
      lr = optax.cosine_decay_schedule(self.learning_rate, steps)
    else:
      raise ValueError(f"Unknown schedule {self.schedule!r}: 'constant' or 'cosine'.")
    makers = {"adam": lambda: optax.adam(lr),
              "adamw": lambda: optax.adamw(lr, weight_decay=self.weight_decay),
              "sgd": lambda: optax.sgd(lr)}
    if self.name not in makers:
      raise ValueError(f"Unknown optimizer {self.name!r}: choose one of {sorted(makers)}.")
    if self.max_grad_norm is None:
      return makers[self.name]()
    return optax.chain(clip_shared_by_global_norm(self.max_grad_norm, shared),
                       makers[self.name]())


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
  """
  steps: np.ndarray
  losses: np.ndarray
  weights: np.ndarray
  grad_norm: np.ndarray
  eigen_steps: np.ndarray
  eigenvalues: np.ndarray
  eigen_source: str = ""

  def to_dict(self) -> dict:
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in out.items()}

  @classmethod
  def from_dict(cls, d: dict) -> "History":
    return cls(**{f.name: (np.asarray(d[f.name], np.float64) if f.name != "eigen_source"
                           else d[f.name]) for f in dataclasses.fields(cls)})


@dataclasses.dataclass
class RunResult:
  """The record of one run.

  Attributes:
    method: the method's registry name.
    seed: the seed (parameter init and batch order).
    hparams: the hyper-parameters given to the method (published defaults otherwise).
    metrics: the evaluation metrics at the end ({} without `evaluate`).
    wall_time: seconds for the run, compilation and evaluation included.
    steps: the number of steps taken.
    skipped: steps skipped because a loss or update was not finite.
    interrupted: whether the run was stopped (Ctrl-C) before `steps`.
    history: the `History`.
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
  params: PyTree = None
  model_state: PyTree = None

  def to_dict(self, with_history: bool = True) -> dict:
    out = dict(method=self.method, seed=self.seed, hparams=_jsonable(self.hparams),
               metrics=self.metrics, wall_time=self.wall_time, steps=self.steps,
               skipped=self.skipped, interrupted=self.interrupted)
    if with_history:
      out["history"] = self.history.to_dict()
    return out

  @classmethod
  def from_dict(cls, d: dict) -> "RunResult":
    return cls(method=d["method"], seed=d["seed"], hparams=d["hparams"], metrics=d["metrics"],
               wall_time=d["wall_time"], steps=d["steps"], skipped=d["skipped"],
               interrupted=d["interrupted"], history=History.from_dict(d["history"]))


def _jsonable(value):
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (bool, int, float, str)) or value is None:
    return value
  return repr(value)


_STEPS: dict[tuple, TrainStep] = {}
_PROBES: dict[TaskFunctions, Callable] = {}


def _freeze(hparams: dict) -> tuple:
  return tuple(sorted((k, repr(v)) for k, v in hparams.items()))


def build_step(functions: TaskFunctions, method: str | Method, num_tasks: int, *,
               optimizer: OptimizerConfig = OptimizerConfig(), hparams: dict | None = None,
               strategy: str = "auto", steps: int | None = None) -> TrainStep:
  """The jitted train step of `method` on `functions` (built once per combination).

  Args:
    functions: the model's pure functions (`TaskFunctions`).
    method: a registry name (`ntkmtl_jax.methods.names()`) or a `Weighting`/`GradientRule`.
    num_tasks: k.
    optimizer: the `OptimizerConfig`.
    hparams: keyword hyper-parameters for the method's factory (e.g. {"task": 1} for STL).
    strategy: how task backward passes run (see `make_train_step`).
    steps: the run's length (for learning-rate schedules).

  Returns:
    A `TrainStep`.
  """
  hparams = dict(hparams or {})
  if is_method(method):
    aggregator, cache_key = method, None
  else:
    cache_key = (functions, method, num_tasks, _freeze(hparams), optimizer, strategy,
                 steps if optimizer.schedule != "constant" else None)
    if cache_key in _STEPS:
      return _STEPS[cache_key]
    aggregator = methods.get(method, num_tasks, shared=functions.shared, **hparams)
  step = make_train_step(functions.loss_fn, aggregator,
                         optimizer.build(functions.shared, steps),
                         strategy=strategy, has_state=True, encode=functions.encode,
                         decode=functions.decode)
  if cache_key is not None:
    _STEPS[cache_key] = step
  return step


def _probe(functions: TaskFunctions) -> Callable:
  """Jitted (params, model_state, batch) -> (k,) squared shared task-gradient norms."""
  if functions not in _PROBES:

    def probe(params, model_state, batch):
      losses = lambda p, b: functions.loss_fn(p, model_state, b)[0]
      return kernel.ntk_weights(losses, params, batch, num_chunks=1, shared=functions.shared,
                                strategy="unroll").eigenvalues

    _PROBES[functions] = jax.jit(probe)
  return _PROBES[functions]


def _format(values) -> str:
  return "/".join(f"{v:.3g}" for v in values)


def fit(functions: TaskFunctions, method: str | Method, *,
        train_data: Iterator[PyTree], steps: int,
        optimizer: OptimizerConfig = OptimizerConfig(), hparams: dict | None = None,
        seed: int = 0, evaluate: Callable[[PyTree, PyTree], dict] | None = None,
        probe_every: int = 0, strategy: str = "auto", progress: bool = True,
        description: str | None = None, log_every: int = 10,
        callback: Callable[[int, Any, dict], None] | None = None) -> RunResult:
  """Trains a multi-task model with one method and returns the run's record.

  Ctrl-C (KeyboardInterrupt) during training stops the run cleanly: the result has
  `interrupted=True`, the history of the steps taken, and metrics evaluated at that point.

  Args:
    functions: the model's pure functions (`TaskFunctions`, `has_state=True` conventions).
    method: a registry name or a `Weighting`/`GradientRule`.
    train_data: an iterator of training batches (at least `steps` of them).
    steps: number of train steps.
    optimizer: the `OptimizerConfig`.
    hparams: hyper-parameters of the method (e.g. {"task": i} for "stl").
    seed: seeds the parameter initialisation (`functions.init`).
    evaluate: `evaluate(params, model_state) -> {metric: value}`, run once at the end.
    probe_every: for methods whose step does not produce shared-parameter eigenvalues,
      compute lambda_i = ||g_i||^2 every `probe_every` steps outside the step (0: never).
    strategy: how task backward passes run (see `make_train_step`).
    progress: show a tqdm progress bar (step, task losses, task weights).
    description: the progress bar's label (default: the method's name and seed).
    log_every: steps between progress-bar refreshes (and host transfers of metrics).
    callback: called as `callback(t, state, metrics)` after step t (1-based), e.g. a
      `spectra.SpectrumTracker`; it runs on the host, so keep it cheap or sparse.

  Returns:
    A `RunResult`.
  """
  if steps < 1:
    raise ValueError(f"steps must be positive, got {steps}.")
  hparams = dict(hparams or {})
  name = method.name if is_method(method) else method.lower().replace("-", "_")
  start = time.perf_counter()
  first = next(train_data)
  params, model_state = functions.init(jax.random.key(seed), first)
  losses_shape = jax.eval_shape(functions.loss_fn, params, model_state, first)[0]
  num_tasks = losses_shape.shape[0]
  step = build_step(functions, method, num_tasks, optimizer=optimizer, hparams=hparams,
                    strategy=strategy, steps=steps)
  needs = step.needs.kind
  eigen_in_step = needs in ("sq_norms", "kernel") and step.method.name.startswith("ntkmtl")
  probe = _probe(functions) if (probe_every and not eigen_in_step) else None
  state = step.init(params, model_state, key=jax.random.key(seed + 1))

  records, host, probes = [], [], []
  interrupted = False
  bar = _progress_bar(steps, description or f"{name} seed {seed}", progress)
  batch = first
  try:
    for t in range(1, steps + 1):
      if t > 1:
        batch = next(train_data)
      if probe is not None and (t == 1 or t % probe_every == 0):
        probes.append((t, probe(state.params, state.model_state, batch)))
      state, metrics = step(state, batch)
      if callback is not None:
        callback(t, state, metrics)
      records.append({k: metrics[k] for k in ("losses", "weights", "grad_norm", "eigenvalues")
                      if k in metrics})
      if t % log_every == 0 or t == steps:
        host.extend(jax.device_get(records))
        records = []
        if bar is not None:
          bar.update(t - bar.n)
          bar.set_postfix_str(f"loss {_format(host[-1]['losses'])} | "
                              f"w {_format(host[-1]['weights'])}", refresh=False)
  except KeyboardInterrupt:
    interrupted = True
  finally:
    if bar is not None:
      bar.close()
  host.extend(jax.device_get(records))
  taken = len(host)
  metrics = evaluate(state.params, state.model_state) if (evaluate and taken) else {}
  wall = time.perf_counter() - start

  k = num_tasks
  stack = lambda key, shape: (np.stack([np.asarray(h[key], np.float64) for h in host])
                              if host and key in host[0] else np.zeros(shape))
  if eigen_in_step:
    eigen_steps, eigenvalues, source = np.arange(1, taken + 1), stack("eigenvalues", (0, k)), "step"
  elif probes:
    eigen_steps = np.asarray([t for t, _ in probes if t <= taken] or [], np.float64)
    eigenvalues = np.asarray([np.asarray(v) for t, v in probes if t <= taken], np.float64
                             ).reshape(-1, k)
    source = "probe"
  else:
    eigen_steps, eigenvalues, source = np.zeros(0), np.zeros((0, k)), ""
  history = History(steps=np.arange(1, taken + 1, dtype=np.float64),
                    losses=stack("losses", (0, k)), weights=stack("weights", (0, k)),
                    grad_norm=stack("grad_norm", (0,)),
                    eigen_steps=np.asarray(eigen_steps, np.float64), eigenvalues=eigenvalues,
                    eigen_source=source)
  return RunResult(method=name, seed=seed, hparams=hparams, metrics=metrics, wall_time=wall,
                   steps=taken, skipped=int(state.skipped), interrupted=interrupted,
                   history=history, params=state.params, model_state=state.model_state)


def _progress_bar(total: int, description: str, enabled: bool):
  if not enabled:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, desc=description, unit="step", leave=False, dynamic_ncols=True)
