"""Weighted fair allocation: weights x > 0 solving G x = sqrt(p / x) for task priorities p.

Two methods of the NTKMTL authors' code base (methods/weight_methods.py) solve FairGrad's
alpha = 2 system with a priority per task: PIVRG sets the priorities from how each task is
doing, ConsMTL keeps them equal (its shared update is then FairGrad's). With C = diag(1 / p)
the system is C G C y = y^(-1/2) in y = p x, so both run FairGrad's solver
(`solvers.power_balance`, damped Newton at full matmul precision) on the k x k Gram matrix
(`Needs("gram")`, the "streaming" strategy applies). Both codes multiply the shared update
by k ("to match the sum loss") and give the task heads their plain gradients. When the
solve fails (no solution: 0 in the convex hull of the gradients), the previous weights are
kept and the failure counted.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ntkmtl_jax._tree import SharedSpec
from ntkmtl_jax.methods import register, solvers
from ntkmtl_jax.methods._common import (check_losses, check_num_tasks, check_solver_budget,
                                        conflicting_pairs, full_precision, gram_of,
                                        initial_state)
from ntkmtl_jax.method import Needs, TaskStats, Weighting

PIVRG_SCORES = ("loss_ratio", "loss")


class WeightedAllocationState(NamedTuple):
  """State of `pivrg` and `consmtl`.

  Attributes:
    count: number of updates made.
    weights: the weights in use (times k): the last solution, or the previous weights
      after a failed solve.
    conflicts: conflicting pairs (G_ij < 0, i < j) at the last step.
    priorities: the priorities p of the last step (they sum to k).
    iterations: Newton iterations at the last solve.
    residual: max_i |(x_i / p_i)^(1/2) (G x)_i - 1| of the last solve.
    solver_failures: solves so far that did not converge (previous weights kept).
    initial_losses: the task losses of the first step (PIVRG's "loss_ratio" scores).
  """
  count: jax.Array
  weights: jax.Array
  conflicts: jax.Array
  priorities: jax.Array
  iterations: jax.Array
  residual: jax.Array
  solver_failures: jax.Array
  initial_losses: jax.Array


def weighted_balance(gram: jax.Array, priorities: jax.Array, x0: jax.Array | None = None, *,
                     max_iters: int = 50, tol: float = 1e-9) -> solvers.SolverResult:
  """Solves G x = sqrt(p / x) for x > 0, i.e. x_i (G x)_i^2 = p_i.

  Substituting x = y / p turns it into FairGrad's alpha = 2 system on C G C, C = diag(1/p):
  (C G C y)_i = (G x)_i / p_i = y_i^(-1/2). The residual is the same elementwise relative
  residual as `solvers.power_balance`'s; `x0` warm-starts in the scale of x.
  """
  inverse = 1.0 / priorities
  warm = None if x0 is None else x0 * priorities
  result = solvers.power_balance(gram * jnp.outer(inverse, inverse), 2.0, warm,
                                 max_iters=max_iters, tol=tol)
  return result._replace(x=result.x * inverse)


def pivrg_priorities(scores: jax.Array, bound: float, min_temperature: float) -> jax.Array:
  """PIVRG's priorities k softmax(s / T), T = max((max s - min s) / log(bound), T_min): the
  largest is at most `bound` times the smallest, unless the scores differ so little that
  T_min already keeps them closer."""
  k = scores.shape[0]
  spread = jnp.max(scores) - jnp.min(scores)
  temperature = jnp.maximum(spread / math.log(bound), min_temperature)
  return k * jax.nn.softmax(scores / temperature)


def _allocation(name, num_tasks, priorities_of, scale_by_num_tasks, max_iters, tol, shared,
                head_gradients, hparams) -> Weighting:
  factor = float(num_tasks) if scale_by_num_tasks else 1.0

  @full_precision
  def weighting(stats: TaskStats, state: WeightedAllocationState):
    gram = gram_of(stats, name, num_tasks)
    initial_losses = state.initial_losses
    if stats.losses is not None:
      initial_losses = jnp.where(state.count == 0, stats.losses.astype(jnp.float32),
                                 initial_losses)
    priorities = priorities_of(stats, initial_losses.astype(gram.dtype)).astype(gram.dtype)
    previous = state.weights.astype(gram.dtype)
    warm = jnp.where(state.count > 0, previous / factor, jnp.nan)
    result = weighted_balance(gram, priorities, warm, max_iters=max_iters, tol=tol)
    weights = jnp.where(result.converged, result.x * factor, previous)
    return weights, WeightedAllocationState(
        state.count + 1, weights.astype(jnp.float32), conflicting_pairs(gram),
        priorities.astype(jnp.float32), result.iterations, result.residual.astype(jnp.float32),
        state.solver_failures + (~result.converged).astype(jnp.int32), initial_losses)

  init = lambda params: initial_state(
      WeightedAllocationState, num_tasks, priorities=jnp.ones(num_tasks, jnp.float32),
      residual=jnp.zeros([], jnp.float32), initial_losses=jnp.ones(num_tasks, jnp.float32))
  return Weighting(name=name, needs=Needs("gram"), init=init, weights=weighting, shared=shared,
                   head_gradients=head_gradients, hparams=hparams)


@register("pivrg", properties=("permutation_equivariant", "non_conflicting"))
def pivrg(num_tasks: int, *, bound: float = 2.0, min_temperature: float = 10.0,
          scores: str = "loss_ratio", scale_by_num_tasks: bool = True, max_iters: int = 50,
          tol: float = 1e-9, shared: SharedSpec = None, head_gradients: str = "sum") -> Weighting:
  """PIVRG: FairGrad's alpha = 2 allocation with performance-informed task priorities.

  The weights x > 0 solve G x = sqrt(p / x) (`weighted_balance`), with priorities
  p = k softmax(s / T) from per-task scores s and T = max((max s - min s) / log(bound),
  min_temperature) (`pivrg_priorities`), so that no priority exceeds `bound` times another.
  A task with a larger score gets a larger priority and so a larger projection of the update
  on its gradient, (G x)_i = sqrt(p_i / x_i).

  What this follows and where it differs: the authors' code (class PIVRG of the NTKMTL
  repository's methods/weight_methods.py; defaults bound = 2, mintemp = 10) takes the
  scores from its caller, and none of that repository's trainers passes them. Here the
  scores are read off the losses: "loss_ratio" (the default) is 100 l_i / l_i(first step),
  each task's loss as a percentage of where it started, so that a task that lags gets more
  weight and the minimum temperature of 10 is on the scale of percentage points; "loss" is
  the raw loss. The code solves the system with SciPy's `least_squares` from x = 1/k; here
  it is solved inside the step by FairGrad's Newton solver to a relative residual of 1e-9.
  The shared update is multiplied by k and the heads get their plain gradients, as there.

  Args:
    num_tasks: k.
    bound: the largest ratio of two priorities (> 1).
    min_temperature: the smallest softmax temperature (> 0).
    scores: "loss_ratio" or "loss" (see above).
    scale_by_num_tasks: multiply the update by k, as the code does.
    max_iters: bound on the Newton iterations.
    tol: tolerance on the relative residual (above its rounding error).
    shared: which parameters are shared.
    head_gradients: "sum" (the code) or "weighted".

  Returns:
    A `Weighting` (needs "gram", reads the losses) with state `WeightedAllocationState`.

  References:
    The NTKMTL authors' code base, github.com/jianke0604/NTKMTL, methods/weight_methods.py
    (class PIVRG); Ban, Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024,
    for the system it weights.
  """
  check_num_tasks(num_tasks)
  check_solver_budget(max_iters, tol)
  if not bound > 1 or not min_temperature > 0:
    raise ValueError(f"bound must be > 1 and min_temperature > 0, got {bound} and "
                     f"{min_temperature}.")
  if scores not in PIVRG_SCORES:
    raise ValueError(f"scores must be one of {PIVRG_SCORES}, got {scores!r}.")

  def priorities_of(stats: TaskStats, initial_losses):
    check_losses(stats, "pivrg", num_tasks)
    losses = stats.losses.astype(initial_losses.dtype)
    if scores == "loss_ratio":
      # A first loss of 0 (a task solved at the start) would make the ratio inf and the
      # softmax 0 / 0; floored, that task just gets the largest priority, `bound` times
      # the smallest.
      values = 100.0 * losses / jnp.maximum(jnp.abs(initial_losses), 1e-12)
    else:
      values = losses
    return pivrg_priorities(values, bound, min_temperature)

  return _allocation("pivrg", num_tasks, priorities_of, scale_by_num_tasks, max_iters, tol,
                     shared, head_gradients,
                     dict(bound=bound, min_temperature=min_temperature, scores=scores,
                          scale_by_num_tasks=scale_by_num_tasks))


@register("consmtl", properties=("permutation_equivariant", "non_conflicting"))
def consmtl(num_tasks: int, *, scale_by_num_tasks: bool = True, max_iters: int = 50,
            tol: float = 1e-9, shared: SharedSpec = None,
            head_gradients: str = "sum") -> Weighting:
  """ConsMTL's shared update: weights x > 0 solving G x = x^(-1/2), times k.

  That is FairGrad's system with alpha = 2 (equal priorities in `weighted_balance`), which
  the authors' code (class ConsMTL of the NTKMTL repository's methods/weight_methods.py)
  solves with SciPy's `least_squares` from x = 1/k and then multiplies by k; here FairGrad's
  Newton solver runs inside the step.

  Not implemented, and why: the code also trains each task head on an extra consistency
  loss, -lambda_ <d l_i / d z_i, sum_j x_j d l_j / d z_j> (lambda_ = 1), whose gradient
  with respect to the head is clipped to a tenth of the head's own gradient norm and added
  to it. That term differentiates the representation gradient d l_i / d z_i with respect to
  the head's parameters (a second-order term through the head), which a method here cannot
  ask of the train step: a method returns the shared update and the heads get their plain
  (or weighted) gradients. So this is ConsMTL without its head regulariser, with the heads'
  plain gradients; on the shared parameters it is the code's update.

  Args:
    num_tasks: k.
    scale_by_num_tasks: multiply the update by k, as the code does.
    max_iters: bound on the Newton iterations.
    tol: tolerance on the relative residual (above its rounding error).
    shared: which parameters are shared.
    head_gradients: "sum" (the code's plain head gradients) or "weighted".

  Returns:
    A `Weighting` (needs "gram") with state `WeightedAllocationState`.

  References:
    The NTKMTL authors' code base, github.com/jianke0604/NTKMTL, methods/weight_methods.py
    (class ConsMTL); Ban, Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024.
  """
  check_num_tasks(num_tasks)
  check_solver_budget(max_iters, tol)
  equal = lambda stats, initial_losses: jnp.ones(num_tasks, initial_losses.dtype)
  return _allocation("consmtl", num_tasks, equal, scale_by_num_tasks, max_iters, tol, shared,
                     head_gradients, dict(scale_by_num_tasks=scale_by_num_tasks))
