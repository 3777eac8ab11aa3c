"""Methods that weight the task losses, so one backward pass per step suffices."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ntkmtl_jax._tree import SharedSpec
from ntkmtl_jax.aggregator import TaskAggregator, TaskStats, weighted_aggregator
from ntkmtl_jax.methods import register


class WeightsState(NamedTuple):
  """State of stateless weightings: the step count and the last weights (diagnostics)."""
  count: jax.Array
  weights: jax.Array


def _weights_init(num_tasks):
  return lambda params: WeightsState(jnp.zeros([], jnp.int32), jnp.ones(num_tasks, jnp.float32))


def _fixed(weights):

  def weighting(stats: TaskStats, state: WeightsState):
    w = jnp.asarray(weights, stats.losses.dtype)
    if w.shape != stats.losses.shape:
      raise ValueError(f"Got {stats.losses.shape[0]} task losses for {w.shape[0]} weights.")
    return w, WeightsState(state.count + 1, w.astype(jnp.float32))

  return weighting


@register("ls")
def linear_scalarization(num_tasks: int, *, shared: SharedSpec = None) -> TaskAggregator:
  """LS: the plain sum of the task losses (all weights 1).

  Returns:
    A `TaskAggregator` with state `WeightsState`.
  """
  return weighted_aggregator("ls", "losses", _fixed(jnp.ones(num_tasks)),
                             _weights_init(num_tasks), shared=shared,
                             head_gradients="weighted")


@register("stl")
def single_task(num_tasks: int, *, task: int = 0, shared: SharedSpec = None) -> TaskAggregator:
  """STL: trains task `task` alone (weight 1, the others 0); the baseline of Delta m %.

  Returns:
    A `TaskAggregator` with state `WeightsState`.
  """
  if not 0 <= task < num_tasks:
    raise ValueError(f"task must be in [0, {num_tasks}), got {task}.")
  return weighted_aggregator("stl", "losses", _fixed(jnp.eye(num_tasks)[task]),
                             _weights_init(num_tasks), shared=shared,
                             head_gradients="weighted", task=task)
