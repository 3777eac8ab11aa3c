"""A registry of multi-task benchmarks: model functions, data splits, metrics and defaults.

    bench = ntkmtl_jax.benchmarks.get_benchmark("multidigits")
    bench.task_names          # ("left", "right", "number")
    bench.metric_names        # ("left acc", "right acc", "number MAE")
    bench.config              # the benchmark's default run (a `Config`)
    result = ntkmtl_jax.loop.fit(bench, bench.config.replace(method="ntkmtl"))

    config = get_config("qm9", preset="tiny", data_dir="~/tensorflow_datasets")
    result = ntkmtl_jax.loop.fit(from_config(config), config)

A benchmark is a `Benchmark` record (see its docstring). Built in: the offline
`multidigits` and `sines` (no download), and the paper's `celeba`, `qm9`, `multimnist`
(tfds) and `nyuv2`, `cityscapes` (the MTAN `.npy` layout), whose factories take
`data_dir` and their data and model options. A benchmark's runs start from its default
`Config` (`default_config(**options)`, the published setting, under our protocol or with
`protocol="official"` the authors' trainers') and its presets (`"tiny"`: a smoke run of a
few steps), both known before any data is read. To add one, register a
factory that builds it, with keyword options that have defaults:

    @register_benchmark("mine", config=mine_config, presets={"tiny": shrink})
    def mine(data_dir=None, **options) -> Benchmark: ...

or, so that importing this module stays cheap, import paths resolved on first use:
`register_benchmark("mine", "my_package.mine:benchmark", config="my_package.mine:config")`.
`ntkmtl train --benchmark NAME --preset P` and `ntkmtl compare` dispatch through
`get_config` and `from_config`. MT10 (multi-task SAC on Meta-World) is a reinforcement-
learning benchmark with a loop of its own: `ntkmtl_jax.benchmarks.mt10`.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any
from collections.abc import Callable, Iterator, Sequence

import numpy as np

import jax

from ntkmtl_jax import metrics as metrics_lib
from ntkmtl_jax._names import canonical
from ntkmtl_jax.config import PROTOCOLS, Config
from ntkmtl_jax.data.splits import Split, endless_batches, epoch_batches
from ntkmtl_jax.models.multitask import TaskFunctions

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Scoring:
  """How a benchmark's metrics are read: direction, task, STL baseline, model selection.

  Attributes:
    metric_names: the reported metrics (one or more per task), in table order.
    higher_is_better: per metric, whether larger is better (accuracy) or not (error).
    metric_tasks: per metric, the index of the task it measures; Delta m % takes that
      metric's baseline from the single-task (STL) run trained on this task.
    stl_row: the paper's single-task metrics in `metric_names` order, the baseline of
      Delta m % (None where the paper has none: then Delta m needs STL runs).
  """
  metric_names: tuple[str, ...]
  higher_is_better: tuple[bool, ...]
  metric_tasks: tuple[int, ...]
  stl_row: tuple[float, ...] | None = None

  def __post_init__(self):
    if not len(self.higher_is_better) == len(self.metric_tasks) == len(self.metric_names):
      raise ValueError("Scoring: metric_names, higher_is_better and metric_tasks must have one "
                       "entry per metric.")

  def _indices(self, task: int | None) -> list[int]:
    return [i for i, t in enumerate(self.metric_tasks) if task is None or t == task]

  def delta_m(self, values: dict, baseline: Sequence[float] | None = None,
              task: int | None = None) -> float | None:
    """Delta m % of `values` ({metric: value}) against `baseline` (default: `stl_row`).

    Args:
      values: the metrics.
      baseline: the STL metrics in `metric_names` order.
      task: restrict to the metrics of this task.

    Returns:
      Delta m % (lower is better), or None without a baseline.
    """
    baseline = self.stl_row if baseline is None else baseline
    if baseline is None:
      return None
    idx = self._indices(task)
    return metrics_lib.delta_m([values[self.metric_names[i]] for i in idx],
                               [baseline[i] for i in idx],
                               [self.higher_is_better[i] for i in idx])

  def selection_score(self, values: dict, task: int | None = None) -> float:
    """Model-selection score of validation metrics (higher is better).

    -Delta m % against the STL row when there is one (the official QM9 rule), otherwise
    the mean of the metrics oriented so that higher is better (mean F1 on CelebA, mean
    accuracy on MultiMNIST). `task` restricts it to one task's metrics (STL runs).
    """
    if self.stl_row is not None:
      return -self.delta_m(values, task=task)
    return float(np.mean([values[self.metric_names[i]] * (1 if self.higher_is_better[i] else -1)
                          for i in self._indices(task)]))


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """Everything needed to train and score methods on one multi-task problem.

  Attributes:
    name: registry name.
    description: one line for `ntkmtl list` and reports.
    task_names: the k tasks, in the order of the model's task losses.
    scoring: the metrics and how they are read (`Scoring`).
    functions: the model's pure functions (`models.multitask.TaskFunctions`, with the
      `has_state=True` conventions: `loss_fn(params, model_state, batch)`).
    train: the training `Split`.
    val: the validation `Split` for model selection (None: the final model is the result).
    test: the test `Split` (None: `val` is the test set).
    new_accumulator: `() -> accumulator` with `update(outputs, batch)` (host NumPy
      outputs of `functions.predict`) and `result() -> {metric_name: value}`.
    config: the default run (a `Config`): the published setting of a paper benchmark
      under the protocol it was built with; the options the benchmark was built with are in
      its `data` and `model`.
    paper_rows: published rows of other methods (for reference in reports and tests).
  """
  name: str
  description: str
  task_names: tuple[str, ...]
  scoring: Scoring
  functions: TaskFunctions
  train: Split
  val: Split | None
  test: Split | None
  new_accumulator: Callable[[], Any]
  config: Config = dataclasses.field(default_factory=Config)
  paper_rows: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if any(not 0 <= t < len(self.task_names) for t in self.scoring.metric_tasks):
      raise ValueError(f"Benchmark {self.name!r}: metric_tasks must index task_names.")

  @property
  def num_tasks(self) -> int:
    return len(self.task_names)

  @property
  def metric_names(self) -> tuple[str, ...]:
    return self.scoring.metric_names

  @property
  def higher_is_better(self) -> tuple[bool, ...]:
    return self.scoring.higher_is_better

  @property
  def metric_tasks(self) -> tuple[int, ...]:
    return self.scoring.metric_tasks

  @property
  def stl_row(self) -> tuple[float, ...] | None:
    return self.scoring.stl_row

  def selection_score(self, values: dict, task: int | None = None) -> float:
    return self.scoring.selection_score(values, task)

  def delta_m(self, values: dict, task: int | None = None) -> float | None:
    return self.scoring.delta_m(values, task=task)

  def train_data(self, seed: int, batch_size: int) -> Iterator[dict]:
    """Endless training batches, epoch after epoch (the order `loop.fit` uses)."""
    return endless_batches(self.train, batch_size, seed)

  def evaluate(self, params, model_state, split: str | Split = "test",
               batch_size: int | None = None) -> dict:
    """The metrics of the model on a split, its batches in order.

    Args:
      params: the model's parameters.
      model_state: its state (batch statistics; {} for a stateless model).
      split: "test" (the test split, or the validation split where the layout has no test
        split), "val", or a `Split`.
      batch_size: the evaluation batch (default: `config.eval_batch_size`).
    """
    if isinstance(split, str):
      if split not in ("test", "val"):
        raise ValueError(f"split must be 'test', 'val' or a Split, got {split!r}.")
      name, split = split, self.val if split == "val" or self.test is None else self.test
      if split is None:
        raise ValueError(f"Benchmark {self.name!r} has no {name} split.")
    predict = _jitted_predict(self.functions)
    accumulator = self.new_accumulator()
    for batch in epoch_batches(split, batch_size or self.config.eval_batch_size, seed=None):
      accumulator.update(jax.tree.map(np.asarray, predict(params, model_state, batch)), batch)
    return accumulator.result()


_PREDICT: dict[TaskFunctions, Callable] = {}


def _jitted_predict(functions: TaskFunctions) -> Callable:
  """`functions.predict`, jitted once per model (later runs reuse the compilation)."""
  if functions not in _PREDICT:
    _PREDICT[functions] = jax.jit(functions.predict)
  return _PREDICT[functions]


Preset = Callable[[Config], Config]


def smoke_preset(batch_size: int, eval_batch_size: int, *, data: dict | None = None,
                 model: dict | None = None) -> Preset:
  """A preset for smoke runs: 3 steps of `batch_size` in one epoch, progress on every step,
  with the `data` and `model` options (smaller splits, images or widths) on top of the run's."""

  def preset(config: Config) -> Config:
    return config.replace(batch_size=batch_size, num_epochs=1, max_steps=3, log_every=1,
                          eval_batch_size=eval_batch_size,
                          data={**config.data, **(data or {})},
                          model={**config.model, **(model or {})})

  return preset


