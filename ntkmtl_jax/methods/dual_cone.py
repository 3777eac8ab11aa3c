"""Dual-cone projections: updates that conflict with no task, UPGrad and DualProj.

The dual cone of the task gradients is {v : <v, g_i> >= 0 for all i}. UPGrad projects each
(preference-scaled) task gradient onto it and sums the projections; DualProj projects their
weighted sum. A projection's dual is a non-negative QP on the k x k Gram matrix
(`solvers.nonnegative_qp`), so the update is a combination of the task gradients whose
weights read only G (`Needs("gram")`) and the train step can use the "streaming" strategy.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ntkmtl_jax._tree import SharedSpec
from ntkmtl_jax.methods import register, solvers
from ntkmtl_jax.methods._common import (SolverState, check_num_tasks, conflicting_pairs,
                                        full_precision, gram_of, initial_state,
                                        preference_vector)
from ntkmtl_jax.method import Needs, TaskStats, Weighting


RIDGES = ("per_task", "identity")


@full_precision
def dual_cone_weights(gram: jax.Array, preference: jax.Array, *, norm_eps: float = 1e-4,
                      reg_eps: float = 1e-4, ridge: str = "per_task", max_iters: int = 100,
                      tol: float = 1e-9) -> solvers.SolverResult:
  """Weights w >= u minimising w^T G w: J^T w is the projection of J^T u onto the dual cone.

  The projection of J^T u onto the dual cone {v : J v >= 0} of the task gradients (the rows
  of J) minimises ||v - J^T u||^2 subject to J v >= 0; its dual is min_{w >= u} w^T G w, and
  the projection is J^T w. As torchjd does, G is first divided by its trace (replaced by 0
  when the trace is below `norm_eps`) and a ridge is added so that the problem is strictly
  convex; the dual is then solved exactly by `solvers.nonnegative_qp` on z = w - u.
  `preference` may be (k,) or a batch (m, k) of vectors u.

  The ridge: torchjd adds reg_eps I (`ridge="identity"`). On G / tr(G) a task whose
  gradient is 1e4 times smaller than another's has a diagonal entry near 1e-8, which a
  ridge of 1e-4 swamps: its constraint is all but dropped, and the update conflicts with
  it (<d, g_small> = -874 where <d, g_large> = 5e7, on task scales 1 and 1e4). The
  default `"per_task"` adds reg_eps k G_ii / tr(G) to entry i instead: the same reg_eps I
  when every task has the same gradient norm, and each task's ridge on its own scale
  otherwise (floored at eps of the dtype, for a zero gradient).

  Returns:
    A `SolverResult` with `x` the weights w (shape of `preference`).
  """
  if ridge not in RIDGES:
    raise ValueError(f"ridge must be one of {RIDGES}, got {ridge!r}.")
  k = gram.shape[0]
  trace = jnp.trace(gram)
  normalized = jnp.where(trace < norm_eps, 0.0, gram / jnp.where(trace < norm_eps, 1.0, trace))
  if ridge == "identity":
    diagonal = jnp.full((k,), reg_eps, gram.dtype)
  else:
    relative = jnp.where(trace < norm_eps, 1.0, k * jnp.diagonal(normalized))
    diagonal = reg_eps * jnp.maximum(relative, jnp.finfo(gram.dtype).eps)
  regularized = normalized + jnp.diag(diagonal)
  preference = jnp.asarray(preference, gram.dtype)
  solve = lambda u: solvers.nonnegative_qp(regularized, regularized @ u, max_iters=max_iters,
                                           tol=tol)
  result = solve(preference) if preference.ndim == 1 else jax.vmap(solve)(preference)
  return result._replace(x=result.x + preference)


def _dual_cone(name, num_tasks, preference, per_task, norm_eps, reg_eps, ridge,
               max_iters, tol, shared, head_gradients):
  if norm_eps < 0 or reg_eps <= 0 or max_iters < 1 or tol <= 0:
    raise ValueError(f"{name}: need norm_eps >= 0, reg_eps > 0, max_iters >= 1 and tol > 0; "
                     f"got {norm_eps}, {reg_eps}, {max_iters}, {tol}.")
  if ridge not in RIDGES:
    raise ValueError(f"{name}: ridge must be one of {RIDGES}, got {ridge!r}.")
  # NumPy float64, cast to the Gram matrix's dtype where it is used.
  preference = np.diag(preference) if per_task else preference

  @full_precision
  def weighting(stats: TaskStats, state: SolverState):
    gram = gram_of(stats, name, num_tasks)
    result = dual_cone_weights(gram, preference, norm_eps=norm_eps, reg_eps=reg_eps,
                               ridge=ridge, max_iters=max_iters, tol=tol)
    weights = jnp.sum(result.x, axis=0) if per_task else result.x
    failed = ~jnp.all(result.converged)
    return weights, SolverState(state.count + 1, weights.astype(jnp.float32),
                                conflicting_pairs(gram), jnp.max(result.iterations),
                                state.solver_failures + failed.astype(jnp.int32))

  init = lambda params: initial_state(SolverState, num_tasks)
  return Weighting(name=name, needs=Needs("gram"), init=init, weights=weighting,
                   shared=shared, head_gradients=head_gradients,
                   hparams=dict(norm_eps=norm_eps, reg_eps=reg_eps, ridge=ridge))


@register("upgrad", properties={"permutation_equivariant": {}, "linear_under_scaling": {},
                               "non_conflicting": {"reg_eps": 1e-13}})
def upgrad(num_tasks: int, *, pref_vector: Sequence[float] | None = None,
           norm_eps: float = 1e-4, reg_eps: float = 1e-4, ridge: str = "per_task",
           max_iters: int = 100, tol: float = 1e-9, shared: SharedSpec = None,
           head_gradients: str = "sum") -> Weighting:
  """UPGrad: the average of every task gradient's projection onto the dual cone.

  Each task gradient, scaled by its preference u_i (1/k by default), is projected onto the
  dual cone {v : <v, g_j> >= 0 for all j} of the task gradients, and the projections are
  summed: the update conflicts with no task and weighs them by preference. Each projection
  is the dual problem min_{w >= u_i e_i} w^T G w, solved exactly on the Gram matrix by an
  active-set method with a fixed iteration bound (`dual_cone_weights`, where torchjd calls
  quadprog on the CPU), all k of them at once with `vmap`.

  Args:
    num_tasks: k.
    pref_vector: the preference weights u (default 1/k each, as torchjd: the mean of the
      projections).
    norm_eps: the Gram matrix is divided by its trace unless the trace is below this; below
      it (all gradients tiny) the problem is solved as if G = 0, giving w = u, as torchjd.
    reg_eps: size of the ridge added to the normalised Gram matrix.
    ridge: "per_task" (reg_eps k G_ii / tr(G) on entry i, each task on its own scale) or
      "identity" (reg_eps I, torchjd's; see `dual_cone_weights`).
    max_iters: bound on the active-set iterations.
    tol: relative tolerance on the KKT conditions (see `solvers.nonnegative_qp`, exact
      after about k iterations); past the bound the feasible iterate is used and the step
      counted in `SolverState.solver_failures`.
    shared: which parameters are shared: None (all), a pytree of bools or a function.
    head_gradients: "sum" (task-specific parameters get their plain gradients) or
      "weighted".

  Returns:
    A `Weighting` (needs "gram") with state `SolverState`.

  References:
    Quinton, Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv 2406.16232
    (2024).
  """
  check_num_tasks(num_tasks)
  preference = preference_vector(pref_vector, num_tasks, 1.0 / num_tasks)
  return _dual_cone("upgrad", num_tasks, preference, True, norm_eps, reg_eps, ridge,
                    max_iters, tol, shared, head_gradients)


@register("dualproj",
          properties={"permutation_equivariant": {}, "non_conflicting": {"reg_eps": 1e-13}})
def dualproj(num_tasks: int, *, pref_vector: Sequence[float] | None = None,
             norm_eps: float = 1e-4, reg_eps: float = 1e-4, ridge: str = "per_task",
             max_iters: int = 100, tol: float = 1e-9, shared: SharedSpec = None,
             head_gradients: str = "sum") -> Weighting:
  """DualProj: the projection of the mean task gradient onto the dual cone.

  The weighted sum sum_i u_i g_i (the mean by default) is projected onto the dual cone of
  the task gradients (as in GEM's Eq. 11): the nearest update that conflicts with no task.
  Solved on the Gram matrix as `upgrad`'s problems (`dual_cone_weights`).

  Args:
    num_tasks: k.
    pref_vector: the weights u of the sum that is projected (default 1/k each: the mean).
    norm_eps: as in `upgrad`.
    reg_eps: as in `upgrad`.
    ridge: as in `upgrad`.
    max_iters: as in `upgrad`.
    tol: as in `upgrad`.
    shared: which parameters are shared: None (all), a pytree of bools or a function.
    head_gradients: "sum" (task-specific parameters get their plain gradients) or
      "weighted".

  Returns:
    A `Weighting` (needs "gram") with state `SolverState`.

  References:
    Quinton, Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv 2406.16232
    (2024); Lopez-Paz, Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS
    2017.
  """
  check_num_tasks(num_tasks)
  preference = preference_vector(pref_vector, num_tasks, 1.0 / num_tasks)
  return _dual_cone("dualproj", num_tasks, preference, False, norm_eps, reg_eps, ridge,
                    max_iters, tol, shared, head_gradients)
