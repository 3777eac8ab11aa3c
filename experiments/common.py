"""What the benchmark folders share: the run config, data splits and batching, tfds access with
one clear message when a dataset is missing, the epoch loop with orbax checkpoints of the
best validation model and resume, and the results table.

Each `experiments/<benchmark>/` folder holds the benchmark's data (`input_pipeline.py`), its
metrics and `Pipeline` (`train.py`), configs and a `main.py`; this module is the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntkmtl_jax import methods, metrics as metrics_lib
from ntkmtl_jax.methods.ntkmtl import clip_shared_by_global_norm, official_ntkmtl
from ntkmtl_jax.models.multitask import TaskFunctions
from ntkmtl_jax.train import TrainState, make_train_step

PyTree = Any


# ----------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass
class Config:
  """Hyper-parameters and settings of one benchmark run (see each `configs/default.py`).

  Attributes:
    benchmark: the benchmark's name.
    method: a name from `ntkmtl_jax.methods.names()` ("ntkmtl" is the official step:
      NTKMTL scaled by k, shared gradient clipped to `max_grad_norm`, plain head gradients).
    method_hparams: per method, the published hyper-parameters used on this benchmark.
    hparams: hyper-parameters given on the command line (override `method_hparams`).
    learning_rate, batch_size, num_epochs: Adam's learning rate, batch, epochs.
    lr_schedule: "constant", "cosine" (per epoch, to 0 at the end), "step" (times
      `lr_gamma` every `lr_step_size` epochs) or "plateau" (times `plateau_factor` when the
      validation score has not improved for `plateau_patience` epochs, not below
      `plateau_min_lr`).
    max_grad_norm: global-norm clip of the shared update for gradient-based methods
      (None: no clipping). Loss-weighting methods are not clipped, as the official code.
    eval_batch_size: batch of the evaluation passes.
    max_steps: stop after this many train steps (None: run all epochs).
    strategy: how task backward passes run (`make_train_step`'s `strategy`).
    seed: seeds the parameters and the order of the batches.
    data_dir: where the data lives (tfds data_dir or the MTAN `.npy` root).
    data: benchmark-specific data options (image size, split sizes, ...).
    model: benchmark-specific model options (widths, ...).
    metric_names, higher_is_better, metric_tasks: the reported metrics, their direction and
      the task each one measures.
    stl_row: the paper's single-task (STL) metrics in `metric_names` order: the baseline of
      Delta m % (None where the paper has no STL row: then Delta m needs an STL run).
    paper_rows: published rows of other methods (for reference in reports and tests).
    log_every: print the losses every this many steps.
  """
  benchmark: str = ""
  method: str = "ls"
  method_hparams: dict = dataclasses.field(default_factory=dict)
  hparams: dict = dataclasses.field(default_factory=dict)
  learning_rate: float = 1e-3
  batch_size: int = 32
  num_epochs: int = 1
  lr_schedule: str = "constant"
  lr_step_size: int = 100
  lr_gamma: float = 0.5
  plateau_factor: float = 0.7
  plateau_patience: int = 10
  plateau_min_lr: float = 1e-5
  max_grad_norm: float | None = 1.0
  eval_batch_size: int = 64
  max_steps: int | None = None
  strategy: str = "auto"
  seed: int = 0
  data_dir: str | None = None
  data: dict = dataclasses.field(default_factory=dict)
  model: dict = dataclasses.field(default_factory=dict)
  metric_names: tuple = ()
  higher_is_better: tuple = ()
  metric_tasks: tuple = ()
  stl_row: tuple | None = None
  paper_rows: dict = dataclasses.field(default_factory=dict)
  log_every: int = 50

  def replace(self, **changes) -> "Config":
    return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------
# Data


class DatasetMissingError(FileNotFoundError):
  """A benchmark's data is not where the run looks for it; the message says what to do."""


def missing_dataset(what: str, where: str, how: str, flag: str = "--data-dir") -> \
    DatasetMissingError:
  return DatasetMissingError(
      f"{what} was not found in {where}.\n  To get it: {how}\n  Then point the run at it with "
      f"{flag} DIR (nothing is downloaded automatically).")


def open_tfds(name: str, split: str, data_dir: str | None, how: str):
  """`tfds.data_source(name, split=...)` without downloading, or a `DatasetMissingError`.

  Reads the prepared array_record files (TensorFlow is not needed).
  """
  import tensorflow_datasets as tfds  # imported here: only the tfds benchmarks need it
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as error:  # tfds raises several types for a missing or unprepared dataset
    text = str(error)
    if isinstance(error, (FileNotFoundError, AssertionError)) or "not found" in text.lower() \
        or "DatasetNotFound" in type(error).__name__ or "array_record" in text:
      where = data_dir or "the default tfds data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
      raise missing_dataset(f"The tfds dataset {name!r} (split {split!r}, array_record "
                            f"format)", where, how) from error
    raise


def read_examples(source, keys: Sequence[str], indices=None, chunk: int = 1024) -> dict:
  """Reads `keys` of the examples of a tfds data source into stacked NumPy arrays."""
  indices = np.arange(len(source)) if indices is None else np.asarray(indices)
  columns = {k: [] for k in keys}
  for start in range(0, len(indices), chunk):
    part = [int(i) for i in indices[start:start + chunk]]
    try:
      examples = source.__getitems__(part)
    except (AttributeError, TypeError):  # tfds' mocked sources only index one at a time
      examples = [source[i] for i in part]
    for example in examples:
      for k in keys:
        columns[k].append(np.asarray(example[k]))
  return {k: np.stack(v) if v else np.zeros((0,)) for k, v in columns.items()}


class Split:
  """A data split addressed by example index: `len(split)` and `split.take(indices, rng)`.

  Args:
    size: number of examples.
    take: `take(indices (m,), rng or None) -> batch dict of NumPy arrays` (rng is given for
      training batches, so a split may apply random augmentation).
  """

  def __init__(self, size: int, take: Callable[[np.ndarray, Any], dict]):
    self.size = int(size)
    self._take = take

  def __len__(self):
    return self.size

  def take(self, indices, rng=None) -> dict:
    return self._take(np.asarray(indices, np.int64), rng)

  @classmethod
  def from_arrays(cls, arrays: dict, transform: Callable[[dict, Any], dict] | None = None):
    """A split over in-memory arrays of equal length; `transform(batch, rng)` post-processes."""
    sizes = {len(v) for v in arrays.values()}
    if len(sizes) != 1:
      raise ValueError(f"Split.from_arrays: arrays of different lengths {sizes}.")

    def take(indices, rng):
      batch = {k: v[indices] for k, v in arrays.items()}
      return transform(batch, rng) if transform is not None else batch

    return cls(sizes.pop(), take)


def epoch_batches(split: Split, batch_size: int, *, seed: int | None, epoch: int = 0,
                  skip: int = 0) -> Iterator[dict]:
  """Batches of one pass over `split`.

  With a `seed`: a permutation drawn from (seed, epoch), full batches only (fixed shapes for
  the jitted step), random augmentation allowed; `skip` drops the first batches (resume).
  Without: the split in order, the last batch possibly smaller.
  """
  n = len(split)
  if seed is None:
    for start in range(0, n, batch_size):
      yield split.take(np.arange(start, min(start + batch_size, n)))
    return
  if n < batch_size:
    raise ValueError(f"The training split has {n} examples, fewer than the batch size "
                     f"{batch_size}.")
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(n)
  for b in range(skip, n // batch_size):
    yield split.take(order[b * batch_size:(b + 1) * batch_size], rng)


def endless_batches(split: Split, batch_size: int, seed: int) -> Iterator[dict]:
  """Training batches epoch after epoch (for step-based loops)."""
  epoch = 0
  while True:
    yield from epoch_batches(split, batch_size, seed=seed, epoch=epoch)
    epoch += 1


# ----------------------------------------------------------------------------------------
# A benchmark's pieces


@dataclasses.dataclass
class Pipeline:
  """A benchmark ready to train: model functions, splits and how to score them.

  Attributes:
    functions: the model's `TaskFunctions` (has_state conventions).
    task_names: the k tasks.
    train, val: splits; `test` is None when the benchmark has no separate test split (the
      MTAN layout's `val` is the test set).
    new_accumulator: `() -> accumulator` with `update(outputs, batch)` and `result() ->
      {metric_name: value}` (host-side, NumPy).
  """
  functions: TaskFunctions
  task_names: tuple
  train: Split
  val: Split
  test: Split | None
  new_accumulator: Callable[[], Any]


def evaluate(pipeline: Pipeline, predict, params, model_state, split: Split,
             batch_size: int) -> dict:
  """Runs `predict` over `split` and returns the accumulated metrics."""
  acc = pipeline.new_accumulator()
  for batch in epoch_batches(split, batch_size, seed=None):
    outputs = predict(params, model_state, batch)
    acc.update(jax.tree.map(np.asarray, outputs), batch)
  return acc.result()


def delta_m_of(config: Config, values: dict, baseline: Sequence[float] | None = None,
               task: int | None = None) -> float | None:
  """Delta m % of `values` against `baseline` (default: the config's STL row), optionally on
  the metrics of one task only; None without a baseline."""
  baseline = config.stl_row if baseline is None else baseline
  if baseline is None:
    return None
  idx = [i for i in range(len(config.metric_names))
         if task is None or config.metric_tasks[i] == task]
  return metrics_lib.delta_m([values[config.metric_names[i]] for i in idx],
                             [baseline[i] for i in idx],
                             [config.higher_is_better[i] for i in idx])


def selection_score(config: Config, values: dict, task: int | None = None) -> float:
  """Model-selection score on validation metrics (higher is better): -Delta m % against the
  STL row when there is one (the official QM9 rule), otherwise the mean of the metrics
  oriented so that higher is better (mean F1 on CelebA, mean accuracy on MultiMNIST).
  `task` restricts it to one task's metrics (single-task runs)."""
  if config.stl_row is not None:
    return -delta_m_of(config, values, task=task)
  idx = [i for i in range(len(config.metric_names))
         if task is None or config.metric_tasks[i] == task]
  return float(np.mean([values[config.metric_names[i]] * (1 if config.higher_is_better[i]
                                                          else -1) for i in idx]))


# ----------------------------------------------------------------------------------------
# Method and optimiser


def method_name(name: str) -> str:
  return name.lower().replace("-", "_")


def method_hyperparameters(config: Config) -> dict:
  name = method_name(config.method)
  return {**config.method_hparams.get(name, {}), **config.hparams}


def build_method(config: Config, num_tasks: int, shared):
  """The method (`Weighting`/`GradientRule`) and the optimiser chain (clip, Adam with an injectable
  learning rate) for `config`."""
  name = method_name(config.method)
  hp = method_hyperparameters(config)
  max_norm = config.max_grad_norm if config.max_grad_norm is not None else math.inf
  if name == "ntkmtl" and set(hp) <= {"exponent"}:
    aggregator, clip = official_ntkmtl(num_tasks, shared, max_norm=max_norm, **hp)
  else:
    aggregator = methods.get(name, num_tasks, shared=shared, **hp)
    gradient_method = aggregator.needs.task_gradients
    clip = (clip_shared_by_global_norm(max_norm, shared)
            if gradient_method and config.max_grad_norm is not None else optax.identity())
  adam = optax.inject_hyperparams(optax.adam)(learning_rate=config.learning_rate)
  return aggregator, optax.chain(clip, adam)


def set_learning_rate(optimizer_state, learning_rate: float):
  """The chain state of `build_method`'s optimiser with Adam's learning rate replaced."""
  clip_state, adam_state = optimizer_state
  hyper = dict(adam_state.hyperparams)
  hyper["learning_rate"] = jnp.asarray(learning_rate, hyper["learning_rate"].dtype)
  return (clip_state, adam_state._replace(hyperparams=hyper))


def epoch_learning_rate(config: Config, epoch: int, plateau_scale: float) -> float:
  lr = config.learning_rate
  if config.lr_schedule == "cosine":
    return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / max(config.num_epochs, 1)))
  if config.lr_schedule == "step":
    return lr * config.lr_gamma ** (epoch // config.lr_step_size)
  if config.lr_schedule == "plateau":
    return max(lr * plateau_scale, config.plateau_min_lr)
  if config.lr_schedule == "constant":
    return lr
  raise ValueError(f"Unknown lr_schedule {config.lr_schedule!r}: use constant, cosine, step or "
                   "plateau.")


# ----------------------------------------------------------------------------------------
# Checkpoints


def _state_tree(state: TrainState) -> dict:
  leaves = jax.tree.leaves(state._replace(key=jax.random.key_data(state.key)))
  return {f"{i:05d}": leaf for i, leaf in enumerate(leaves)}


def _state_from_tree(template: TrainState, tree: dict) -> TrainState:
  plain = template._replace(key=jax.random.key_data(template.key))
  treedef = jax.tree.structure(plain)
  restored = jax.tree.unflatten(treedef, [tree[k] for k in sorted(tree)])
  return restored._replace(key=jax.random.wrap_key_data(restored.key))


def save_state(directory: str, state: TrainState):
  import orbax.checkpoint as ocp
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(directory), _state_tree(state), force=True)
  checkpointer.wait_until_finished()


