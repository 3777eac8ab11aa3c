"""Small flax models for the built-in offline benchmarks: an MLP encoder and task heads."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLPEncoder(nn.Module):
  """A shared multi-layer perceptron: Dense + activation per entry of `features`.

  Attributes:
    features: widths of the hidden layers; the last is the representation z.
    activation: "relu" or "tanh" (tanh suits smooth regression targets such as Sines).
  """

  features: Sequence[int] = (128, 64)
  activation: str = "relu"

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train  # No dropout or normalisation: the same function in training and evaluation.
    act = {"relu": nn.relu, "tanh": jnp.tanh}[self.activation]
    x = x.reshape(x.shape[0], -1)
    for width in self.features:
      x = act(nn.Dense(width)(x))
    return x


class TaskHeads(nn.Module):
  """One linear head per task; returns a list of outputs, (B, size) or (B,) when size is 1.

  Attributes:
    output_sizes: number of outputs of each task's head (classes, or 1 for regression).
  """

  output_sizes: Sequence[int]

  @nn.compact
  def __call__(self, z):
    outputs = []
    for i, size in enumerate(self.output_sizes):
      out = nn.Dense(size, name=f"task{i}")(z)
      outputs.append(out[:, 0] if size == 1 else out)
    return outputs
