"""Gradient surgery: each task gradient is corrected where it conflicts with the others.

PCGrad projects a task gradient off every gradient it conflicts with; GradVac raises each
pair's cosine to an adaptive target; both are random-order sequences of corrections by
multiples of the original gradients, so the update's coefficients read only the Gram
matrix (`Needs("gram")`, the "streaming" strategy applies). GradDrop keeps, coordinate by
coordinate, the task gradients of one randomly chosen sign: it needs the gradients
themselves (a `GradientRule`). Each state records the conflicting pairs (negative
off-diagonal entries of G) at the last step.
"""

from __future__ import annotations

from typing import NamedTuple
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from ntkmtl_jax._tree import SharedSpec
from ntkmtl_jax.methods import register
from ntkmtl_jax.methods._common import (EPS, check_num_tasks, conflicting_pairs, full_precision,
                                        gram_of, initial_state, key_of, normalized, zeros_int)
from ntkmtl_jax.method import GradientRule, Needs, TaskStats, Weighting

# --------------------------------------------------------------------------------- PCGrad


class PCGradState(NamedTuple):
  """State of `pcgrad`.

  Attributes:
    count: number of updates made.
    weights: the last coefficients of the original task gradients in the update.
    conflicts: conflicting pairs (G_ij < 0, i < j) at the last step.
  """
  count: jax.Array
  weights: jax.Array
  conflicts: jax.Array


def pcgrad_orders(key: jax.Array, num_tasks: int) -> jax.Array:
  """Row i: the random order (a permutation of all k tasks) task i is projected in."""
  keys = jax.random.split(key, num_tasks)
  return jax.vmap(lambda kk: jax.random.permutation(kk, num_tasks))(keys)


def pcgrad_coefficients(gram: jax.Array, orders: jax.Array) -> jax.Array:
  """PCGrad's projected gradients, as coefficients of the original ones.

  Row i of the result C gives the projected gradient of task i as sum_l C_il g_l: starting
  from g_i, for j in `orders[i]`, whenever <current, g_j> < 0 subtract
  <current, g_j> / ||g_j||^2 g_j. Every projection is a multiple of an original gradient,
  so the Gram matrix suffices: <current, g_j> = (C G)_ij.
  """
  k = gram.shape[0]
  diag = jnp.diagonal(gram)
  rows = jnp.arange(k)

  def step(s, coeffs):
    j = orders[:, s]
    dots = jnp.sum(coeffs * gram[:, j].T, axis=1)
    g_jj = diag[j]
    shift = jnp.where((dots < 0) & (g_jj > 0), dots / jnp.where(g_jj > 0, g_jj, 1.0), 0.0)
    return coeffs.at[rows, j].add(-shift)

  return jax.lax.fori_loop(0, orders.shape[1], step, jnp.eye(k, dtype=gram.dtype))


@register("pcgrad", properties=("linear_under_scaling",))
def pcgrad(num_tasks: int, *, reduction: str = "sum", shared: SharedSpec = None,
           head_gradients: str = "sum") -> Weighting:
  """PCGrad: projects each task gradient off the gradients it conflicts with.

  For each task i, in its own random order of the tasks (drawn from the step's key), the
  current gradient is projected onto the normal plane of g_j whenever their inner product
  is negative; the projected gradients are summed (`reduction="sum"`, the paper and the
  reference code's default) or averaged ("mean"). Projections onto the original gradients
  are linear combinations of them, so the update is a weighted sum computed from the Gram
  matrix (`pcgrad_coefficients`), with the streaming strategy available. Just after a
  projection against g_j the inner product with g_j is zero; later projections may make it
  negative again (PCGrad's known order dependence), but never for the last task in the
  order.

  Args:
    num_tasks: k.
    reduction: "sum" or "mean" of the projected gradients.
    shared: which parameters are shared.
    head_gradients: "sum" (task-specific parameters get their plain gradients, as the
      reference code) or "weighted".

  Returns:
    A `Weighting` (needs "gram", takes `key=`) with state `PCGradState`.

  References:
    Yu, Kumar, Gupta, Levine, Hausman, Finn, "Gradient Surgery for Multi-Task Learning",
    NeurIPS 2020.
  """
  check_num_tasks(num_tasks)
  if reduction not in ("sum", "mean"):
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}.")

  @full_precision
  def weighting(stats: TaskStats, state: PCGradState):
    gram = gram_of(stats, "pcgrad", num_tasks)
    orders = pcgrad_orders(key_of(stats, "pcgrad"), num_tasks)
    weights = jnp.sum(pcgrad_coefficients(gram, orders), axis=0)
    if reduction == "mean":
      weights = weights / num_tasks
    return weights, PCGradState(state.count + 1, weights.astype(jnp.float32),
                                conflicting_pairs(gram))

  init = lambda params: initial_state(PCGradState, num_tasks)
  return Weighting(name="pcgrad", needs=Needs("gram"), init=init, weights=weighting,
                   shared=shared, head_gradients=head_gradients,
                   hparams=dict(reduction=reduction))


