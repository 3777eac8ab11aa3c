"""MultiMNIST training and evaluation: per-digit accuracy (%), LeNet, any method."""

from __future__ import annotations

import numpy as np

from experiments import common
from experiments.multimnist import input_pipeline
from ntkmtl_jax.models.lenet import lenet_functions

TASK_NAMES = ("left", "right")


class Accuracy:
  """Accumulates per-digit accuracy over evaluation batches."""

  def __init__(self):
    self.correct = np.zeros(len(TASK_NAMES))
    self.count = 0

  def update(self, logits, batch):
    self.correct += np.sum(np.argmax(logits, axis=-1) == batch["labels"], axis=0)
    self.count += len(batch["labels"])

  def result(self) -> dict:
    return {f"{t} acc": float(c / self.count * 100.0) for t, c in zip(TASK_NAMES, self.correct)}


def create_pipeline(config: common.Config) -> common.Pipeline:
  train, val, test = input_pipeline.load_splits(config)
  return common.Pipeline(lenet_functions(len(TASK_NAMES)), TASK_NAMES, train, val, test,
                         Accuracy)


def train_and_evaluate(config: common.Config, workdir: str | None) -> dict:
  """Trains `config.method` on MultiMNIST; returns `common.fit`'s results."""
  return common.fit(config, create_pipeline(config), workdir)