def restore_state(directory: str, template: TrainState) -> TrainState:
  """Restores a `save_state` checkpoint into the structure of `template`."""
  import orbax.checkpoint as ocp
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_tree(template))
  tree = ocp.StandardCheckpointer().restore(os.path.abspath(directory), target)
  return _state_from_tree(template, tree)


def _write_json(path: str, data: dict):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1, default=float)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------------------
# The loop


@functools.lru_cache(maxsize=16)
def _jitted(fn):
  """One `jax.jit` per function, so runs that share a `Pipeline` share its compilations."""
  return jax.jit(fn)


def initial_state(config: Config, pipeline: Pipeline):
  """The jitted train step of `config.method` and its initial `TrainState`."""
  functions = pipeline.functions
  sample = pipeline.train.take(np.arange(min(config.batch_size, len(pipeline.train))))
  key = jax.random.key(config.seed)
  # Parameters are drawn with the "rbg" generator, in one jitted call: on XLA:CPU,
  # initialising a network of a hundred layers with threefry keys, op by op, spends tens of
  # seconds compiling random-number code.
  params, model_state = _jitted(functions.init)(jax.random.key(config.seed, impl="rbg"),
                                                sample)
  aggregator, optimizer = build_method(config, len(pipeline.task_names), functions.shared)
  step = make_train_step(functions.loss_fn, aggregator, optimizer, strategy=config.strategy,
                         has_state=True, encode=functions.encode, decode=functions.decode)
  return step, step.init(params, model_state, key=jax.random.fold_in(key, 2))