# ------------------------------------------------------------------------------- GradDrop


class GradDropState(NamedTuple):
  """State of `graddrop`.

  Attributes:
    count: number of updates made.
    weights: ones (GradDrop keeps or drops coordinates; it has no task weights).
    conflicts: conflicting pairs (G_ij < 0, i < j) at the last step.
    kept_fraction: per task, the fraction of its nonzero gradient coordinates kept.
  """
  count: jax.Array
  weights: jax.Array
  conflicts: jax.Array
  kept_fraction: jax.Array


def graddrop_direction(matrix: jax.Array, key: jax.Array,
                       leak: jax.Array | float = 0.0) -> tuple[jax.Array, jax.Array]:
  """GradDrop on flattened task gradients (k, P); returns (direction (P,), kept mask (k, P)).

  Per coordinate, the sign purity P = (1 + sum_i g_i / sum_i |g_i|) / 2 is compared with
  a uniform draw U: the positive entries are kept where P > U, the negative ones where
  P < U, so the kept entries of a coordinate all share one sign. With `leak` l_i, task i
  contributes l_i g_i + (1 - l_i) mask_i g_i.
  """
  purity = 0.5 * (1.0 + jnp.sum(matrix, 0) / (jnp.sum(jnp.abs(matrix), 0) + EPS))
  u = jax.random.uniform(key, purity.shape, matrix.dtype)
  keep = ((purity > u)[None] & (matrix > 0)) | ((purity < u)[None] & (matrix < 0))
  leak = jnp.broadcast_to(jnp.asarray(leak, matrix.dtype), (matrix.shape[0],))[:, None]
  direction = jnp.sum(matrix * (leak + (1.0 - leak) * keep), axis=0)
  return direction, keep


