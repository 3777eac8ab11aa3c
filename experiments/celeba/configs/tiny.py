"""A CelebA smoke run: 16x16 images, the first 4 attributes, a few batches of 8."""

from experiments.celeba.configs import default
from experiments.celeba.input_pipeline import ATTRIBUTES

NUM = 4


def get_config():
  return default.get_config().replace(
      batch_size=8, num_epochs=1, max_steps=3, eval_batch_size=16, log_every=1,
      data=dict(image_size=16, num_attributes=NUM),
      metric_names=tuple(f"{a} F1" for a in ATTRIBUTES[:NUM]), higher_is_better=(True,) * NUM,
      metric_tasks=tuple(range(NUM)))
