"""CelebA training and evaluation: per-attribute F1 (%) at threshold 0.5; model selection on
the mean validation F1."""

from __future__ import annotations

import numpy as np

from experiments import common
from experiments.celeba import input_pipeline
from ntkmtl_jax import metrics
from ntkmtl_jax.models.celeba import celeba_functions


class F1:
  """Accumulates per-attribute TP/FP/FN of sigmoid(logit) >= 0.5 (i.e. logit >= 0)."""

  def __init__(self, attributes):
    self.attributes = attributes
    self.counts = np.zeros((3, len(attributes)), np.int64)

  def update(self, logits, batch):
    self.counts += np.stack(metrics.binary_counts(logits >= 0.0, batch["y"]))

  def result(self) -> dict:
    f1 = metrics.f1_from_counts(*self.counts) * 100.0
    return {f"{a} F1": float(v) for a, v in zip(self.attributes, f1)}


def create_pipeline(config: common.Config) -> common.Pipeline:
  train, val, test = input_pipeline.load_splits(config)
  attributes = input_pipeline.ATTRIBUTES[:len(config.metric_names)]
  return common.Pipeline(celeba_functions(len(attributes)), attributes, train, val, test,
                         lambda: F1(attributes))


def train_and_evaluate(config: common.Config, workdir: str | None) -> dict:
  """Trains `config.method` on CelebA; returns `common.fit`'s results."""
  return common.fit(config, create_pipeline(config), workdir)