@dataclasses.dataclass(frozen=True)
class _Entry:
  factory: Callable[..., Benchmark] | str
  config: Callable[..., Config] | str | None
  presets: dict[str, Preset] | str
  protocols: tuple[str, ...] = ("ours",)


_REGISTRY: dict[str, _Entry] = {}


def register_benchmark(name: str, factory: Callable[..., Benchmark] | str | None = None, *,
                       config: Callable[..., Config] | str | None = None,
                       presets: dict[str, Preset] | str | None = None,
                       protocols: Sequence[str] = ("ours",)):
  """Registers a benchmark factory (or a "module:attribute" path) under `name`.

  Usable as a decorator. The factory takes keyword options (all with defaults) and
  returns a `Benchmark`.

  Args:
    name: the registry name.
    factory: `factory(data_dir=None, **options) -> Benchmark`, or its import path.
    config: `config(**options) -> Config`, the default run without reading any data (or its
      import path); None: the built benchmark's `config`.
    presets: named changes of the default run, `preset(config) -> config` (or the import
      path of such a dict); "default" is the default run itself.
    protocols: the protocols `config(protocol=...)` and the factory's `protocol` option
      know: "ours" always (called without the option), "official" where the benchmark
      reproduces its authors' scripts.
  """

  def do(f):
    entry = _Entry(f, config, presets or {}, tuple(protocols))
    if name in _REGISTRY and _REGISTRY[name] != entry:
      raise ValueError(f"A benchmark named {name!r} is already registered.")
    _REGISTRY[name] = entry
    return f

  return do if factory is None else do(factory)