@register("graddrop", properties=("permutation_equivariant",))
def graddrop(num_tasks: int, *, leak: float | Sequence[float] = 0.0,
             shared: SharedSpec = None, head_gradients: str = "sum") -> GradientRule:
  """GradDrop: keeps, per coordinate, only the task gradients of one randomly chosen sign.

  The sign is positive with probability equal to the coordinate's sign purity (see
  `graddrop_direction`); the kept entries are summed (the reference code averages and
  multiplies by k). Applied to the shared parameters' gradients, as the reference
  trainers do (the paper also allows it at an activation layer).

  Args:
    num_tasks: k.
    leak: per-task (or one) leak coefficient in [0, 1]; 0 drops fully (the default).
    shared: which parameters are shared.
    head_gradients: "sum" (the reference code) or "weighted" (same here: weights are ones).

  Returns:
    A `GradientRule` (needs "gradients", takes `key=`) with state `GradDropState`.

  References:
    Chen, Ngiam, Huang, Luong, Kretzschmar, Chai, Anguelov, "Just Pick a Sign: Optimizing
    Deep Multitask Models with Gradient Sign Dropout", NeurIPS 2020.
  """
  check_num_tasks(num_tasks)
  leak_array = jnp.broadcast_to(jnp.asarray(leak, jnp.float32), (num_tasks,))
  if not bool(jnp.all((leak_array >= 0) & (leak_array <= 1))):
    raise ValueError(f"leak must lie in [0, 1], got {leak}.")

  @full_precision
  def rule(matrix, state: GradDropState, stats: TaskStats):
    if matrix.shape[0] != num_tasks:
      raise ValueError(f"graddrop was built for {num_tasks} tasks, got {matrix.shape[0]}.")
    direction, keep = graddrop_direction(matrix, key_of(stats, "graddrop"), leak_array)
    nonzero = matrix != 0
    kept = jnp.sum(keep, 1) / jnp.maximum(jnp.sum(nonzero, 1), 1)
    weights = jnp.ones(num_tasks, matrix.dtype)
    gram = matrix @ matrix.T
    return direction, weights, GradDropState(state.count + 1, weights.astype(jnp.float32),
                                             conflicting_pairs(gram),
                                             kept.astype(jnp.float32))

  init = lambda params: initial_state(GradDropState, num_tasks,
                                      kept_fraction=jnp.ones(num_tasks, jnp.float32))
  return GradientRule(name="graddrop", init=init, rule=rule, shared=shared,
                      head_gradients=head_gradients, hparams=dict(leak=leak))


# -------------------------------------------------------------------------------- GradVac


class GradVacState(NamedTuple):
  """State of `gradvac`.

  Attributes:
    count: number of updates made.
    weights: the last coefficients of the original task gradients in the update.
    conflicts: conflicting pairs (G_ij < 0, i < j) at the last step.
    targets: (k, k) the cosine targets phi^T_ij, an exponential moving average of the
      cosines observed between (the partly corrected) g_i and g_j; the diagonal is unused.
    adjusted: ordered pairs (i, j) whose cosine was raised to its target at the last step.
  """
  count: jax.Array
  weights: jax.Array
  conflicts: jax.Array
  targets: jax.Array
  adjusted: jax.Array


@full_precision
def gradvac_coefficients(gram: jax.Array, orders: jax.Array, targets: jax.Array,
                         beta: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """GradVac's corrected gradients as coefficients of the original ones.

  Row i of the result C gives the corrected gradient of task i as sum_l C_il g_l: starting
  from g_i, for each j != i in `orders[i]`, with phi the cosine between the current
  gradient and g_j and phi^T = targets[i, j], whenever phi < phi^T the current gradient
  gets w g_j added, w = ||g_i'|| (phi^T sqrt(1 - phi^2) - phi sqrt(1 - phi^T^2)) /
  (||g_j|| sqrt(1 - phi^T^2)), which makes its cosine with g_j exactly phi^T; the target
  then moves to (1 - beta) phi^T + beta phi. Every inner product is read off G.

  Returns:
    (coefficients (k, k), new targets (k, k), number of adjusted pairs).
  """
  k = gram.shape[0]
  a = normalized(gram)  # the coefficients do not depend on the scale of G
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(a), 0.0))
  rows = jnp.arange(k)
  targets = targets.astype(a.dtype)

  def step(s, carry):
    coeffs, targets, adjusted = carry
    j = orders[:, s]
    other = j != rows
    dots = jnp.sum(coeffs * a[j, :], axis=1)
    norm_i = jnp.sqrt(jnp.maximum(jnp.sum(coeffs * (coeffs @ a), axis=1), 0.0))
    norm_j = norms[j]
    # Exact quotients, guarded where they are 0 / 0: an absolute 1e-8 in the denominators
    # (the reimplementations' convention), on G normalised to unit mean diagonal, moves
    # the cosine of a task 1e4 smaller than the others by order one.
    norms_ij = norm_i * norm_j
    phi = jnp.clip(jnp.where(norms_ij > 0, dots / jnp.where(norms_ij > 0, norms_ij, 1.0), 0.0),
                   -1.0, 1.0)
    target = targets[rows, j]
    root_target = jnp.sqrt(jnp.maximum(1.0 - target ** 2, 0.0))
    # A zero gradient has no direction to correct toward (or to correct); a target cosine
    # of 1 cannot be reached by adding a multiple of g_j.
    apply = other & (phi < target) & (norm_i > 0) & (norm_j > 0) & (root_target > 0)
    root_phi = jnp.sqrt(jnp.maximum(1.0 - phi ** 2, 0.0))
    denominator = jnp.where(apply, norm_j * root_target, 1.0)
    w = norm_i * (target * root_phi - phi * root_target) / denominator
    coeffs = coeffs.at[rows, j].add(jnp.where(apply, w, 0.0))
    targets = targets.at[rows, j].set(jnp.where(other, (1.0 - beta) * target + beta * phi,
                                                target))
    return coeffs, targets, adjusted + jnp.sum(apply).astype(jnp.int32)

  return jax.lax.fori_loop(0, orders.shape[1], step,
                           (jnp.eye(k, dtype=a.dtype), targets, zeros_int()))


