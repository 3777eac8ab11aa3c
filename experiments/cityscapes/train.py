"""Cityscapes training and evaluation: mIoU, pixel accuracy, abs/rel depth error;
SegNet-MTAN; any method."""

from __future__ import annotations

from experiments import common, mtan_data
from experiments.cityscapes import input_pipeline
from ntkmtl_jax.models.mtan import FILTERS, mtan_functions

TASK_NAMES = input_pipeline.TASKS


def create_pipeline(config: common.Config) -> common.Pipeline:
  train, test = input_pipeline.load_splits(config)
  functions = mtan_functions(input_pipeline.NUM_CLASSES, TASK_NAMES,
                             tuple(config.model.get("filters", FILTERS)))
  return common.Pipeline(functions, TASK_NAMES, train, test, None,
                         lambda: mtan_data.DenseMetrics(TASK_NAMES, input_pipeline.NUM_CLASSES))


def train_and_evaluate(config: common.Config, workdir: str | None) -> dict:
  """Trains `config.method` on Cityscapes; returns `common.fit`'s results."""
  return common.fit(config, create_pipeline(config), workdir)
