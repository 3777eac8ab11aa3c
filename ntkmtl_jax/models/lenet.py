"""The MultiMNIST network of the multi-objective MTL literature: a LeNet encoder, two heads.

Shared encoder: 5x5 conv (10) -> 2x2 max-pool -> ReLU -> 5x5 conv (20) -> 2x2 max-pool ->
ReLU -> Dense(50) -> ReLU on a 28x28 image; z is the 50-unit feature. Each digit (left,
right) has its own head, Dense(50) -> ReLU -> Dense(10).

References:
  Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import optax

from ntkmtl_jax.models.multitask import TaskFunctions, task_functions


class LeNetEncoder(nn.Module):
  """The shared LeNet-style encoder; returns z, (B, features)."""

  features: int = 50

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train  # no dropout or normalisation
    x = nn.Conv(10, (5, 5), padding="VALID")(x)
    x = nn.relu(nn.max_pool(x, (2, 2), strides=(2, 2)))
    x = nn.Conv(20, (5, 5), padding="VALID")(x)
    x = nn.relu(nn.max_pool(x, (2, 2), strides=(2, 2)))
    return nn.relu(nn.Dense(self.features)(x.reshape(x.shape[0], -1)))


class DigitHeads(nn.Module):
  """One Dense(hidden) -> ReLU -> Dense(classes) head per task; returns (B, k, classes)."""

  num_tasks: int = 2
  hidden: int = 50
  num_classes: int = 10

  @nn.compact
  def __call__(self, z):
    outs = [
      nn.Dense(self.num_classes, name=f"task{t}_out")(
        nn.relu(nn.Dense(self.hidden, name=f"task{t}_hidden")(z))
      )
      for t in range(self.num_tasks)
    ]
    return jnp.stack(outs, axis=1)


def digit_losses(logits, batch):
  """Cross-entropy of each digit: logits (B, k, 10), batch["labels"] (B, k) int."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]), axis=0)


def lenet_functions(num_tasks: int = 2) -> TaskFunctions:
  """The pure functions of the MultiMNIST LeNet (batch: `image` (B, 28, 28, 1), `labels`)."""
  return task_functions(LeNetEncoder(), DigitHeads(num_tasks), digit_losses, input_key="image")