def benchmark_names() -> list[str]:
  """Registered benchmark names, sorted."""
  return sorted(_REGISTRY)


def describe(name: str) -> str:
  """One line on benchmark `name`: its description, or its factory's docstring's first line."""
  factory = _resolve(_REGISTRY[name].factory)
  owner = getattr(factory, "__self__", None)  # a bound method: e.g. `MTANDataset.benchmark`
  if isinstance(getattr(owner, "description", None), str):
    return owner.description
  return (factory.__doc__ or "").strip().splitlines()[0]


def _resolve(target):
  if not isinstance(target, str):
    return target
  module, _, attribute = target.partition(":")
  return getattr(importlib.import_module(module), attribute)


def _entry(name: str) -> _Entry:
  key = canonical(name)
  if key not in _REGISTRY:
    raise ValueError(f"Unknown benchmark {name!r}. Known benchmarks: "
                     f"{', '.join(benchmark_names())}.")
  return _REGISTRY[key]


def get_benchmark(name: str, **options) -> Benchmark:
  """Builds the benchmark `name` with the given options (see each factory's docstring)."""
  return _resolve(_entry(name).factory)(**options)


def preset_names(name: str) -> list[str]:
  """The presets of benchmark `name`: "default" and the registered ones."""
  return ["default", *sorted(_resolve(_entry(name).presets))]


def get_config(name: str, preset: str = "default", *, data_dir: str | None = None,
               protocol: str = "ours", **options) -> Config:
  """The run that preset `preset` of benchmark `name` describes, without reading any data.

  Args:
    name: the benchmark.
    preset: "default" (the published run) or a registered preset (`preset_names`).
    data_dir: where the data lives.
    protocol: "ours" (the default: e.g. model selection on a validation split carved from the
      training data) or "official" (what the authors' scripts do, where a benchmark has them;
      experiments/README.md lists the choices and what remains different). A preset changes
      the size of a run, not its protocol.
    **options: data and model options: a name the preset's `model` has goes there, any other
      to `data` (an unknown one is refused when `from_config` builds the benchmark).
  """
  entry = _entry(name)
  presets = _resolve(entry.presets)
  if preset != "default" and preset not in presets:
    raise ValueError(f"Benchmark {name!r} has no preset {preset!r}; its presets: "
                     f"{', '.join(preset_names(name))}.")
  if protocol not in PROTOCOLS:
    raise ValueError(f"Unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}.")
  if protocol not in entry.protocols:
    raise ValueError(f"Benchmark {name!r} has no {protocol!r} protocol (it has "
                     f"{', '.join(entry.protocols)}): only the paper's benchmarks with the "
                     "authors' trainers (celeba, qm9, nyuv2, cityscapes) have an official one.")
  kwargs = {} if protocol == "ours" else {"protocol": protocol}
  config = (_resolve(entry.config)(**kwargs) if entry.config is not None
            else get_benchmark(name, **kwargs).config)
  if preset != "default":
    config = presets[preset](config)
  model = {k: v for k, v in options.items() if k in config.model}
  data = {k: v for k, v in options.items() if k not in model}
  config = config.replace(data={**config.data, **data}, model={**config.model, **model})
  return config if data_dir is None else config.replace(data_dir=data_dir)


def from_config(config: Config) -> Benchmark:
  """The benchmark a `Config` names, built with its `data_dir`, `data` and `model` options."""
  options = {**config.data, **config.model}
  if config.data_dir is not None:
    options["data_dir"] = config.data_dir
  if config.protocol != "ours":
    options["protocol"] = config.protocol
  return get_benchmark(config.benchmark, **options)


# Importing a benchmark module (its data pipeline and model) waits for the first use.
for _name in ("multidigits", "sines"):
  register_benchmark(_name, f"ntkmtl_jax.benchmarks.offline:{_name}",
                     config=f"ntkmtl_jax.benchmarks.offline:{_name}_config",
                     presets="ntkmtl_jax.benchmarks.offline:PRESETS")
for _name in ("celeba", "qm9", "nyuv2", "cityscapes", "multimnist"):
  register_benchmark(_name, f"ntkmtl_jax.benchmarks.{_name}:benchmark",
                     config=f"ntkmtl_jax.benchmarks.{_name}:default_config",
                     presets=f"ntkmtl_jax.benchmarks.{_name}:PRESETS",
                     protocols=("ours",) if _name == "multimnist" else ("ours", "official"))