def restore_checkpoint(config: Config, pipeline: Pipeline, workdir: str,
                       which: str = "best") -> TrainState:
  """The `TrainState` saved by `fit` under `workdir/which` ("best" or "latest")."""
  _, template = initial_state(config, pipeline)
  return restore_state(os.path.join(workdir, which), template)


def fit(config: Config, pipeline: Pipeline, workdir: str | None) -> dict:
  """Trains `config.method` on the pipeline, epoch by epoch, and returns the results.

  After each epoch (and when `max_steps` stops the run) the model is scored on the
  validation split; the best one (by `selection_score`) is scored on the test split and
  saved under `workdir/best`. `workdir/latest` and `workdir/run_state.json` are written at
  the same points, and a run started again with the same `workdir` resumes where it
  stopped (same batches, same learning-rate schedule). Results go to
  `workdir/results.json`.

  Returns:
    A dict with `metrics` (test metrics of the best validation model), `val_metrics`,
    `delta_m` (against the STL row, or None), `best_epoch`, `steps`, `skipped`,
    `last_losses` (the task losses of the last step), `step_time_s` (median wall time of
    a train step after the first two), `wall_time` and `history`.
  """
  started = time.perf_counter()
  functions = pipeline.functions
  name = method_name(config.method)
  stl_task = method_hyperparameters(config).get("task", 0) if name == "stl" else None
  step, state = initial_state(config, pipeline)
  predict = _jitted(functions.predict)

  steps_per_epoch = len(pipeline.train) // config.batch_size
  run = dict(epoch=0, batch=0, best_score=-math.inf, best_epoch=None, val_metrics=None,
             metrics=None, plateau_scale=1.0, plateau_best=-math.inf, plateau_wait=0,
             history=[], step_times=[])
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    run_path = os.path.join(workdir, "run_state.json")
    if os.path.exists(run_path) and os.path.isdir(os.path.join(workdir, "latest")):
      with open(run_path) as f:
        run.update(json.load(f))
      state = restore_state(os.path.join(workdir, "latest"), state)
      print(f"Resuming {config.benchmark}/{config.method} at epoch {run['epoch']}, batch "
            f"{run['batch']} (step {int(state.step)}).")

  def checkpoint():
    if workdir:
      save_state(os.path.join(workdir, "latest"), state)
      _write_json(os.path.join(workdir, "run_state.json"), run)

  def score_and_select(epoch):
    val = evaluate(pipeline, predict, state.params, state.model_state, pipeline.val,
                   config.eval_batch_size)
    score = selection_score(config, val, task=stl_task)
    entry = dict(epoch=epoch, step=int(state.step), val=val, score=score)
    if score > run["best_score"]:
      test = val if pipeline.test is None else evaluate(
          pipeline, predict, state.params, state.model_state, pipeline.test,
          config.eval_batch_size)
      run.update(best_score=score, best_epoch=epoch, val_metrics=val, metrics=test)
      entry["test"] = test
      if workdir:
        save_state(os.path.join(workdir, "best"), state)
    if config.lr_schedule == "plateau":
      if score > run["plateau_best"]:
        run.update(plateau_best=score, plateau_wait=0)
      else:
        run["plateau_wait"] += 1
        if run["plateau_wait"] > config.plateau_patience:
          run.update(plateau_scale=run["plateau_scale"] * config.plateau_factor, plateau_wait=0)
    run["history"].append(entry)
    print(f"[{config.benchmark}/{config.method}] epoch {epoch} step {int(state.step)} "
          f"val score {score:.4f} " + " ".join(f"{n}={v:.4g}" for n, v in val.items()))

  stopped = False
  for epoch in range(run["epoch"], config.num_epochs):
    if config.max_steps is not None and int(state.step) >= config.max_steps and \
        run["batch"] == 0 and run["history"]:
      break  # stopped exactly at an epoch's end, which was already scored
    lr = epoch_learning_rate(config, epoch, run["plateau_scale"])
    state = state._replace(optimizer_state=set_learning_rate(state.optimizer_state, lr))
    for b, batch in enumerate(epoch_batches(pipeline.train, config.batch_size,
                                            seed=config.seed, epoch=epoch, skip=run["batch"]),
                              start=run["batch"]):
      if config.max_steps is not None and int(state.step) >= config.max_steps:
        stopped = True
        run["batch"] = b
        break
      start = time.perf_counter()
      state, out = step(state, batch)
      losses = np.asarray(out["losses"])  # waits for the step
      run["step_times"].append(time.perf_counter() - start)
      run["last_losses"] = losses.tolist()
      if int(state.step) % config.log_every == 0:
        print(f"  step {int(state.step)} losses {np.array2string(losses, precision=4)} "
              f"weights {np.array2string(np.asarray(out['weights']), precision=3)}")
    if stopped:
      score_and_select(epoch)
      checkpoint()
      break
    run.update(epoch=epoch + 1, batch=0)
    score_and_select(epoch)
    checkpoint()
  if run["metrics"] is None:  # e.g. max_steps=0 or a finished run restarted
    score_and_select(run["epoch"])
    checkpoint()

  times = run["step_times"][2:] or run["step_times"]
  results = dict(benchmark=config.benchmark, method=config.method, seed=config.seed,
                 hparams=method_hyperparameters(config), metrics=run["metrics"],
                 val_metrics=run["val_metrics"], best_epoch=run["best_epoch"],
                 delta_m=delta_m_of(config, run["metrics"]), steps=int(state.step),
                 skipped=int(state.skipped), last_losses=run.get("last_losses"),
                 steps_per_epoch=steps_per_epoch,
                 step_time_s=float(np.median(times)) if times else None,
                 wall_time=time.perf_counter() - started, history=run["history"])
  if workdir:
    _write_json(os.path.join(workdir, "results.json"), results)
  return results


