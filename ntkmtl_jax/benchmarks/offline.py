"""The built-in offline benchmarks (no download): MultiDigits and Sines.

See `ntkmtl_jax.data.offline` for the data. Both train an MLP encoder with one head per
task; classification tasks are scored by accuracy, regressions by mean absolute error, on
the test split (no validation split: the final model is the result).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from ntkmtl_jax import metrics as metrics_lib
from ntkmtl_jax.benchmarks import Benchmark, Scoring
from ntkmtl_jax.data import offline
from ntkmtl_jax.data.splits import Split
from ntkmtl_jax.models.mlp import MLPEncoder, TaskHeads
from ntkmtl_jax.models.multitask import task_functions
from ntkmtl_jax.config import Config


class TaskScores:
  """Accumulates the head outputs of a split; accuracy or MAE per task at the end."""

  def __init__(self, task_names, task_kinds):
    self.task_names, self.task_kinds = task_names, task_kinds
    self.outputs, self.targets = [], []

  def update(self, outputs, batch):
    self.outputs.append([np.asarray(o) for o in outputs])
    self.targets.append([np.asarray(batch[n]) for n in self.task_names])

  def result(self) -> dict:
    out = {}
    for i, (name, kind) in enumerate(zip(self.task_names, self.task_kinds)):
      prediction = np.concatenate([o[i] for o in self.outputs])
      target = np.concatenate([t[i] for t in self.targets])
      if kind == "classification":
        out[f"{name} acc"] = metrics_lib.accuracy(prediction, target)
      else:
        out[f"{name} MAE"] = metrics_lib.mean_absolute_error(prediction, target)
    return out


def _offline_benchmark(name, description, dataset: offline.OfflineDataset, encoder,
                       config: Config) -> Benchmark:
  names, kinds = dataset.task_names, dataset.task_kinds

  def task_losses(outputs, batch):
    return jnp.stack([
        jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, batch[n]))
        if kind == "classification" else jnp.mean((out - batch[n]) ** 2)
        for out, n, kind in zip(outputs, names, kinds)])

  scoring = Scoring(
      metric_names=tuple(f"{n} acc" if k == "classification" else f"{n} MAE"
                         for n, k in zip(names, kinds)),
      higher_is_better=tuple(k == "classification" for k in kinds),
      metric_tasks=tuple(range(len(names))))
  return Benchmark(
      name=name, description=description, task_names=names, scoring=scoring,
      functions=task_functions(encoder, TaskHeads(tuple(dataset.num_classes)), task_losses),
      train=Split.from_arrays(dataset.train.as_batch()), val=None,
      test=Split.from_arrays(dataset.test.as_batch()),
      new_accumulator=lambda: TaskScores(names, kinds), config=config)


def multidigits_config(*, regression: str = "number", regression_scale: float = 1.0,
                       num_train: int = 10_000, num_test: int = 2_000, data_seed: int = 0,
                       hidden: tuple[int, ...] = (128, 64)) -> Config:
  """MultiDigits' default run: Adam 1e-3, batch 128, 400 steps, shared update clipped to 1;
  a run of seconds over 78-batch epochs checkpoints where it stops, not at every epoch end."""
  return Config(benchmark="multidigits",
                data=dict(regression=regression, regression_scale=regression_scale,
                          num_train=num_train, num_test=num_test, data_seed=data_seed),
                model=dict(hidden=tuple(hidden)), num_epochs=None, max_steps=400,
                batch_size=128, learning_rate=1e-3, max_grad_norm=1.0, probe_every=20,
                eval_batch_size=1024, log_every=10, checkpoint_min_interval=60.0)


def sines_config(*, num_tasks: int = 3, imbalance: float = 30.0, min_frequency: float = 0.5,
                 max_frequency: float = 1.5, input_dim: int = 2, noise: float = 0.0,
                 num_train: int = 8_192, num_test: int = 2_048, data_seed: int = 0,
                 hidden: tuple[int, ...] = (64, 64)) -> Config:
  """Sines' default run: Adam 3e-3, batch 128, 600 steps, no clipping."""
  return Config(benchmark="sines",
                data=dict(num_tasks=num_tasks, imbalance=imbalance,
                          min_frequency=min_frequency, max_frequency=max_frequency,
                          input_dim=input_dim, noise=noise, num_train=num_train,
                          num_test=num_test, data_seed=data_seed),
                model=dict(hidden=tuple(hidden)), num_epochs=None, max_steps=600,
                batch_size=128, learning_rate=3e-3, max_grad_norm=None, probe_every=30,
                eval_batch_size=1024, log_every=10)


def tiny(config: Config) -> Config:
  """A smoke run: 20 steps of batch 32."""
  return config.replace(max_steps=20, num_epochs=None, batch_size=32, probe_every=5,
                        log_every=5)


PRESETS = {"tiny": tiny}


def multidigits(*, regression: str = "number", regression_scale: float = 1.0,
                num_train: int = 10_000, num_test: int = 2_000, data_seed: int = 0,
                hidden: tuple[int, ...] = (128, 64)) -> Benchmark:
  """MultiDigits (offline): two sklearn digits; left, right and the number 10*left+right.

  See `ntkmtl_jax.data.offline.multidigits`. `regression_scale` sets the imbalance: at 1.0
  the number task's squared-error gradient norm is some 500x the digit tasks' at
  initialisation. Runs use Adam 1e-3 with the shared update's norm clipped to 1.0, as the
  official NTKMTL trainers do.
  """
  config = multidigits_config(regression=regression, regression_scale=regression_scale,
                              num_train=num_train, num_test=num_test, data_seed=data_seed,
                              hidden=hidden)
  dataset = offline.multidigits(num_train, num_test, regression=regression,
                                regression_scale=regression_scale, data_seed=data_seed)
  return _offline_benchmark(
      "multidigits", "two sklearn digits side by side: left (cls), right (cls), "
      f"{regression} (reg)", dataset, MLPEncoder(tuple(hidden)), config)


def sines(*, num_tasks: int = 3, imbalance: float = 30.0, min_frequency: float = 0.5,
          max_frequency: float = 1.5, input_dim: int = 2, noise: float = 0.0,
          num_train: int = 8_192, num_test: int = 2_048, data_seed: int = 0,
          hidden: tuple[int, ...] = (64, 64)) -> Benchmark:
  """Sines (generated): k sine regressions whose amplitude ratio is `imbalance`.

  See `ntkmtl_jax.data.offline.sines` for the knobs.
  """
  config = sines_config(num_tasks=num_tasks, imbalance=imbalance, min_frequency=min_frequency,
                        max_frequency=max_frequency, input_dim=input_dim, noise=noise,
                        num_train=num_train, num_test=num_test, data_seed=data_seed,
                        hidden=hidden)
  dataset = offline.sines(**config.data)
  return _offline_benchmark(
      "sines", f"{num_tasks} generated sine regressions, amplitude ratio {imbalance:g}",
      dataset, MLPEncoder(tuple(hidden), activation="tanh"), config)
