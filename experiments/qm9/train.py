"""QM9 training and evaluation: MAE per target in the paper's units; model selection on the
validation Delta m % (the official rule)."""

from __future__ import annotations

import numpy as np

from experiments import common
from experiments.qm9 import input_pipeline
from ntkmtl_jax.models.qm9 import qm9_functions

TASK_NAMES = input_pipeline.TARGET_NAMES


class MAE:
  """Accumulates |prediction - target| per target, de-standardised to paper units."""

  def __init__(self, std: np.ndarray):
    self.std = np.asarray(std, np.float64)
    self.sums = np.zeros(len(TASK_NAMES))
    self.count = 0

  def update(self, predictions, batch):
    self.sums += np.abs(np.asarray(predictions, np.float64) - batch["y"]).sum(0) * self.std
    self.count += len(batch["y"])

  def result(self) -> dict:
    return {f"{t} MAE": float(s / self.count) for t, s in zip(TASK_NAMES, self.sums)}


def create_pipeline(config: common.Config) -> common.Pipeline:
  train, val, test, standardize = input_pipeline.load_splits(config)
  return common.Pipeline(qm9_functions(len(TASK_NAMES), int(config.model.get("dim", 64))),
                         TASK_NAMES, train, val, test, lambda: MAE(standardize.std))


def train_and_evaluate(config: common.Config, workdir: str | None) -> dict:
  """Trains `config.method` on QM9; returns `common.fit`'s results."""
  return common.fit(config, create_pipeline(config), workdir)