# ----------------------------------------------------------------------------------------
# Reports


def _row(values, deltas, walls, seeds) -> dict:
  values = np.asarray(values, np.float64)
  sd = lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
  return dict(metrics_mean=values.mean(axis=0).tolist(),
              metrics_std=[sd(values[:, j]) for j in range(values.shape[1])],
              delta_m_mean=None if deltas is None else float(np.mean(deltas)),
              delta_m_std=None if deltas is None else sd(deltas),
              delta_m_per_seed=None if deltas is None else [float(d) for d in deltas],
              wall_time_mean=float(np.mean(walls)) if walls else float("nan"),
              wall_time_std=sd(walls) if walls else 0.0, seeds=[int(x) for x in seeds])


def summarize(config: Config, results: Sequence[dict],
              stl_row: Sequence[float] | None = None) -> dict:
  """The `ntkmtl` command's summary (`ntkmtl_jax.report` rows) of `fit` results.

  Delta m % is taken against `stl_row` (default: the config's, the paper's STL row); where
  there is none, against the mean over seeds of the STL runs among `results` (run i trained
  on task i). The "stl" row shows that baseline. MR ranks the multi-task methods.
  """
  names = list(config.metric_names)
  stl_runs: dict[int, dict[int, dict]] = {}
  by_method: dict[str, dict[int, dict]] = {}
  for r in results:
    if method_name(r["method"]) == "stl":
      stl_runs.setdefault(r["seed"], {})[int(r.get("hparams", {}).get("task", 0))] = r
    else:
      by_method.setdefault(method_name(r["method"]), {})[r["seed"]] = r
  complete = {seed: [runs[t]["metrics"][n] for n, t in zip(names, config.metric_tasks)]
              for seed, runs in sorted(stl_runs.items())
              if all(t in runs for t in config.metric_tasks)}
  baseline = stl_row if stl_row is not None else config.stl_row
  rows = {}
  if baseline is None and complete:
    baseline = np.mean(list(complete.values()), axis=0)
  if complete:
    values = np.asarray(list(complete.values()))
    rows["stl"] = _row(values, [metrics_lib.delta_m(v, baseline, config.higher_is_better)
                                for v in values],
                       [sum(r.get("wall_time", 0.0) for r in stl_runs[s].values())
                        for s in complete], list(complete))
  elif baseline is not None:  # the paper's row
    rows["stl"] = _row(np.asarray([baseline]), [0.0], [], [])
  for label, by_seed in by_method.items():
    seeds = sorted(by_seed)
    values = np.asarray([[by_seed[s]["metrics"][n] for n in names] for s in seeds])
    deltas = ([metrics_lib.delta_m(v, baseline, config.higher_is_better) for v in values]
              if baseline is not None else None)
    rows[label] = _row(values, deltas, [by_seed[s].get("wall_time", float("nan"))
                                        for s in seeds], seeds)
  multi = {k: r["metrics_mean"] for k, r in rows.items() if k != "stl"}
  ranks = metrics_lib.mean_rank(multi, config.higher_is_better) if multi else {}
  for k, r in rows.items():
    r["mean_rank"] = ranks.get(k)
  return rows


