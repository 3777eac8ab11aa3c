"""A registry of multi-task benchmarks with one small interface that the CLI and loop use.

    bench = ntkmtl_jax.benchmarks.get_benchmark("multidigits")
    bench.task_names          # ("left", "right", "number")
    bench.metric_names        # ("left acc", "right acc", "number MAE")
    bench.higher_is_better    # (True, True, False)
    result = ntkmtl_jax.loop.fit(bench.functions, "ntkmtl", train_data=bench.train_data(0, 128),
                                 steps=300, evaluate=bench.evaluate)

A benchmark is a `Benchmark` record (see its docstring). To add one, register a factory
that builds it, with keyword options that have defaults:

    @register_benchmark("qm9")
    def qm9(data_dir="~/tensorflow_datasets", **options) -> Benchmark: ...

or, so that importing this module stays cheap, register an import path resolved on first
use: `register_benchmark("celeba", "experiments.celeba:benchmark")`. `ntkmtl train
--benchmark NAME` and `ntkmtl compare --benchmark NAME` dispatch through `get_benchmark`.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntkmtl_jax import metrics as metrics_lib
from ntkmtl_jax.data import offline
from ntkmtl_jax.models.mlp import MLPEncoder, TaskHeads
from ntkmtl_jax.models.multitask import TaskFunctions, task_functions

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """Everything needed to train and score methods on one multi-task problem.

  Attributes:
    name: registry name.
    description: one line for `ntkmtl list` and reports.
    task_names: the k tasks, in the order of the model's task losses.
    metric_names: the reported metrics (one or more per task), in table order.
    higher_is_better: per metric, whether larger is better (accuracy) or not (error).
    metric_tasks: per metric, the index of the task it measures; Delta m % takes that
      metric's baseline from the single-task (STL) run trained on this task.
    functions: the model's pure functions (`models.multitask.TaskFunctions`, with the
      `has_state=True` conventions: `loss_fn(params, model_state, batch)`).
    train_data: `train_data(seed, batch_size) -> iterator` of training batches (endless;
      every batch the same shape).
    evaluate: `evaluate(params, model_state) -> {metric_name: float}` on the held-out split.
    defaults: default run settings: `steps`, `batch_size`, `learning_rate`, and optionally
      `max_grad_norm`, `probe_every`, `methods` (the default `compare` list) and
      `hparams` ({method: {name: value}} overrides of published defaults).
  """
  name: str
  description: str
  task_names: tuple[str, ...]
  metric_names: tuple[str, ...]
  higher_is_better: tuple[bool, ...]
  metric_tasks: tuple[int, ...]
  functions: TaskFunctions
  train_data: Callable[[int, int], Iterator[PyTree]]
  evaluate: Callable[[PyTree, PyTree], dict[str, float]]
  defaults: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    m = len(self.metric_names)
    if not len(self.higher_is_better) == len(self.metric_tasks) == m:
      raise ValueError(f"Benchmark {self.name!r}: metric_names, higher_is_better and "
                       "metric_tasks must have one entry per metric.")
    if any(not 0 <= t < len(self.task_names) for t in self.metric_tasks):
      raise ValueError(f"Benchmark {self.name!r}: metric_tasks must index task_names.")

  @property
  def num_tasks(self) -> int:
    return len(self.task_names)


_REGISTRY: dict[str, Callable[..., Benchmark] | str] = {}


def register_benchmark(name: str, factory: Callable[..., Benchmark] | str | None = None):
  """Registers a benchmark factory (or a "module:attribute" path) under `name`.

  Usable as a decorator. The factory takes keyword options (all with defaults) and
  returns a `Benchmark`.
  """

  def do(f):
    if name in _REGISTRY and _REGISTRY[name] is not f:
      raise ValueError(f"A benchmark named {name!r} is already registered.")
    _REGISTRY[name] = f
    return f

  return do if factory is None else do(factory)


def benchmark_names() -> list[str]:
  """Registered benchmark names, sorted."""
  return sorted(_REGISTRY)


def get_benchmark(name: str, **options) -> Benchmark:
  """Builds the benchmark `name` with the given options (see each factory's docstring)."""
  key = name.lower().replace("-", "_")
  if key not in _REGISTRY:
    raise ValueError(f"Unknown benchmark {name!r}. Known benchmarks: "
                     f"{', '.join(benchmark_names())}.")
  factory = _REGISTRY[key]
  if isinstance(factory, str):
    module, _, attribute = factory.partition(":")
    factory = getattr(importlib.import_module(module), attribute)
  return factory(**options)


# The built-in offline benchmarks.


def _classification_loss(logits, labels):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _squared_error(predictions, targets):
  return jnp.mean((predictions - targets) ** 2)


def _offline_benchmark(name, description, dataset: offline.OfflineDataset, encoder,
                       defaults) -> Benchmark:
  names, kinds = dataset.task_names, dataset.task_kinds

  def task_losses(outputs, batch):
    return jnp.stack([
        _classification_loss(out, batch[n]) if kind == "classification" else
        _squared_error(out, batch[n]) for out, n, kind in zip(outputs, names, kinds)])

  functions = task_functions(encoder, TaskHeads(tuple(dataset.num_classes)), task_losses)
  predict = jax.jit(functions.predict)
  test = offline.eval_batches(dataset.test)

  def evaluate(params, model_state):
    outputs = [predict(params, model_state, b) for b in test]
    result = {}
    for i, (n, kind) in enumerate(zip(names, kinds)):
      pred = np.concatenate([np.asarray(o[i]) for o in outputs])
      target = dataset.test.targets[n]
      if kind == "classification":
        result[f"{n} acc"] = metrics_lib.accuracy(pred, target)
      else:
        result[f"{n} MAE"] = metrics_lib.mean_absolute_error(pred, target)
    return result

  metric_names = tuple(f"{n} acc" if k == "classification" else f"{n} MAE"
                       for n, k in zip(names, kinds))
  return Benchmark(
      name=name, description=description, task_names=names, metric_names=metric_names,
      higher_is_better=tuple(k == "classification" for k in kinds),
      metric_tasks=tuple(range(len(names))), functions=functions,
      train_data=lambda seed, batch_size: offline.batches(dataset.train, batch_size,
                                                          seed=seed),
      evaluate=evaluate, defaults=defaults)



@register_benchmark("multidigits")
def multidigits_benchmark(*, regression: str = "number", regression_scale: float = 1.0,
                          num_train: int = 10_000,
                          num_test: int = 2_000, data_seed: int = 0,
                          hidden: tuple[int, ...] = (128, 64)) -> Benchmark:
  """MultiDigits (offline): two sklearn digits; left, right and the number 10*left+right.

  See `ntkmtl_jax.data.offline.multidigits`. `regression_scale` sets the imbalance: at 1.0
  the number task's squared-error gradient norm is some 500x the digit tasks' at
  initialisation. Runs use Adam 1e-3 with the shared update's norm clipped to 1.0, as the
  official NTKMTL trainers do.
  """
  dataset = offline.multidigits(num_train, num_test, regression=regression,
                                regression_scale=regression_scale, data_seed=data_seed)
  return _offline_benchmark(
      "multidigits", "two sklearn digits side by side: left (cls), right (cls), "
      f"{regression} (reg)", dataset, MLPEncoder(tuple(hidden)),
      dict(steps=400, batch_size=128, learning_rate=1e-3, max_grad_norm=1.0, probe_every=20))


@register_benchmark("sines")
def sines_benchmark(*, num_tasks: int = 3, imbalance: float = 30.0, min_frequency: float = 0.5,
                    max_frequency: float = 1.5, input_dim: int = 2, noise: float = 0.0,
                    num_train: int = 8_192, num_test: int = 2_048, data_seed: int = 0,
                    hidden: tuple[int, ...] = (64, 64)) -> Benchmark:
  """Sines (generated): k sine regressions whose amplitude ratio is `imbalance`.

  See `ntkmtl_jax.data.offline.sines` for the knobs.
  """
  dataset = offline.sines(num_tasks, imbalance=imbalance, min_frequency=min_frequency,
                          max_frequency=max_frequency, input_dim=input_dim, noise=noise,
                          num_train=num_train, num_test=num_test, data_seed=data_seed)
  return _offline_benchmark(
      "sines", f"{num_tasks} generated sine regressions, amplitude ratio {imbalance:g}",
      dataset, MLPEncoder(tuple(hidden), activation="tanh"),
      dict(steps=600, batch_size=128, learning_rate=3e-3, probe_every=30))


# The paper's benchmarks live in experiments/ (their pipelines need tensorflow-datasets or
# local files); registered by path so that importing this module imports none of them.
for _name in ("celeba", "qm9", "nyuv2", "cityscapes", "multimnist"):
  register_benchmark(_name, f"experiments.registry:{_name}")
