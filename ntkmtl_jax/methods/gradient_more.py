"""More gradient methods: UPGrad, DualProj, Aligned-MTL, ConFIG, GradVac, SDMGrad and MoCo.

All but MoCo choose their update as a linear combination of the shared task gradients whose
coefficients depend only on the k x k Gram matrix G_ij = <g_i, g_j> (`needs="gram"`), so
the train step can run them with the "streaming" strategy, which never holds the k
gradients at once. This holds even where the published code manipulates the gradients
themselves: projections onto the dual cone (UPGrad, DualProj), the whitening of the
gradient matrix (Aligned-MTL), the pseudo-inverse of the unit gradients (ConFIG) and
GradVac's successive corrections all produce combinations of the original gradients whose
coefficients are read off G. MoCo keeps a tracking copy of the task gradients in its state
and needs the gradients (`needs="gradients"`).

Every iterative solver is jnp code with a fixed iteration bound; each state records the
weights applied to the shared task gradients, the number of conflicting pairs (negative
off-diagonal entries of G) and, for the iterative methods, the iterations used and how many
steps ended without meeting the solver's tolerance.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ntkmtl_jax import _tree
from ntkmtl_jax._tree import SharedSpec
from ntkmtl_jax.aggregator import (TaskAggregator, TaskStats, gradient_aggregator,
                                   weighted_aggregator)
from ntkmtl_jax.methods import register, solvers
from ntkmtl_jax.methods.gradient_based import (EPS, _check_num_tasks, _gram_of, _key_of,
                                               _normalized, _zeros_int, conflicting_pairs,
                                               pcgrad_orders)


def _full_precision(fn):
  """Traces `fn` with float32 matrix products at full precision.

  By default TPUs multiply float32 matrices in bfloat16 passes and recent GPUs may use
  TF32, both far coarser than the solvers' tolerances; the products here are k x k (or
  k x P once), so full precision costs nothing that matters.
  """

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.default_matmul_precision("highest"):
      return fn(*args, **kwargs)

  return wrapped


def _preference(pref_vector, num_tasks, default):
  """The preference vector as a float32 array of shape (k,), checked."""
  if pref_vector is None:
    return np.full(num_tasks, default, np.float32)
  pref = np.asarray(pref_vector, np.float32)
  if pref.shape != (num_tasks,) or not np.all(np.isfinite(pref)) or np.any(pref < 0):
    raise ValueError(f"pref_vector must be {num_tasks} finite non-negative numbers, got "
                     f"{pref_vector!r}.")
  return pref


# ------------------------------------------------------------------------ dual-cone solver


@_full_precision
def nonnegative_qp(gram: jax.Array, linear: jax.Array, *, max_iters: int = 100,
                   tol: float = 1e-5) -> solvers.SolverResult:
  """Solves min_z 1/2 z^T G z + c^T z subject to z >= 0, for a positive definite G.

  A primal active-set method (Lawson & Hanson's NNLS iteration written on the normal
  equations): starting from z = 0, it frees the coordinate whose partial derivative is most
  negative, solves the equality-constrained problem on the free coordinates exactly (one
  k x k linear solve with the fixed coordinates masked out), and, when that solution leaves
  the orthant, moves back along the segment to the first coordinate that hits zero and
  fixes it. Each iteration either frees a coordinate or fixes one; on small problems (k
  tasks) it ends after about k iterations with the exact solution, up to rounding.

  Tolerance: stops when max_j |min(z_j, (G z + c)_j / max_i G_ii)| <= tol, a measure that is
  zero exactly at the solution (KKT conditions) and has the units of z. Non-convergence:
  after `max_iters` iterations the last iterate, always feasible (z >= 0), is returned with
  `converged=False`.

  Args:
    gram: (k, k) symmetric positive definite matrix (add a ridge to a Gram matrix).
    linear: (k,) linear term c.
    max_iters: iteration bound.
    tol: tolerance on the KKT residual.

  Returns:
    A `SolverResult` with `x` the solution z (k,) and `residual` the final KKT residual.

  References:
    Lawson, Hanson, "Solving Least Squares Problems", Prentice-Hall 1974, chapter 23.
  """
  k = gram.shape[0]
  dtype = gram.dtype
  scale = jnp.maximum(jnp.max(jnp.diagonal(gram)), jnp.finfo(dtype).tiny)
  eye = jnp.eye(k, dtype=dtype)

  def residual_of(z):
    return jnp.max(jnp.abs(jnp.minimum(z, (gram @ z + linear) / scale)))

  def free_solution(free):
    both = free[:, None] & free[None, :]
    system = jnp.where(both, gram, eye)
    return jnp.where(free, jnp.linalg.solve(system, jnp.where(free, -linear, 0.0)), 0.0)

  def cond(c):
    _, _, i, residual = c
    return (i < max_iters) & ~(residual <= tol)

  def body(c):
    z, free, i, _ = c
    s = free_solution(free)
    inside = jnp.all(jnp.where(free, s > 0, True))
    # s is optimal on its face: free the coordinate with the most negative derivative.
    candidates = jnp.where(free, -jnp.inf, -(gram @ s + linear))
    t = jnp.argmax(candidates)
    free_added = free.at[t].set(free[t] | (candidates[t] > 0))
    # s left the orthant: stop at the first coordinate reaching zero and fix it.
    blocking = free & (s <= 0)
    ratios = jnp.where(blocking, z / jnp.where(blocking, z - s, 1.0), jnp.inf)
    first = jnp.argmin(ratios)
    step = jnp.clip(ratios[first], 0.0, 1.0)
    z_back = z + step * (s - z)
    free_back = free & (z_back > 0)
    free_back = free_back.at[first].set(False)
    z_back = jnp.where(free_back, z_back, 0.0)
    z = jnp.where(inside, s, z_back)
    free = jnp.where(inside, free_added, free_back)
    return z, free, i + 1, residual_of(z)

  z0 = jnp.zeros((k,), dtype)
  z, _, iterations, residual = jax.lax.while_loop(
      cond, body, (z0, jnp.zeros((k,), bool), jnp.zeros([], jnp.int32), residual_of(z0)))
  return solvers.SolverResult(z, iterations, residual <= tol, residual)


@_full_precision
def dual_cone_weights(gram: jax.Array, preference: jax.Array, *, norm_eps: float = 1e-4,
                      reg_eps: float = 1e-4, max_iters: int = 100, tol: float = 1e-5
                      ) -> solvers.SolverResult:
  """Weights w >= u minimising w^T G w: J^T w is the projection of J^T u onto the dual cone.

  The projection of J^T u onto the dual cone {v : J v >= 0} of the task gradients (the rows
  of J) minimises ||v - J^T u||^2 subject to J v >= 0; its dual is min_{w >= u} w^T G w, and
  the projection is J^T w. As torchjd does, G is first divided by its trace (replaced by 0
  when the trace is below `norm_eps`) and `reg_eps` times the identity is added so that the
  problem is strictly convex; the dual is then solved exactly by `nonnegative_qp` on
  z = w - u. `preference` may be (k,) or a batch (m, k) of vectors u.

  Returns:
    A `SolverResult` with `x` the weights w (shape of `preference`).
  """
  k = gram.shape[0]
  trace = jnp.trace(gram)
  normalized = jnp.where(trace < norm_eps, 0.0, gram / jnp.where(trace < norm_eps, 1.0, trace))
  regularized = normalized + reg_eps * jnp.eye(k, dtype=gram.dtype)
  preference = preference.astype(gram.dtype)
  solve = lambda u: nonnegative_qp(regularized, regularized @ u, max_iters=max_iters, tol=tol)
  result = solve(preference) if preference.ndim == 1 else jax.vmap(solve)(preference)
  return result._replace(x=result.x + preference)


class DualConeState(NamedTuple):
  """State of `upgrad` and `dualproj`.

  Attributes:
    count: number of updates made.
    weights: the last weights applied to the task gradients.
    conflicts: conflicting pairs (G_ij < 0, i < j) at the last step.
    iterations: active-set iterations at the last step (the most over UPGrad's k problems).
    solver_failures: steps so far where the active-set solver reached its iteration bound
      before its tolerance (its feasible iterate was used anyway).
  """
  count: jax.Array
  weights: jax.Array
  conflicts: jax.Array
  iterations: jax.Array
  solver_failures: jax.Array


def _dual_cone_aggregator(name, num_tasks, preference, per_task, norm_eps, reg_eps,
                          max_iters, tol, shared, head_gradients):
  _check_num_tasks(num_tasks)
  if norm_eps < 0 or reg_eps <= 0 or max_iters < 1 or tol <= 0:
    raise ValueError(f"{name}: need norm_eps >= 0, reg_eps > 0, max_iters >= 1 and tol > 0; "
                     f"got {norm_eps}, {reg_eps}, {max_iters}, {tol}.")
  preference = jnp.asarray(np.diag(preference) if per_task else preference)

  @_full_precision
  def weighting(stats: TaskStats, state: DualConeState):
    gram = _gram_of(stats, name, num_tasks)
    result = dual_cone_weights(gram, preference, norm_eps=norm_eps, reg_eps=reg_eps,
                               max_iters=max_iters, tol=tol)
    weights = jnp.sum(result.x, axis=0) if per_task else result.x
    failed = ~jnp.all(result.converged)
    return weights, DualConeState(state.count + 1, weights.astype(jnp.float32),
                                  conflicting_pairs(gram), jnp.max(result.iterations),
                                  state.solver_failures + failed.astype(jnp.int32))

  init = lambda params: DualConeState(_zeros_int(), jnp.ones(num_tasks, jnp.float32),
                                      _zeros_int(), _zeros_int(), _zeros_int())
  return weighted_aggregator(name, "gram", weighting, init, shared=shared,
                             head_gradients=head_gradients, norm_eps=norm_eps,
                             reg_eps=reg_eps)


@register("upgrad")
def upgrad(num_tasks: int, *, pref_vector: Sequence[float] | None = None,
           norm_eps: float = 1e-4, reg_eps: float = 1e-4, max_iters: int = 100,
           tol: float = 1e-5, shared: SharedSpec = None,
           head_gradients: str = "sum") -> TaskAggregator:
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
    reg_eps: ridge added to the normalised Gram matrix.
    max_iters: bound on the active-set iterations.
    tol: tolerance on the KKT residual (see `nonnegative_qp`); past the bound the feasible
      iterate is used and the step counted in `DualConeState.solver_failures`.
    shared: which parameters are shared: None (all), a pytree of bools or a function.
    head_gradients: "sum" (task-specific parameters get their plain gradients) or
      "weighted".

  Returns:
    A `TaskAggregator` (needs "gram") with state `DualConeState`.

  References:
    Quinton, Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv 2406.16232
    (2024).
  """
  preference = _preference(pref_vector, num_tasks, 1.0 / num_tasks)
  return _dual_cone_aggregator("upgrad", num_tasks, preference, True, norm_eps, reg_eps,
                               max_iters, tol, shared, head_gradients)


@register("dualproj")
def dualproj(num_tasks: int, *, pref_vector: Sequence[float] | None = None,
             norm_eps: float = 1e-4, reg_eps: float = 1e-4, max_iters: int = 100,
             tol: float = 1e-5, shared: SharedSpec = None,
             head_gradients: str = "sum") -> TaskAggregator:
  """DualProj: the projection of the mean task gradient onto the dual cone.

  The weighted sum sum_i u_i g_i (the mean by default) is projected onto the dual cone of
  the task gradients (as in GEM's Eq. 11): the nearest update that conflicts with no task.
  Solved on the Gram matrix as `upgrad`'s problems (`dual_cone_weights`).

  Args:
    As `upgrad`.

  Returns:
    A `TaskAggregator` (needs "gram") with state `DualConeState`.

  References:
    Quinton, Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv 2406.16232
    (2024); Lopez-Paz, Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS
    2017.
  """
  preference = _preference(pref_vector, num_tasks, 1.0 / num_tasks)
  return _dual_cone_aggregator("dualproj", num_tasks, preference, False, norm_eps, reg_eps,
                               max_iters, tol, shared, head_gradients)


# ---------------------------------------------------------------------------- Aligned-MTL

_ALIGNED_SCALES = ("min", "median", "rmse")


class AlignedMTLState(NamedTuple):
  """State of `aligned_mtl`.

  Attributes:
    count: number of updates made.
    weights: the last weights applied to the task gradients.
    conflicts: conflicting pairs (G_ij < 0, i < j) at the last step.
    condition_number: sqrt(lambda_max / lambda_min) of the Gram matrix on its numerical
      range at the last step (the condition number of the gradient matrix, which the
      alignment brings to 1).
    rank: numerical rank of the Gram matrix at the last step.
  """
  count: jax.Array
  weights: jax.Array
  conflicts: jax.Array
  condition_number: jax.Array
  rank: jax.Array


@_full_precision
def aligned_mtl_transform(gram: jax.Array, scale_mode: str = "min"
                          ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Aligned-MTL's balance matrix B, from the Gram matrix; returns (B, condition, rank).

  With G = V diag(lambda) V^T restricted to the eigenvalues above lambda_max * k * eps (the
  numerical rank r), B = sqrt(s) V diag(lambda)^(-1/2) V^T, s the smallest kept eigenvalue
  ("min"), their lower median ("median") or their mean ("rmse"). The aligned gradients
  J^T B (column i: sum_l B_li g_l) are orthogonal with equal norms sqrt(s): their Gram
  matrix is B G B = s V V^T. When every eigenvalue is below the threshold (G = 0), B is the
  identity, as the authors' code.
  """
  k = gram.shape[0]
  a = _normalized(gram)  # B does not change when G is scaled
  eigenvalues, vectors = jnp.linalg.eigh(0.5 * (a + a.T))
  threshold = jnp.max(eigenvalues) * k * jnp.finfo(a.dtype).eps
  keep = eigenvalues > threshold
  rank = jnp.sum(keep).astype(jnp.int32)
  kept = jnp.where(keep, eigenvalues, jnp.inf)
  if scale_mode == "min":
    scale = jnp.min(kept)
  elif scale_mode == "median":
    # Sorted, the r kept eigenvalues come first (the others are inf): the lower median.
    scale = jnp.sort(kept)[jnp.clip((rank - 1) // 2, 0, k - 1)]
  else:
    scale = jnp.sum(jnp.where(keep, eigenvalues, 0.0)) / jnp.maximum(rank, 1)
  inv_sqrt = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, eigenvalues, 1.0)), 0.0)
  balance = jnp.sqrt(scale) * (vectors * inv_sqrt[None, :]) @ vectors.T
  balance = jnp.where(rank > 0, balance, jnp.eye(k, dtype=a.dtype))
  condition = jnp.sqrt(jnp.max(eigenvalues) / jnp.min(kept))
  return balance, condition, rank


@register("aligned_mtl")
def aligned_mtl(num_tasks: int, *, scale_mode: str = "min",
                pref_vector: Sequence[float] | None = None, shared: SharedSpec = None,
                head_gradients: str = "sum") -> TaskAggregator:
  """Aligned-MTL: sums the task gradients after aligning them to condition number one.

  The gradient matrix is replaced by its nearest (Procrustes) matrix with orthogonal
  columns of equal norm, computed from the eigen-decomposition of the Gram matrix
  (`aligned_mtl_transform`), and the aligned gradients are summed with the preference
  weights (ones, as the authors' code; torchjd uses 1/k): the weights of the original task
  gradients are B u.

  Args:
    num_tasks: k.
    scale_mode: the common norm of the aligned gradients: sqrt of the smallest eigenvalue
      ("min", the paper and the authors' default), of the median one or of their mean
      ("rmse").
    pref_vector: the weights u of the aligned gradients (default ones).
    shared: which parameters are shared.
    head_gradients: "sum" (task-specific parameters get their plain gradients, as the
      authors' code by default) or "weighted".

  Returns:
    A `TaskAggregator` (needs "gram") with state `AlignedMTLState`.

  References:
    Senushkin, Patakin, Kuznetsov, Konushin, "Independent Component Alignment for
    Multi-Task Learning", CVPR 2023.
  """
  _check_num_tasks(num_tasks)
  if scale_mode not in _ALIGNED_SCALES:
    raise ValueError(f"scale_mode must be one of {_ALIGNED_SCALES}, got {scale_mode!r}.")
  preference = jnp.asarray(_preference(pref_vector, num_tasks, 1.0))

  @_full_precision
  def weighting(stats: TaskStats, state: AlignedMTLState):
    gram = _gram_of(stats, "aligned_mtl", num_tasks)
    balance, condition, rank = aligned_mtl_transform(gram, scale_mode)
    weights = balance @ preference.astype(balance.dtype)
    return weights, AlignedMTLState(state.count + 1, weights.astype(jnp.float32),
                                    conflicting_pairs(gram), condition.astype(jnp.float32),
                                    rank)

  init = lambda params: AlignedMTLState(_zeros_int(), jnp.ones(num_tasks, jnp.float32),
                                        _zeros_int(), jnp.ones([], jnp.float32), _zeros_int())
  return weighted_aggregator("aligned_mtl", "gram", weighting, init, shared=shared,
                             head_gradients=head_gradients, scale_mode=scale_mode)


# --------------------------------------------------------------------------------- ConFIG


class ConFIGState(NamedTuple):
  """State of `config`.

  Attributes:
    count: number of updates made.
    weights: the last weights applied to the task gradients.
    conflicts: conflicting pairs (G_ij < 0, i < j) at the last step.
    cosine: the smallest cosine between the update and a (nonzero) task gradient at the
      last step; all are equal when the unit gradients are linearly independent.
    rank: numerical rank of the matrix of unit gradients at the last step.
  """
  count: jax.Array
  weights: jax.Array
  conflicts: jax.Array
  cosine: jax.Array
  rank: jax.Array


@_full_precision
def config_weights(gram: jax.Array, rcond: float | None = None
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """ConFIG's update as coefficients of the task gradients; returns (weights, cosine, rank).

  With U the unit task gradients, the direction is g_v = pinv(U^T) 1 = U pinv(C) 1, C the
  cosine matrix U^T U: the minimum-norm vector with <g_v, u_i> = 1 for every i, so its
  cosine with every task gradient is the same positive number. Its unit vector e is then
  scaled by sum_i <g_i, e> (ConFIG's default projection length). pinv(C) keeps the
  eigenvalues of C above `rcond` times the largest (default k * eps of the dtype); those of
  C are the squared singular values of U, so gradient directions dependent to about
  sqrt(rcond) are treated as dependent.
  """
  k = gram.shape[0]
  dtype = gram.dtype
  a = _normalized(gram)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(a), 0.0))
  nonzero = norms > 0
  safe = jnp.where(nonzero, norms, 1.0)
  cosines = jnp.where(nonzero[:, None] & nonzero[None, :], a / jnp.outer(safe, safe), 0.0)
  eigenvalues, vectors = jnp.linalg.eigh(0.5 * (cosines + cosines.T))
  cutoff = (k * jnp.finfo(dtype).eps if rcond is None else rcond) * jnp.max(eigenvalues)
  keep = eigenvalues > cutoff
  inverse = jnp.where(keep, 1.0 / jnp.where(keep, eigenvalues, 1.0), 0.0)
  alpha = vectors @ (inverse * (vectors.T @ jnp.where(nonzero, 1.0, 0.0)))
  direction_sq = jnp.maximum(alpha @ (cosines @ alpha), 0.0)
  unit = jnp.where(nonzero, alpha / safe, 0.0) / (jnp.sqrt(direction_sq) + EPS)
  # sum_i <g_i, e> on the original scale: G = a * mean diagonal.
  length = jnp.sum(gram @ unit) / jnp.maximum(jnp.mean(jnp.diagonal(gram)),
                                              jnp.finfo(dtype).tiny)
  projections = (cosines @ alpha) / (jnp.sqrt(direction_sq) + EPS)
  cosine = jnp.min(jnp.where(nonzero, projections, jnp.inf))
  return length * unit, cosine, jnp.sum(keep).astype(jnp.int32)


@register("config")
def config(num_tasks: int, *, rcond: float | None = None, shared: SharedSpec = None,
           head_gradients: str = "sum") -> TaskAggregator:
  """ConFIG: the conflict-free update with equal cosine to every task gradient.

  The direction solves <d, g_i / ||g_i||> = 1 for every task in the least-norm sense (the
  pseudo-inverse of the unit gradients), so it makes the same positive angle with every
  task gradient; its length is the sum of the task gradients' projections on it
  (`config_weights`). The pseudo-inverse is a combination of the unit gradients read off
  the Gram matrix (U pinv(U^T U) 1), so the method needs only G, where the authors' code
  calls a least-squares solver on the gradients.

  Args:
    num_tasks: k.
    rcond: relative cutoff on the eigenvalues of the cosine matrix (default k * eps).
    shared: which parameters are shared.
    head_gradients: "sum" (task-specific parameters get their plain gradients) or
      "weighted".

  Returns:
    A `TaskAggregator` (needs "gram") with state `ConFIGState`.

  References:
    Liu, Chu, Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural
    Networks", ICLR 2025.
  """
  _check_num_tasks(num_tasks)
  if rcond is not None and not 0 < rcond < 1:
    raise ValueError(f"rcond must lie in (0, 1) or be None, got {rcond}.")

  @_full_precision
  def weighting(stats: TaskStats, state: ConFIGState):
    gram = _gram_of(stats, "config", num_tasks)
    weights, cosine, rank = config_weights(gram, rcond)
    return weights, ConFIGState(state.count + 1, weights.astype(jnp.float32),
                                conflicting_pairs(gram), cosine.astype(jnp.float32), rank)

  init = lambda params: ConFIGState(_zeros_int(), jnp.ones(num_tasks, jnp.float32),
                                    _zeros_int(), jnp.ones([], jnp.float32), _zeros_int())
  return weighted_aggregator("config", "gram", weighting, init, shared=shared,
                             head_gradients=head_gradients, rcond=rcond)


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


@_full_precision
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
  a = _normalized(gram)  # the coefficients do not depend on the scale of G
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
    phi = jnp.clip(dots / (norm_i * norm_j + EPS), -1.0, 1.0)
    target = targets[rows, j]
    # A zero gradient has no direction to correct toward (or to correct).
    apply = other & (phi < target) & (norm_i > 0) & (norm_j > 0)
    root_target = jnp.sqrt(jnp.maximum(1.0 - target ** 2, 0.0))
    root_phi = jnp.sqrt(jnp.maximum(1.0 - phi ** 2, 0.0))
    w = norm_i * (target * root_phi - phi * root_target) / (norm_j * root_target + EPS)
    coeffs = coeffs.at[rows, j].add(jnp.where(apply, w, 0.0))
    targets = targets.at[rows, j].set(jnp.where(other, (1.0 - beta) * target + beta * phi,
                                                target))
    return coeffs, targets, adjusted + jnp.sum(apply).astype(jnp.int32)

  return jax.lax.fori_loop(0, orders.shape[1], step,
                           (jnp.eye(k, dtype=a.dtype), targets, _zeros_int()))


@register("gradvac")
def gradvac(num_tasks: int, *, beta: float = 0.01, shared: SharedSpec = None,
            head_gradients: str = "sum") -> TaskAggregator:
  """GradVac: raises each pair's gradient cosine to an adaptive target (Gradient Vaccine).

  Each task gradient is corrected against every other task, in a random order drawn from
  the step's key, by adding a multiple of the other gradient whenever their cosine is below
  its target; the targets track the observed cosines by an exponential moving average with
  rate `beta` and start at 0 (so the first step only acts on conflicting pairs, where it
  coincides with PCGrad). The corrected gradients are summed. The corrections are
  combinations of the original gradients, so the update is a weighted sum computed from
  the Gram matrix (`gradvac_coefficients`) and runs with the streaming strategy.

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
    A `TaskAggregator` (needs "gram", takes `key=`) with state `GradVacState`.

  References:
    Wang, Tsvetkov, Firat, Cao, "Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models", ICLR 2021.
  """
  _check_num_tasks(num_tasks)
  if not 0 <= beta <= 1:
    raise ValueError(f"beta must lie in [0, 1], got {beta}.")

  @_full_precision
  def weighting(stats: TaskStats, state: GradVacState):
    gram = _gram_of(stats, "gradvac", num_tasks)
    orders = pcgrad_orders(_key_of(stats, "gradvac"), num_tasks)
    coeffs, targets, adjusted = gradvac_coefficients(gram, orders, state.targets, beta)
    weights = jnp.sum(coeffs, axis=0)
    return weights, GradVacState(state.count + 1, weights.astype(jnp.float32),
                                 conflicting_pairs(gram), targets.astype(jnp.float32),
                                 adjusted)

  init = lambda params: GradVacState(_zeros_int(), jnp.ones(num_tasks, jnp.float32),
                                     _zeros_int(),
                                     jnp.zeros((num_tasks, num_tasks), jnp.float32),
                                     _zeros_int())
  return weighted_aggregator("gradvac", "gram", weighting, init, shared=shared,
                             head_gradients=head_gradients, beta=beta)


# -------------------------------------------------------------------------------- SDMGrad


class SDMGradState(NamedTuple):
  """State of `sdmgrad`.

  Attributes:
    count: number of updates made.
    weights: the last coefficients of the task gradients in the update.
    conflicts: conflicting pairs (G_ij < 0, i < j) at the last step.
    simplex_weights: the weights w on the simplex, carried to warm-start the next step.
  """
  count: jax.Array
  weights: jax.Array
  conflicts: jax.Array
  simplex_weights: jax.Array


@_full_precision
def sdmgrad_simplex_weights(gram: jax.Array, w0: jax.Array, lamda: float, *,
                            num_iters: int = 20, learning_rate: float = 10.0,
                            momentum: float = 0.5) -> jax.Array:
  """SDMGrad's sub-problem min_{w in simplex} ||g_w + lamda g0||^2 by projected momentum SGD.

  As the authors' code: G is divided by the squared mean of sqrt(G_ii + 1e-4), then
  `num_iters` steps of heavy-ball gradient descent (the gradient of
  w^T G w + 2 lamda w^T G 1/k, step `learning_rate`, momentum restarted every call) each
  followed by the Euclidean projection onto the simplex, from the previous step's w.
  """
  k = gram.shape[0]
  scale = jnp.mean(jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0) + 1e-4))
  a = gram / scale ** 2
  a_mean = jnp.mean(a, axis=1)

  def step(_, carry):
    w, velocity = carry
    grad = 2.0 * (a @ w) + 2.0 * lamda * a_mean
    velocity = momentum * velocity + grad
    return solvers.project_to_simplex(w - learning_rate * velocity), velocity

  w, _ = jax.lax.fori_loop(0, num_iters, step, (w0.astype(a.dtype), jnp.zeros((k,), a.dtype)))
  return w


@register("sdmgrad")
def sdmgrad(num_tasks: int, *, lamda: float = 0.3, num_iters: int = 20,
            learning_rate: float = 10.0, momentum: float = 0.5,
            scale_by_num_tasks: bool = False, shared: SharedSpec = None,
            head_gradients: str = "sum") -> TaskAggregator:
  """SDMGrad: a direction near MGDA's, regularised toward the mean gradient.

  d = (g_w + lamda g0) / (1 + lamda), g0 the mean task gradient and w on the simplex
  minimising ||g_w + lamda g0||^2 (`sdmgrad_simplex_weights`, the authors' 20 projected
  momentum steps, warm-started from the previous step's w). The paper estimates the two
  factors of the objective's gradient and the final direction on independent mini-batches
  to remove the bias of the stochastic estimates; here all three come from the step's
  batch, as in the deterministic setting. With the authors' step size (10, on G scaled to
  unit mean norm) the projected iteration does not converge: it jumps between faces of
  the simplex, so w can change discontinuously with G (even with its rounding); a step
  below 1 / (2 lambda_max) of the scaled G makes it converge to the sub-problem's solution.

  Args:
    num_tasks: k.
    lamda: the regularisation strength toward the mean gradient (0.3, LibMTL's default,
      from the authors' implementation).
    num_iters: projected steps per update.
    learning_rate: their step size.
    momentum: their momentum.
    scale_by_num_tasks: multiply the update by k (off: the authors' update is on the
      scale of the mean gradient).
    shared: which parameters are shared.
    head_gradients: "sum" (task-specific parameters get their plain gradients) or
      "weighted".

  Returns:
    A `TaskAggregator` (needs "gram") with state `SDMGradState`.

  References:
    Xiao, Ban, Ji, "Direction-oriented Multi-objective Learning: Simple and Provable
    Stochastic Algorithms", NeurIPS 2023.
  """
  _check_num_tasks(num_tasks)
  if lamda < 0 or num_iters < 1 or learning_rate <= 0 or not 0 <= momentum < 1:
    raise ValueError("sdmgrad: need lamda >= 0, num_iters >= 1, learning_rate > 0 and "
                     f"momentum in [0, 1); got {lamda}, {num_iters}, {learning_rate}, "
                     f"{momentum}.")
  factor = float(num_tasks) if scale_by_num_tasks else 1.0

  @_full_precision
  def weighting(stats: TaskStats, state: SDMGradState):
    gram = _gram_of(stats, "sdmgrad", num_tasks)
    w = sdmgrad_simplex_weights(gram, state.simplex_weights, lamda, num_iters=num_iters,
                                learning_rate=learning_rate, momentum=momentum)
    weights = factor * (w + lamda / num_tasks) / (1.0 + lamda)
    return weights, SDMGradState(state.count + 1, weights.astype(jnp.float32),
                                 conflicting_pairs(gram), w.astype(jnp.float32))

  init = lambda params: SDMGradState(_zeros_int(), jnp.ones(num_tasks, jnp.float32),
                                     _zeros_int(),
                                     jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32))
  return weighted_aggregator("sdmgrad", "gram", weighting, init, shared=shared,
                             head_gradients=head_gradients, lamda=lamda,
                             num_iters=num_iters, scale_by_num_tasks=scale_by_num_tasks)


# ----------------------------------------------------------------------------------- MoCo

_MOCO_SIMPLEX_MAPS = ("softmax", "projection")


class MoCoState(NamedTuple):
  """State of `moco`.

  Attributes:
    count: number of updates made.
    weights: lambda, the weights applied to the tracked gradients at the last step.
    conflicts: conflicting pairs (G_ij < 0, i < j) of the raw task gradients at the last
      step.
    tracking: (k, P) the tracking variables y_i of the (loss-scaled unit) task gradients
      of the shared parameters, flattened in the order of the parameter leaves.
  """
  count: jax.Array
  weights: jax.Array
  conflicts: jax.Array
  tracking: jax.Array


@register("moco")
def moco(num_tasks: int, *, beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1,
         gamma_sigma: float = 0.5, rho: float = 0.0, simplex_map: str = "softmax",
         shared: SharedSpec = None, head_gradients: str = "sum") -> TaskAggregator:
  """MoCo: MGDA on tracked (momentum) gradients, with a one-step update of its weights.

  At step t (from 1), each task gradient is rescaled to norm equal to its loss,
  h_i = l_i g_i / (||g_i|| + 1e-8); the tracking variables move toward it,
  y_i <- y_i - beta_t (y_i - h_i) with beta_t = beta / t^beta_sigma; the weights take one
  step on the regularised MGDA objective, lambda <- S(lambda - gamma_t (Y Y^T + rho I)
  lambda) with gamma_t = gamma / t^gamma_sigma and S the softmax (the reference
  implementation, `simplex_map="softmax"`) or the projection onto the simplex (the paper's
  algorithm, "projection"); the update is Y^T lambda. y starts at 0 and lambda at 1/k. The
  tracking variables are a copy of the shared task gradients, so MoCo needs the gradients
  and `init` needs the parameters.

  Args:
    num_tasks: k.
    beta, beta_sigma: step size of the tracking variables and its decay exponent.
    gamma, gamma_sigma: step size of the weights and its decay exponent.
    rho: ridge in the weights' objective.
    simplex_map: "softmax" or "projection".
    shared: which parameters are shared.
    head_gradients: "sum" (task-specific parameters get their plain gradients, as the
      reference implementation) or "weighted" (weighted by lambda).

  Returns:
    A `TaskAggregator` (needs "gradients", takes `losses=`) with state `MoCoState`.

  References:
    Fernando, Shen, Liu, Chaudhury, Murugesan, Chen, "Mitigating Gradient Bias in
    Multi-objective Learning: A Provably Convergent Approach", ICLR 2023. Defaults of
    LibMTL's implementation (Lin, Zhang, "LibMTL", JMLR 2023), from the authors' code.
  """
  _check_num_tasks(num_tasks)
  if simplex_map not in _MOCO_SIMPLEX_MAPS:
    raise ValueError(f"simplex_map must be one of {_MOCO_SIMPLEX_MAPS}, got {simplex_map!r}.")
  if beta <= 0 or gamma <= 0 or beta_sigma < 0 or gamma_sigma < 0 or rho < 0:
    raise ValueError("moco: need beta, gamma > 0 and beta_sigma, gamma_sigma, rho >= 0; got "
                     f"{beta}, {gamma}, {beta_sigma}, {gamma_sigma}, {rho}.")

  def init(params):
    if params is None:
      raise ValueError("moco keeps a tracking copy of the shared task gradients: call "
                       "init(params) with the parameters, not None.")
    leaves = _tree.masked_leaves(params, _tree.resolve_mask(shared, params))
    size = sum(int(np.prod(x.shape)) for x in leaves)
    dtype = jnp.result_type(*leaves) if leaves else jnp.float32
    return MoCoState(_zeros_int(), jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32),
                     _zeros_int(), jnp.zeros((num_tasks, size), dtype))

  @_full_precision
  def aggregate(matrix, state: MoCoState, stats: TaskStats):
    if matrix.shape[0] != num_tasks or state.tracking.shape != matrix.shape:
      raise ValueError(f"moco was initialised for tracking variables of shape "
                       f"{state.tracking.shape}, got task gradients of shape {matrix.shape} "
                       "(init it with the same parameters and shared mask).")
    if stats.losses is None:
      raise ValueError("moco scales each task gradient by its loss: pass the task losses as "
                       "update(task_grads, state, params, losses=losses).")
    dtype = state.tracking.dtype
    matrix = matrix.astype(dtype)
    t = (state.count + 1).astype(dtype)
    norms = jnp.sqrt(jnp.sum(matrix ** 2, axis=1, keepdims=True))
    scaled = matrix / (norms + 1e-8) * stats.losses.astype(dtype)[:, None]
    tracking = state.tracking - beta / t ** beta_sigma * (state.tracking - scaled)
    lam = state.weights.astype(dtype)
    objective = tracking @ tracking.T + rho * jnp.eye(num_tasks, dtype=dtype)
    moved = lam - gamma / t ** gamma_sigma * (objective @ lam)
    lam = (jax.nn.softmax(moved) if simplex_map == "softmax"
           else solvers.project_to_simplex(moved))
    direction = tracking.T @ lam
    return direction, lam, MoCoState(state.count + 1, lam.astype(jnp.float32),
                                     conflicting_pairs(matrix @ matrix.T), tracking)

  return gradient_aggregator("moco", init, aggregate, shared=shared,
                             head_gradients=head_gradients, beta=beta, gamma=gamma,
                             simplex_map=simplex_map)