def results_table(config: Config, results: Sequence[dict],
                  stl_row: Sequence[float] | None = None) -> str:
  """The table the `ntkmtl` command prints (`ntkmtl_jax.report.format_table`) for `results`."""
  from ntkmtl_jax import report
  source = "paper's STL row" if (stl_row is not None or config.stl_row is not None) else \
      "STL runs"
  return report.format_table(summarize(config, results, stl_row), config.metric_names,
                             config.higher_is_better,
                             title=f"{config.benchmark}: Delta m % against the {source}")


def write_reports(directory: str, config: Config, results: Sequence[dict]) -> list[str]:
  """results.json (every run) and results.csv (`ntkmtl_jax.report.write_csv`) in `directory`."""
  from ntkmtl_jax import report
  os.makedirs(directory, exist_ok=True)
  summary = summarize(config, results)
  paths = [os.path.join(directory, "results.json"), os.path.join(directory, "results.csv")]
  _write_json(paths[0], dict(config=dataclasses.asdict(config), summary=summary,
                             runs=list(results)))
  report.write_csv(paths[1], summary, config.metric_names)
  return paths


# ----------------------------------------------------------------------------------------
# Command line


def parse_flags(benchmark: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog=f"python -m experiments.{benchmark}.main",
                                   description=f"Train a multi-task method on {benchmark}.")
  parser.add_argument("--config", default="default", choices=("default", "tiny"),
                      help="default: the paper's hyper-parameters; tiny: a smoke run.")
  parser.add_argument("--method", default=None, help="a name from ntkmtl_jax.methods.names()")
  parser.add_argument("--hp", action="append", default=[], metavar="NAME=VALUE",
                      help="a method hyper-parameter (repeatable), e.g. --hp exponent=0.75")
  parser.add_argument("--data-dir", default=None, help="where the dataset lives")
  parser.add_argument("--workdir", default=None,
                      help="checkpoints and results.json; rerun with it to resume")
  parser.add_argument("--max-steps", type=int, default=None)
  parser.add_argument("--epochs", type=int, default=None)
  parser.add_argument("--batch-size", type=int, default=None)
  parser.add_argument("--learning-rate", type=float, default=None)
  parser.add_argument("--seed", type=int, default=None)
  parser.add_argument("--strategy", default=None,
                      help="task backward passes: auto, unroll, vmap, chunked, streaming")
  parser.add_argument("--methods", default=None,
                      help="comma-separated methods to compare (\"stl\" runs one per task); "
                      "overrides --method")
  parser.add_argument("--seeds", default=None, help="comma-separated seeds (with --methods)")
  return parser.parse_args(argv)


