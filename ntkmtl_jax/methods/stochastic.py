"""Stochastic multi-gradient weights: simplex weights that move a little every step.

MGDA's min-norm weights, recomputed from each mini-batch's gradients, are a biased and
noisy estimate of the full-batch ones. MoDo takes one projected gradient step on the
min-norm objective 1/2 ||J^T lambda||^2 per step instead of solving it; CR-MOGM averages
the min-norm weights of successive steps. Both read only the Gram matrix of the task
gradients (`Needs("gram")`, the "streaming" strategy applies) and carry their weights in
the state.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ntkmtl_jax._tree import SharedSpec
from ntkmtl_jax.methods import register, solvers
from ntkmtl_jax.methods._common import (check_num_tasks, check_solver_budget,
                                        conflicting_pairs, full_precision, gram_of,
                                        initial_state)
from ntkmtl_jax.method import Needs, TaskStats, Weighting


class SimplexWeightsState(NamedTuple):
  """State of `modo` and `cr_mogm`.

  Attributes:
    count: number of updates made.
    weights: the weights applied at the last step (lambda, times k where scaled).
    conflicts: conflicting pairs (G_ij < 0, i < j) at the last step.
    simplex_weights: lambda, the weights on the simplex that the method moves.
    solver_failures: steps so far whose min-norm solve reached its iteration bound
      (CR-MOGM; always 0 for MoDo, which solves nothing).
  """
  count: jax.Array
  weights: jax.Array
  conflicts: jax.Array
  simplex_weights: jax.Array
  solver_failures: jax.Array


def modo_step(gram: jax.Array, lam: jax.Array, gamma: float, rho: float) -> jax.Array:
  """One MoDo step on the simplex: Pi(lambda - gamma (G lambda + rho lambda)), with G the
  (here single-sample) Gram matrix."""
  return solvers.project_to_simplex(lam - gamma * (gram @ lam + rho * lam))


def _init(num_tasks):
  uniform = jnp.full(num_tasks, 1.0 / num_tasks, jnp.float32)
  return lambda params: initial_state(SimplexWeightsState, num_tasks, weights=uniform,
                                      simplex_weights=uniform)


@register("modo", properties=("permutation_equivariant",))
def modo(num_tasks: int, *, gamma: float = 0.001, rho: float = 0.1,
         scale_by_num_tasks: bool = False, shared: SharedSpec = None,
         head_gradients: str = "sum") -> Weighting:
  """MoDo: one projected gradient step on the min-norm objective per step, then J^T lambda.

  lambda starts uniform; each step it moves to Pi(lambda - gamma (G_1 G_2^T lambda +
  rho lambda)) (Pi the projection onto the simplex, rho an l2 regulariser) and the update
  is sum_i lambda_i g_i with the new lambda.

  What this follows and where it differs: LibMTL's MoDo (LibMTL/weighting/MoDo.py,
  defaults gamma = 0.001 and rho = 0.1) and the paper use double (triple) sampling: three
  independent mini-batches per step, the gradients of two for lambda's step (so that
  G_1 G_2^T lambda is an unbiased estimate of the full-batch G lambda) and of the third for
  the update, with the heads' gradients averaged over the three batches. The train step
  here computes the task gradients of one mini-batch, so all three are that batch's: the
  lambda step uses its Gram matrix G (the single-sample form, whose estimate of G lambda
  is biased by the gradients' noise) and the heads get that batch's plain gradients. For
  the paper's estimator, split each batch in three and call `update` with the third
  part's task gradients and `gram=J_1 J_2^T`, the (not symmetric) cross Gram matrix of the
  other two parts' gradients; tests/test_methods_stochastic.py does. gamma multiplies the
  raw Gram matrix, so its right size scales with the squared gradient norms (MoDo is not
  invariant to the losses' scales).

  Args:
    num_tasks: k.
    gamma: lambda's step size.
    rho: the l2 regularisation of lambda's step.
    scale_by_num_tasks: multiply the weights by k (LibMTL does not).
    shared: which parameters are shared.
    head_gradients: "sum" (task-specific parameters get their plain gradients) or
      "weighted".

  Returns:
    A `Weighting` (needs "gram") with state `SimplexWeightsState`.

  References:
    Chen, Fernando, Ying, Chen, "Three-Way Trade-Off in Multi-Objective Learning:
    Optimization, Generalization and Conflict-Avoidance", NeurIPS 2023 (JMLR 2024);
    LibMTL's MoDo.
  """
  check_num_tasks(num_tasks)
  if not gamma > 0 or not rho >= 0:
    raise ValueError(f"gamma must be > 0 and rho >= 0, got {gamma} and {rho}.")
  factor = float(num_tasks) if scale_by_num_tasks else 1.0

  @full_precision
  def weighting(stats: TaskStats, state: SimplexWeightsState):
    gram = gram_of(stats, "modo", num_tasks)
    lam = modo_step(gram, state.simplex_weights.astype(gram.dtype), gamma, rho)
    weights = lam * factor
    return weights, SimplexWeightsState(state.count + 1, weights.astype(jnp.float32),
                                        conflicting_pairs(gram), lam.astype(jnp.float32),
                                        state.solver_failures)

  return Weighting(name="modo", needs=Needs("gram"), init=_init(num_tasks), weights=weighting,
                   shared=shared, head_gradients=head_gradients,
                   hparams=dict(gamma=gamma, rho=rho, scale_by_num_tasks=scale_by_num_tasks))


@register("cr_mogm", properties=("permutation_equivariant",))
def cr_mogm(num_tasks: int, *, alpha: float = 0.1, scale_by_num_tasks: bool = False,
            max_iters: int = 500, tol: float = 1e-6, shared: SharedSpec = None,
            head_gradients: str = "sum") -> Weighting:
  """CR-MOGM: MGDA's min-norm weights, averaged over steps: lambda_t = (1 - alpha)
  lambda_{t-1} + alpha lambda_hat_t.

  lambda_hat_t are the min-norm weights of the step's gradients (`solvers.min_norm_point`,
  Wolfe's exact active-set method, as `mgda`); their moving average lambda_t (which stays
  on the simplex) weights the update sum_i lambda_t,i g_i. Averaging reduces the
  correlation between the weights and the current mini-batch's gradients, which is what
  biases stochastic MGDA ("correlation-reduced" multi-objective gradient manipulation).

  What this follows and where it differs: the paper (Zhou et al.) applies the averaging to
  the weights of any multi-objective gradient manipulation (MOGM) method and analyses
  decaying alpha_t; this is its MGDA instance with a constant alpha. No code by the authors
  or a peer library was available to us, so the default alpha = 0.1 is ours, not a
  published one. The first step takes lambda_hat_1 itself (there is no earlier average).

  Args:
    num_tasks: k.
    alpha: the averaging rate in (0, 1] (1: MGDA).
    scale_by_num_tasks: multiply the weights by k (as `mgda`'s reference code does).
    max_iters: the min-norm solver's iteration bound.
    tol: the relative error of the min-norm direction the solver certifies.
    shared: which parameters are shared.
    head_gradients: "sum" (task-specific parameters get their plain gradients) or
      "weighted".

  Returns:
    A `Weighting` (needs "gram") with state `SimplexWeightsState`.

  References:
    Zhou, Zhang, Jiang, Zhong, Gu, Zhu, "On the Convergence of Stochastic Multi-Objective
    Gradient Manipulation and Beyond", NeurIPS 2022.
  """
  check_num_tasks(num_tasks)
  if not 0 < alpha <= 1:
    raise ValueError(f"alpha must lie in (0, 1], got {alpha}.")
  check_solver_budget(max_iters, tol)
  factor = float(num_tasks) if scale_by_num_tasks else 1.0

  @full_precision
  def weighting(stats: TaskStats, state: SimplexWeightsState):
    gram = gram_of(stats, "cr_mogm", num_tasks)
    result = solvers.min_norm_point(gram, max_iters=max_iters, tol=tol)
    previous = state.simplex_weights.astype(gram.dtype)
    lam = jnp.where(state.count == 0, result.x, (1.0 - alpha) * previous + alpha * result.x)
    weights = lam * factor
    return weights, SimplexWeightsState(
        state.count + 1, weights.astype(jnp.float32), conflicting_pairs(gram),
        lam.astype(jnp.float32),
        state.solver_failures + (~result.converged).astype(jnp.int32))

  return Weighting(name="cr_mogm", needs=Needs("gram"), init=_init(num_tasks),
                   weights=weighting, shared=shared, head_gradients=head_gradients,
                   hparams=dict(alpha=alpha, scale_by_num_tasks=scale_by_num_tasks))
