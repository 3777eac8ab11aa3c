"""Robust aggregation: the update ignores the task gradients that lie far from the others.

Krum and TrimmedMean come from Byzantine-tolerant distributed learning, where some of the
gradients may be adversarial; torchjd offers both as aggregators of a Jacobian. Krum picks
the gradient(s) with the smallest summed distance to their nearest neighbours, a choice
that reads only pairwise distances, ||g_i - g_j||^2 = G_ii + G_jj - 2 G_ij, so it is a
weighting of the Gram matrix (`Needs("gram")`, the "streaming" strategy applies).
TrimmedMean drops, coordinate by coordinate, the largest and smallest task values before
averaging: it needs the gradients themselves (a `GradientRule`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ntkmtl_jax._tree import SharedSpec
from ntkmtl_jax.methods import register
from ntkmtl_jax.methods._common import (check_num_tasks, conflicting_pairs, full_precision,
                                        gram_of, initial_state)
from ntkmtl_jax.method import GradientRule, Needs, TaskStats, Weighting

# Scores this close, relative to the largest, are ties: the Gram matrix of a permuted
# Jacobian may round differently, and a tie split one way or the other would make the
# choice depend on the order of the tasks.
_TIE_RTOL = 64.0


def _check_count(name: str, value, minimum: int) -> None:
  if isinstance(value, bool) or int(value) != value or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


# ---------------------------------------------------------------------------------- Krum


class KrumState(NamedTuple):
  """State of `krum`.

  Attributes:
    count: number of updates made.
    weights: the last weights: 1 / n_selected on the selected tasks (a tie at the last
      selected place shares its weight evenly), 0 elsewhere.
    conflicts: conflicting pairs (G_ij < 0, i < j) at the last step.
    scores: each task's Krum score at the last step (its summed distance to its nearest
      neighbours), relative to the largest score.
  """
  count: jax.Array
  weights: jax.Array
  conflicts: jax.Array
  scores: jax.Array


def krum_neighbours(num_tasks: int, n_byzantine: int) -> int:
  """How many nearest neighbours a Krum score sums: k - f - 2, at least 1 and at most
  k - 1 (torchjd refuses k < f + 3; there every other task counts, down to one)."""
  return max(min(num_tasks - n_byzantine - 2, num_tasks - 1), min(1, num_tasks - 1))


def select_lowest(scores: jax.Array, n_selected: int) -> jax.Array:
  """Weights 1 / n on the n lowest scores; scores tied at the n-th place share what is
  left of the total 1 evenly (so that the result does not depend on the tasks' order)."""
  k = scores.shape[0]
  n = min(n_selected, k)
  top = jnp.max(jnp.abs(scores))
  tol = _TIE_RTOL * jnp.finfo(scores.dtype).eps * top
  threshold = jnp.sort(scores)[n - 1]
  below = scores < threshold - tol
  tied = jnp.abs(scores - threshold) <= tol
  left = (n - jnp.sum(below)) / jnp.maximum(jnp.sum(tied), 1)
  return (jnp.where(below, 1.0, 0.0) + jnp.where(tied, left, 0.0)).astype(scores.dtype) / n


def krum_scores(gram: jax.Array, neighbours: int) -> jax.Array:
  """Per task, the sum of its distances to its `neighbours` nearest other tasks, read off
  the Gram matrix: ||g_i - g_j|| = sqrt(G_ii + G_jj - 2 G_ij)."""
  k = gram.shape[0]
  gram = 0.5 * (gram + gram.T)  # an exactly symmetric G gives exactly symmetric distances
  diag = jnp.diagonal(gram)
  distances = jnp.sqrt(jnp.maximum(diag[:, None] + diag[None, :] - 2.0 * gram, 0.0))
  others = jnp.where(jnp.eye(k, dtype=bool), jnp.inf, distances)
  return jnp.sum(jnp.sort(others, axis=1)[:, :neighbours], axis=1)


@register("krum", properties=("permutation_equivariant",))
def krum(num_tasks: int, *, n_byzantine: int = 0, n_selected: int = 1,
         shared: SharedSpec = None, head_gradients: str = "sum") -> Weighting:
  """Krum: the task gradient closest to its nearest neighbours (Multi-Krum: the mean of n).

  Each task's score is the sum of its distances ||g_i - g_j|| to its k - f - 2 nearest
  other tasks (f = `n_byzantine`, the number of gradients that may be adversarial); the
  update is the mean of the `n_selected` gradients of lowest score (Multi-Krum for n > 1).
  The distances are read off the Gram matrix, as torchjd's `KrumWeighting` does; in float32
  they carry the Gram matrix's rounding, ||g_i||^2 eps, so two gradients closer than
  sqrt(eps) ||g_i|| are not told apart.

  Where this differs from torchjd (which it follows) and the paper: torchjd requires k >=
  f + 3 and has no default f; here f defaults to 0 and with fewer tasks the score sums as
  many neighbours as there are, at least one, so every k works (k = 2: the mean, as the two
  distances are equal). Scores tied at the last selected place share its weight evenly
  (torchjd's `topk` picks by position), which keeps the update independent of the tasks'
  order: with f = 0 and k = 3, the two mutually nearest gradients tie and are averaged.

  Args:
    num_tasks: k.
    n_byzantine: f, the number of task gradients that may be outliers (>= 0).
    n_selected: how many gradients of lowest score are averaged (>= 1; 1 is Krum).
    shared: which parameters are shared.
    head_gradients: "sum" (task-specific parameters get their own gradients, as with
      torchjd's `mtl_backward`) or "weighted" (the heads of unselected tasks get none).

  Returns:
    A `Weighting` (needs "gram") with state `KrumState`.

  References:
    Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine
    Tolerant Gradient Descent", NeurIPS 2017; torchjd's `Krum` (torchjd/aggregation/_krum.py).
  """
  check_num_tasks(num_tasks)
  _check_count("n_byzantine", n_byzantine, 0)
  _check_count("n_selected", n_selected, 1)
  neighbours = krum_neighbours(num_tasks, int(n_byzantine))

  @full_precision
  def weighting(stats: TaskStats, state: KrumState):
    gram = gram_of(stats, "krum", num_tasks)
    scores = krum_scores(gram, neighbours)
    weights = select_lowest(scores, int(n_selected))
    relative = scores / jnp.maximum(jnp.max(scores), jnp.finfo(scores.dtype).tiny)
    return weights, KrumState(state.count + 1, weights.astype(jnp.float32),
                              conflicting_pairs(gram), relative.astype(jnp.float32))

  init = lambda params: initial_state(KrumState, num_tasks,
                                      weights=jnp.full(num_tasks, 1.0 / num_tasks, jnp.float32),
                                      scores=jnp.zeros(num_tasks, jnp.float32))
  return Weighting(name="krum", needs=Needs("gram"), init=init, weights=weighting,
                   shared=shared, head_gradients=head_gradients,
                   hparams=dict(n_byzantine=n_byzantine, n_selected=n_selected))


# --------------------------------------------------------------------------- TrimmedMean


class TrimmedMeanState(NamedTuple):
  """State of `trimmed_mean`.

  Attributes:
    count: number of updates made.
    weights: per task, the fraction of coordinates where its value was kept, divided by
      the number of values kept per coordinate (the weights sum to 1 unless values tie;
      they are the update's coefficients only where a task is kept everywhere or nowhere).
    conflicts: conflicting pairs (G_ij < 0, i < j) at the last step.
  """
  count: jax.Array
  weights: jax.Array
  conflicts: jax.Array


def trimmed_count(num_tasks: int, trim_number: int) -> int:
  """The values removed at each end of a coordinate: `trim_number`, at most (k - 1) // 2
  (torchjd refuses k < 2 t + 1; there as many as leave one value or two)."""
  return min(trim_number, (num_tasks - 1) // 2)


# Up to this many tasks the columns are sorted by a network of elementwise min/max.
_NETWORK_SORT_MAX_TASKS = 16


def sort_tasks(matrix: jax.Array) -> jax.Array:
  """Each column of `matrix` (k, P) sorted ascending. For k <= 16, by odd-even
  transposition (k rounds of elementwise min/max of neighbouring rows, which sort any k
  values): on XLA:CPU 150 times faster than `jnp.sort` along the short axis for k = 3 and
  15 times for k = 10 (P = 2e5); beyond, `jnp.sort`."""
  k = matrix.shape[0]
  if k > _NETWORK_SORT_MAX_TASKS:
    return jnp.sort(matrix, axis=0)
  rows = list(matrix)
  for step in range(k):
    for i in range(step % 2, k - 1, 2):
      rows[i], rows[i + 1] = jnp.minimum(rows[i], rows[i + 1]), jnp.maximum(rows[i], rows[i + 1])
  return jnp.stack(rows)


def trimmed_mean_direction(matrix: jax.Array, trim: int) -> tuple[jax.Array, jax.Array]:
  """Coordinate-wise trimmed mean of the rows of `matrix` (k, P): per column, the mean of
  the values left after removing the `trim` largest and `trim` smallest. Returns
  (direction (P,), kept (k, P) bool: the values between the kept extremes, so a value tied
  with a trimmed one counts as kept too).

  Sorted by `sort_tasks`, without ranks (an argsort and its inverse, for exact ranks, took
  2.6 times as long as a sort on XLA:CPU)."""
  k = matrix.shape[0]
  sorted_values = sort_tasks(matrix)
  kept = (matrix >= sorted_values[trim]) & (matrix <= sorted_values[k - 1 - trim])
  return jnp.mean(sorted_values[trim:k - trim], axis=0), kept


@register("trimmed_mean", properties=("permutation_equivariant",))
def trimmed_mean(num_tasks: int, *, trim_number: int = 1, shared: SharedSpec = None,
                 head_gradients: str = "sum") -> GradientRule:
  """TrimmedMean: per coordinate, the mean of the task values left after trimming both ends.

  In every coordinate of the shared gradient, the `trim_number` largest and the
  `trim_number` smallest of the k task values are removed and the k - 2 t others averaged,
  as torchjd's `TrimmedMean` does (coordinate by coordinate, so the update is not a
  weighted sum of the task gradients: a `GradientRule`).

  Where this differs from torchjd: torchjd has no default t and requires k >= 2 t + 1;
  here t defaults to 1 (the median of three tasks), and with fewer tasks it trims as many
  values as leave at least one (k = 2: the mean). Yin et al. trim a fraction beta of the
  values; t = ceil(beta k) gives theirs.

  Args:
    num_tasks: k.
    trim_number: t, the values removed at each end of every coordinate (>= 0).
    shared: which parameters are shared.
    head_gradients: "sum" (task-specific parameters get their plain gradients) or
      "weighted" (weighted by the state's kept fractions).

  Returns:
    A `GradientRule` (needs "gradients") with state `TrimmedMeanState`.

  References:
    Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards
    Optimal Statistical Rates", ICML 2018; torchjd's `TrimmedMean`
    (torchjd/aggregation/_trimmed_mean.py).
  """
  check_num_tasks(num_tasks)
  _check_count("trim_number", trim_number, 0)
  trim = trimmed_count(num_tasks, int(trim_number))

  @full_precision
  def rule(matrix, state: TrimmedMeanState, stats: TaskStats):
    if matrix.shape[0] != num_tasks:
      raise ValueError(f"trimmed_mean was built for {num_tasks} tasks, got {matrix.shape[0]}.")
    direction, kept = trimmed_mean_direction(matrix, trim)
    weights = jnp.mean(kept, axis=1).astype(matrix.dtype) / (num_tasks - 2 * trim)
    return direction, weights, TrimmedMeanState(state.count + 1, weights.astype(jnp.float32),
                                                conflicting_pairs(matrix @ matrix.T))

  init = lambda params: initial_state(
      TrimmedMeanState, num_tasks, weights=jnp.full(num_tasks, 1.0 / num_tasks, jnp.float32))
  return GradientRule(name="trimmed_mean", init=init, rule=rule, shared=shared,
                      head_gradients=head_gradients, hparams=dict(trim_number=trim_number))
