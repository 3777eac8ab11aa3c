"""Fair allocation: weights w > 0 that solve G w = w ** (-1 / alpha) on the Gram matrix.

Nash-MTL (alpha = 1, the Nash bargaining solution) and FairGrad (alpha-fair resource
allocation) share one system and one solver (`solvers.power_balance`, damped Newton on its
convex potential, at full matmul precision), reading only the k x k Gram matrix
G_ij = <g_i, g_j> (`Needs("gram")`), so the train step can use the "streaming" strategy.
When the system has no solution (0 in the convex hull of the gradients) or the solver runs
out of iterations, the previous weights are kept and the failure counted in the state.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ntkmtl_jax._tree import SharedSpec
from ntkmtl_jax.methods import register, solvers
from ntkmtl_jax.methods._common import (check_num_tasks, conflicting_pairs, full_precision,
                                        gram_of, initial_state, zeros_int)
from ntkmtl_jax.method import Needs, TaskStats, Weighting


class FairAllocationState(NamedTuple):
  """State of `nash_mtl` and `fairgrad`.

  Attributes:
    count: number of updates made.
    weights: the weights in use (the last solution, or the previous weights after a
      failure or between updates when `update_weights_every > 1`), after FairGrad's factor
      k when `scale_by_num_tasks`.
    conflicts: conflicting pairs (G_ij < 0, i < j) at the last step.
    iterations: Newton iterations at the last solve.
    residual: max_i |w_i^(1/alpha) (G w)_i - 1| of the last solve's final iterate.
    solver_failures: solves so far that did not converge (previous weights kept).
  """
  count: jax.Array
  weights: jax.Array
  conflicts: jax.Array
  iterations: jax.Array
  residual: jax.Array
  solver_failures: jax.Array


def _fair_allocation(name, num_tasks, alpha, factor, every, max_iters, tol, shared,
                     head_gradients, hparams) -> Weighting:
  """The weighting solving G w = w ** (-1 / alpha), times `factor`, every `every` steps."""

  @full_precision
  def weighting(stats: TaskStats, state: FairAllocationState):
    gram = gram_of(stats, name, num_tasks)
    previous = state.weights.astype(gram.dtype)
    # Warm start from the previous solution (not from the initial ones).
    warm = jnp.where(state.count > 0, previous / factor, jnp.nan)

    def solve(_):
      r = solvers.power_balance(gram, alpha, warm, max_iters=max_iters, tol=tol)
      weights = jnp.where(r.converged, r.x * factor, previous)
      return (weights, r.iterations, r.residual.astype(jnp.float32),
              (~r.converged).astype(jnp.int32))

    def reuse(_):
      return previous, zeros_int(), state.residual, zeros_int()

    if every == 1:
      weights, iterations, residual, failed = solve(None)
    else:
      weights, iterations, residual, failed = jax.lax.cond(state.count % every == 0, solve,
                                                           reuse, None)
    return weights, FairAllocationState(state.count + 1, weights.astype(jnp.float32),
                                        conflicting_pairs(gram), iterations, residual,
                                        state.solver_failures + failed)

  init = lambda params: initial_state(FairAllocationState, num_tasks,
                                      residual=jnp.zeros([], jnp.float32))
  return Weighting(name=name, needs=Needs("gram"), init=init, weights=weighting, shared=shared,
                   head_gradients=head_gradients, hparams=hparams)


@register("nash_mtl", properties=("permutation_equivariant", "scale_invariant", "non_conflicting"))
def nash_mtl(num_tasks: int, *, update_weights_every: int = 1, optim_niter: int = 50,
             tol: float = 1e-9, shared: SharedSpec = None,
             head_gradients: str = "weighted") -> Weighting:
  """Nash-MTL: the Nash bargaining solution, weights a > 0 with G a = 1 / a.

  The authors approach the solution by 20 concave-convex steps (`optim_niter=20`), each a
  cvxpy/ECOS solve on the CPU, and stop early when ||G a - 1 / a|| < 1e-3 (G divided by
  its norm) or when a moves by less than 1e-6, which stalls on imbalanced tasks
  (max |a_i (G a)_i - 1| of 1.3 and 444 on task scales 1 to 1000). Here the system is
  solved directly by damped Newton steps on its convex potential (`solvers.power_balance`
  with alpha = 1), inside the step, to a relative residual of 1e-9, which bounds the
  relative error of a by the same amount. `optim_niter` bounds the Newton steps; its
  default is 50, not the authors' 20 (which counts their much costlier concave-convex
  steps): from a cold start, tasks of scales 1 to 1e4 take up to 20 Newton steps and nearly
  opposite ones up to 27. When the solve does not converge (the system has no solution
  when 0 is in the convex hull of the gradients: a zero gradient, two opposite ones), the
  previous weights are kept, as the authors do, and the failure is counted in the state.

  Clipping: the original nash-mtl repository (AvivNavon/nash-mtl) clips the shared
  update's global norm to 1 after the backward pass; the NTKMTL and FAMO repositories'
  Nash-MTL calls the clip before `loss.backward()`, while the gradients are still None, so
  it does nothing there. Chain `clip_shared_by_global_norm(1.0, shared)` after this method
  for the former.

  Args:
    num_tasks: k.
    update_weights_every: solve every this many steps, reuse the weights in between.
    optim_niter: bound on the Newton iterations.
    tol: tolerance on max_i |a_i (G a)_i - 1| (above its rounding error).
    shared: which parameters are shared.
    head_gradients: "weighted" (the backward of the weighted loss, as the reference code)
      or "sum".

  Returns:
    A `Weighting` (needs "gram") with state `FairAllocationState`.

  References:
    Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya, "Multi-Task Learning as
    a Bargaining Game", ICML 2022.
  """
  check_num_tasks(num_tasks)
  if update_weights_every < 1 or optim_niter < 1 or tol <= 0:
    raise ValueError("update_weights_every and optim_niter must be >= 1 and tol > 0, got "
                     f"{update_weights_every}, {optim_niter}, {tol}.")
  return _fair_allocation("nash_mtl", num_tasks, 1.0, 1.0, update_weights_every, optim_niter,
                          tol, shared, head_gradients,
                          dict(update_weights_every=update_weights_every,
                               optim_niter=optim_niter))


@register("fairgrad", properties=("permutation_equivariant", "non_conflicting"))
def fairgrad(num_tasks: int, *, alpha: float = 2.0, scale_by_num_tasks: bool = True,
             max_iters: int = 50, tol: float = 1e-9, shared: SharedSpec = None,
             head_gradients: str = "sum") -> Weighting:
  """FairGrad: alpha-fair weights w > 0 solving G w = w ** (-1 / alpha).

  The authors solve the system with SciPy's `least_squares` from w = 1/k; here damped
  Newton steps on its convex potential (`solvers.power_balance`) run inside the step, to a
  relative residual of 1e-9 (at most `max_iters` = 50 of them; see `nash_mtl`). When the
  solve does not converge, the previous weights are kept and the failure counted. The
  reference code (the FairGrad repository) multiplies the update by k
  (`scale_by_num_tasks`), gives task heads their plain gradients and clips the shared
  gradient's global norm inside its own backward pass: chain
  `clip_shared_by_global_norm(max_norm, shared)` after this method for that. alpha = 2 is
  what the authors' run scripts use (their argument parser defaults to 1, which is
  Nash-MTL's system).

  Args:
    num_tasks: k.
    alpha: the fairness exponent (1: proportional fairness, as Nash-MTL; large: max-min).
    scale_by_num_tasks: multiply the update by k.
    max_iters: bound on the Newton iterations.
    tol: tolerance on max_i |w_i^(1/alpha) (G w)_i - 1| (above its rounding error).
    shared: which parameters are shared.
    head_gradients: "sum" (the reference code) or "weighted".

  Returns:
    A `Weighting` (needs "gram") with state `FairAllocationState`.

  References:
    Ban, Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024.
  """
  check_num_tasks(num_tasks)
  if alpha <= 0 or max_iters < 1 or tol <= 0:
    raise ValueError(f"alpha and tol must be positive and max_iters >= 1, got {alpha}, "
                     f"{tol}, {max_iters}.")
  factor = float(num_tasks) if scale_by_num_tasks else 1.0
  return _fair_allocation("fairgrad", num_tasks, float(alpha), factor, 1, max_iters, tol,
                          shared, head_gradients,
                          dict(alpha=alpha, scale_by_num_tasks=scale_by_num_tasks))