@register("gradvac", properties=("linear_under_scaling",))
def gradvac(num_tasks: int, *, beta: float = 0.01, shared: SharedSpec = None,
            head_gradients: str = "sum") -> Weighting:
  """GradVac: raises each pair's gradient cosine to an adaptive target (Gradient Vaccine).

  Each task gradient is corrected against every other task, in a random order drawn from
  the step's key, by adding a multiple of the other gradient whenever their cosine is below
  its target; the targets track the observed cosines by an exponential moving average with
  rate `beta` and start at 0 (so the first step only acts on conflicting pairs, where it
  coincides with PCGrad). The corrected gradients are summed. The corrections are
  combinations of the original gradients, so the update is a weighted sum computed from
  the Gram matrix (`gradvac_coefficients`) and runs with the streaming strategy.

  The cosines and the corrections are exact quotients, guarded only where they are 0 / 0:
  the common reimplementations add 1e-8 to their denominators, which on the Gram matrix
  normalised to unit mean diagonal moves the cosine of a task 1e4 times smaller than the
  others by order one (and breaks the update's linearity in each task's scale).

  The paper applies GradVac per parameter group (layers or matrices) in large
  translation models and also over the whole model; this is the whole-shared-parameter
  form (one Gram matrix, one k x k target matrix), the default of the common
  reimplementations. A per-group form would need one Gram matrix per group.

  Args:
    num_tasks: k.
    beta: the moving-average rate of the targets (1e-2 in the paper; LibMTL uses 0.5).
    shared: which parameters are shared.
    head_gradients: "sum" (task-specific parameters get their plain gradients) or
      "weighted".

  Returns:
    A `Weighting` (needs "gram", takes `key=`) with state `GradVacState`.

  References:
    Wang, Tsvetkov, Firat, Cao, "Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models", ICLR 2021.
  """
  check_num_tasks(num_tasks)
  if not 0 <= beta <= 1:
    raise ValueError(f"beta must lie in [0, 1], got {beta}.")

  @full_precision
  def weighting(stats: TaskStats, state: GradVacState):
    gram = gram_of(stats, "gradvac", num_tasks)
    orders = pcgrad_orders(key_of(stats, "gradvac"), num_tasks)
    coeffs, targets, adjusted = gradvac_coefficients(gram, orders, state.targets, beta)
    weights = jnp.sum(coeffs, axis=0)
    return weights, GradVacState(state.count + 1, weights.astype(jnp.float32),
                                 conflicting_pairs(gram), targets.astype(jnp.float32),
                                 adjusted)

  init = lambda params: initial_state(
      GradVacState, num_tasks, targets=jnp.zeros((num_tasks, num_tasks), jnp.float32))
  return Weighting(name="gradvac", needs=Needs("gram"), init=init, weights=weighting,
                   shared=shared, head_gradients=head_gradients, hparams=dict(beta=beta))