def _parse_value(text: str):
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def config_from_flags(flags: argparse.Namespace, get_config: Callable[[str], Config]) -> Config:
  config = get_config(flags.config)
  changes = {}
  for flag, field in (("method", "method"), ("data_dir", "data_dir"),
                      ("max_steps", "max_steps"), ("epochs", "num_epochs"),
                      ("batch_size", "batch_size"), ("learning_rate", "learning_rate"),
                      ("seed", "seed"), ("strategy", "strategy")):
    value = getattr(flags, flag)
    if value is not None:
      changes[field] = value
  hp = {}
  for item in flags.hp:
    if "=" not in item:
      raise ValueError(f"--hp takes NAME=VALUE, got {item!r}.")
    key, value = item.split("=", 1)
    hp[key] = _parse_value(value)
  if hp:
    changes["hparams"] = hp
  return config.replace(**changes)


def main(benchmark: str, get_config: Callable[[str], Config],
         create_pipeline: Callable[[Config], Pipeline], argv: Sequence[str] | None = None):
  """The command line of every benchmark folder: one run, or a comparison (`--methods`,
  `--seeds`) printed as the `ntkmtl` command's table and written to `--workdir`.

  Returns the list of results (one per run).
  """
  flags = parse_flags(benchmark, argv)
  config = config_from_flags(flags, get_config)
  try:
    pipeline = create_pipeline(config)
  except DatasetMissingError as error:
    raise SystemExit(str(error)) from None
  names = flags.methods.split(",") if flags.methods else [config.method]
  seeds = [int(x) for x in flags.seeds.split(",")] if flags.seeds else [config.seed]
  runs = []
  for seed in seeds:
    for name in names:
      tasks = range(len(pipeline.task_names)) if method_name(name) == "stl" else [None]
      for task in tasks:
        hp = dict(config.hparams, **({} if task is None else {"task": task}))
        run_config = config.replace(method=name, seed=seed, hparams=hp)
        label = name if task is None else f"{name}-task{task}"
        workdir = (os.path.join(flags.workdir, f"{label}-seed{seed}")
                   if flags.workdir and (len(names) > 1 or len(seeds) > 1) else flags.workdir)
        runs.append(fit(run_config, pipeline, workdir))
  print(results_table(config, runs))
  if flags.workdir:
    write_reports(flags.workdir, config, runs)
  return runs
