"""Small solvers on the k x k Gram matrix of task gradients, in pure jnp, jittable.

Hand-written because no dependency solves these problems on device inside a jitted step:
the reference codes call SciPy, cvxpy or quadprog on the CPU; optax ships the simplex
projection (used here, `optax.projections.projection_simplex`) but no constrained solver;
jaxopt, which had projected gradient and box-constrained QP solvers, is no longer
developed. So: Wolfe's active-set method for quadratic problems on the simplex (the
min-norm point and its shifted variants, exact after finitely many steps), a
one-dimensional root on top of it for CAGrad's norm-penalised problem, damped Newton for
the Nash-MTL / FairGrad systems, an active-set method for the non-negative QP of the
dual-cone methods, and Frank-Wolfe and accelerated projected gradient on the simplex as
options. All trace their products at full precision (`_common.full_precision`), wherever
they are called from.

Every solver runs a `lax.while_loop` with a fixed iteration bound, so a step always
finishes in bounded time on any backend, and reports what happened in a `SolverResult`
(the iterate, the iterations used, whether the stopping test passed, and the value of the
stopping measure). Every stopping test is relative to the answer's own size, above the
rounding error of the quantities it compares: tasks whose gradients differ by a factor of
1e4 are the case this library is for, and a test relative to the largest task gradient
lets the answer be wrong by more than its own size there. What a method does with an
unconverged result is the method's choice and is documented there: the simplex solvers'
iterates are always feasible points of the simplex, usable as they are; the Newton solver
for the Nash-MTL / FairGrad systems may not have a solution at all (e.g. two exactly
opposite gradients), and its callers fall back to their previous weights.

The problems are small (k is the number of tasks), so each iteration costs O(k^2) to
O(k^3), negligible next to the k backward passes that produced the Gram matrix;
`perf/solver_accuracy.py` measures each solver's error and time on the hard cases.
"""

from __future__ import annotations

from typing import NamedTuple
from collections.abc import Callable

import jax
import jax.numpy as jnp
from optax import projections

from ntkmtl_jax.methods._common import full_precision


class SolverResult(NamedTuple):
  """What an iterative solver returns.

  Attributes:
    x: the final iterate.
    iterations: iterations used (int32).
    converged: whether the stopping test passed within the iteration bound.
    residual: the solver's stopping measure at `x` (see each solver).
  """
  x: jax.Array
  iterations: jax.Array
  converged: jax.Array
  residual: jax.Array


def project_to_simplex(v: jax.Array, total: float = 1.0) -> jax.Array:
  """Euclidean projection of `v` (k,) onto {x >= 0, sum(x) = total}.

  `optax.projections.projection_simplex` (the exact sort-based algorithm of Duchi et al.,
  "Efficient Projections onto the l1-Ball for Learning in High Dimensions", ICML 2008).
  """
  # In the dtype of v also where 64-bit numbers are on (optax's may promote float32).
  return projections.projection_simplex(v, total).astype(v.dtype)


MIN_NORM_METHODS = ("active_set", "frank_wolfe", "projected_gradient")
# The residual reported for an iterate that is not finite (representable in float16 too).
NONFINITE_RESIDUAL = 6e4


def _rounding(gram: jax.Array, linear: jax.Array, w: jax.Array) -> jax.Array:
  """(k,) bounds on the rounding error of (G w + q)^T w - (G w + q)_j in the dtype of G.

  A few ulps of the sums of absolute values the two terms are made of: a stopping test that
  asks for less than this could never pass, and one that ignores it stops on noise.
  """
  ulps = 2 * gram.shape[0] * jnp.finfo(gram.dtype).eps
  aw, aq = jnp.abs(w), jnp.abs(linear)
  return ulps * (jnp.abs(gram) @ aw + aq + aq @ aw) + norm_rounding(gram, w)


def norm_rounding(gram: jax.Array, w: jax.Array) -> jax.Array:
  """A bound on the rounding error of ||g_w||^2 = w^T G w computed from G: a few ulps of
  |w|^T |G| |w|. A norm below its square root is 0 to working precision."""
  aw = jnp.abs(w)
  return 2 * gram.shape[0] * jnp.finfo(gram.dtype).eps * (aw @ (jnp.abs(gram) @ aw))


def _equilibration(gram: jax.Array) -> jax.Array:
  """D_ii = 1 / sqrt(G_ii), floored at eps of the largest G_ii: D G D has unit diagonal,
  which keeps the active-set solves well-conditioned when task scales differ by orders of
  magnitude."""
  diag = jnp.diagonal(gram)
  dtype = gram.dtype
  top = jnp.maximum(jnp.max(diag), jnp.finfo(dtype).tiny)
  return jax.lax.rsqrt(jnp.maximum(diag, jnp.finfo(dtype).eps * top))


def simplex_gap(gram: jax.Array, linear: jax.Array, w: jax.Array) -> jax.Array:
  """The duality gap (G w + q)^T w - min_j (G w + q)_j of min_w w^T G w + 2 q^T w on the
  simplex: zero exactly at the minimiser, and f(w) - f(w*) <= 2 gap."""
  grad = gram @ w + linear
  return w @ grad - jnp.min(grad)


def certified_error(gram: jax.Array, linear: jax.Array, w: jax.Array) -> jax.Array:
  """sqrt(2 gap / ||g_w||^2): a bound on ||g_w - g_w*|| / ||g_w||, g_w = sum_i w_i g_i.

  For min_w w^T G w + 2 q^T w on the simplex (G = J J^T, so w^T G w = ||g_w||^2), the
  quadratic growth of f around its minimiser w* gives ||g_w - g_w*||^2 <= f(w) - f(w*) <=
  2 gap (`simplex_gap`), whatever q is; for the min-norm point (q = 0) g_w* is the
  minimum-norm point of the hull. Relative to the answer's own size, so that it means the
  same for tasks of scale 1 and 1e4; where ||g_w|| is below sqrt(eps) max_i ||g_i|| (a
  hull through 0, whose answer is 0 to working precision) relative to that instead, and 0
  where the gap is 0 (a zero gradient).
  """
  gap = jnp.maximum(simplex_gap(gram, linear, w), 0.0)
  floor = jnp.finfo(gram.dtype).eps * jnp.max(jnp.diagonal(gram))
  norm_sq = jnp.maximum(w @ (gram @ w), jnp.maximum(floor, jnp.finfo(gram.dtype).tiny))
  return jnp.where(gap > 0, jnp.sqrt(2.0 * gap / norm_sq), 0.0)


def _improvements(gram, linear, w, tol):
  """(k,) how much each vertex would improve the objective at w beyond rounding, and the
  improvement below which the simplex solvers stop: tol^2 / 2 ||g_w||^2, which certifies a
  relative error of `tol` (`certified_error`)."""
  grad = gram @ w + linear
  improvement = w @ grad - grad - _rounding(gram, linear, w)
  return improvement, 0.5 * tol * tol * jnp.maximum(w @ (gram @ w), 0.0)


def _certified(gram, linear, w, tol):
  """Whether the stopping test of the simplex solvers passes at w: the certified relative
  error is at most `tol`, or every vertex's improvement is within rounding."""
  improvement, threshold = _improvements(gram, linear, w, tol)
  return jnp.max(improvement) <= threshold


@full_precision
def simplex_qp(gram: jax.Array, linear: jax.Array | None = None, *, max_iters: int = 500,
               tol: float = 1e-6, init: jax.Array | None = None) -> SolverResult:
  """Exact minimiser of w^T G w + 2 q^T w over the probability simplex (G = J J^T).

  Wolfe's active-set method ("Finding the nearest point in a polytope", 1976), on the Gram
  matrix: a support S of affinely independent vertices (a "corral") is kept; each
  iteration solves one bordered system `[[G_SS, 1], [1^T, 0]] [w_S; -lambda] = [-q_S; 1]` for
  the minimiser on the affine hull of S (the system is diagonally equilibrated, which keeps
  it well-conditioned when task scales differ by orders of magnitude). Where that point has
  all weights positive, it is the minimiser on the face of S; then the vertex j that most
  improves the objective, (G w + q)_j < (G w + q)^T w, joins S, or, where none does, w is
  the answer. Otherwise w moves toward it up to the face's boundary and the vertex whose
  weight reaches 0 leaves S. The objective decreases strictly and no support repeats, so
  the method ends after finitely many iterations, with the exact answer up to rounding:
  typically about k iterations, each O(k^3) for the k x k system. In floating point a face
  minimiser that is no better than the last one ends the method: the improvement that
  brought its vertex in was rounding (as at a hull through 0).

  The min-norm point of the hull of the task gradients is q = 0 (`min_norm_point`); the
  min-norm point of the shifted points g_i + y is q = J y (SDMGrad's and IMGrad's
  sub-problems, CAGrad's via `min_linear_plus_norm`). Vertices are added only when they
  improve by more than rounding, which keeps S affinely independent for q of that form.

  Tolerance: stops when no vertex improves the objective by more than
  tol^2 / 2 * ||g_w||^2 beyond rounding (`_rounding`), which certifies
  ||g_w - g_w*|| <= tol * ||g_w|| up to rounding (`certified_error`): relative to the
  answer's own size, not to the largest task gradient. Non-convergence: past `max_iters`
  iterations, or where a bordered system is singular to working precision, the last
  iterate, always a point of the simplex, is returned with `converged=False`.

  Args:
    gram: (k, k) positive semi-definite matrix G.
    linear: (k,) linear term q (default 0).
    max_iters: bound on the iterations (bordered solves).
    tol: relative error of g_w that the stopping test certifies (above rounding).
    init: optional warm start on the simplex whose support is affinely independent (the
      answer of a previous solve); default, or where `init` is not finite: the best vertex.

  Returns:
    A `SolverResult` with `x` the weights (k,) and `residual` the `certified_error` at `x`.

  References:
    Wolfe, "Finding the nearest point in a polytope", Math. Programming 11, 1976.
  """
  k = gram.shape[0]
  dtype = gram.dtype
  q = jnp.zeros((k,), dtype) if linear is None else linear.astype(dtype)
  diag = jnp.diagonal(gram)
  scaling = _equilibration(gram)  # solved for v, w = D v
  scaling_b = jnp.concatenate([scaling, jnp.ones((1,), dtype)])
  bordered = (jnp.zeros((k + 1, k + 1), dtype).at[:k, :k].set(gram)
              .at[:k, k].set(1.0).at[k, :k].set(1.0))
  bordered = bordered * scaling_b[:, None] * scaling_b[None, :]
  rhs = jnp.concatenate([-q, jnp.ones((1,), dtype)]) * scaling_b
  eye = jnp.eye(k + 1, dtype=dtype)
  with_border = jnp.ones((1,), bool)

  def affine_minimiser(support):
    rows = jnp.concatenate([support, with_border])
    system = jnp.where(rows[:, None] & rows[None, :], bordered, eye)
    solution = jnp.linalg.solve(system, jnp.where(rows, rhs, 0.0))
    return jnp.where(support, solution[:k] * scaling, 0.0)

  vertex = jnp.argmin(diag + 2.0 * q)
  cold_w = jnp.zeros((k,), dtype).at[vertex].set(1.0)
  cold_support = cold_w > 0

  def cond(c):
    _, _, i, done, *_ = c
    return (i < max_iters) & ~done

  def body(c):
    w, support, i, _, ok, best_w, best_f = c
    v = affine_minimiser(support)
    finite = jnp.all(jnp.isfinite(v))
    inside = finite & jnp.all(jnp.where(support, v > 0, True))
    # Inside: v is the minimiser on S's face. Add the most improving vertex, if any.
    value = v @ (gram @ v) + 2.0 * (q @ v)
    improvement, threshold = _improvements(gram, q, v, tol)
    improvement = jnp.where(support, -jnp.inf, improvement)
    best = jnp.argmax(improvement)
    optimal = improvement[best] <= threshold
    # Each face minimiser is strictly better than the last in exact arithmetic; one that is
    # not means the improvement was rounding (e.g. a hull through 0, where g_w is noise):
    # the last face minimiser is the answer to working precision.
    stalled = inside & (value >= best_f)
    optimal = optimal | stalled
    improved = inside & ~stalled
    best_w = jnp.where(improved, v, best_w)
    best_f = jnp.where(improved, value, best_f)
    grown = support.at[best].set(support[best] | ~optimal)
    # Outside: move toward v to the boundary of the face, drop the vertex that reaches 0.
    blocking = support & (v <= 0)
    ratios = jnp.where(blocking, w / jnp.where(blocking, w - v, 1.0), jnp.inf)
    first = jnp.argmin(ratios)
    moved = w + jnp.clip(ratios[first], 0.0, 1.0) * (v - w)
    shrunk = (support & (moved > 0)).at[first].set(False)
    moved = jnp.where(shrunk, moved, 0.0)
    moved = moved / jnp.sum(moved)
    # Singular (e.g. a warm start whose support is affinely dependent): restart cold once.
    restart = ~finite & ok
    w = jnp.where(inside, v, jnp.where(finite, moved, cold_w))
    support = jnp.where(inside, grown, jnp.where(finite, shrunk, cold_support))
    done = (inside & optimal) | (~finite & ~ok)
    return w, support, i + 1, done, ok & ~restart, best_w, best_f

  if init is None:
    w0, support0 = cold_w, cold_support
  else:
    # A warm start that is not a point of the simplex (e.g. NaN: "none") starts cold.
    warm = jnp.maximum(init.astype(dtype), 0.0)
    valid = jnp.all(jnp.isfinite(init)) & (jnp.sum(warm) > 0)
    w0 = jnp.where(valid, warm / jnp.where(valid, jnp.sum(warm), 1.0), cold_w)
    support0 = jnp.where(valid, w0 > 0, cold_support)
  inf = jnp.array(jnp.inf, dtype)
  w, _, iterations, done, ok, best_w, best_f = jax.lax.while_loop(
      cond, body, (w0, support0, jnp.zeros([], jnp.int32), jnp.zeros([], bool),
                   jnp.ones([], bool), w0, inf))
  # The answer is the last face minimiser (the iterate itself when the bound cut a move).
  w = jnp.where(done & (best_f < inf), best_w, w)
  converged = done & jnp.all(jnp.isfinite(w)) & (ok | _certified(gram, q, w, tol))
  return SolverResult(w, iterations, converged, certified_error(gram, q, w))


@full_precision
def min_norm_point(gram: jax.Array, *, method: str = "active_set", max_iters: int = 500,
                   tol: float = 1e-6, init: jax.Array | None = None) -> SolverResult:
  """Minimum-norm point of the convex hull of k vectors, from their Gram matrix.

  Finds w on the simplex minimising w^T G w = ||sum_i w_i g_i||^2. Hand-written (see the
  module docstring): no library minimises over the simplex on device.

  - "active_set" (default): Wolfe's method (`simplex_qp` with q = 0), exact after finitely
    many iterations (about k), whatever the task scales.
  - "frank_wolfe": pairwise Frank-Wolfe with exact line search, each iteration moving
    weight from the active vertex with the largest gradient (G w)_i to the one with the
    smallest (the kind of solver of Sener & Koltun's MinNormSolver). It converges
    linearly, but at a rate set by the conditioning of G: with task scales 1 to 1e4 it
    needs far more than 500 iterations for a relative error of 1e-6.
  - "projected_gradient": `simplex_minimize` on w^T G w / (2 max_i G_ii), stopped by the
    same certificate; slow for the same reason.

  Every method stops on the same certificate (`certified_error`): the relative error
  ||d - d*|| / ||d|| of the direction d = sum_i w_i g_i is at most `tol`, up to rounding.
  The reference code's rule, a duality gap relative to the largest squared task norm,
  bounds the error only by sqrt(2 tol) max_i ||g_i||, which is larger than d* itself when
  the min-norm point is small next to the largest task gradient, i.e. whenever the tasks
  are imbalanced. Non-convergence: after `max_iters` iterations the last iterate, always a
  point of the simplex, is returned with `converged=False`.

  Args:
    gram: (k, k) symmetric positive semi-definite matrix.
    method: "active_set", "frank_wolfe" or "projected_gradient".
    max_iters: iteration bound.
    tol: the relative error of the direction that the stopping test certifies.
    init: optional starting point on the simplex (default: the shortest vector for
      "active_set", uniform weights otherwise).

  Returns:
    A `SolverResult` whose `x` are the weights (k,) and `residual` the `certified_error`.

  References:
    Sener, Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018;
    Wolfe, "Finding the nearest point in a polytope", Math. Programming 1976;
    Lacoste-Julien, Jaggi, "On the Global Linear Convergence of Frank-Wolfe Optimization
    Variants", NeurIPS 2015.
  """
  if method not in MIN_NORM_METHODS:
    raise ValueError(f"method must be one of {MIN_NORM_METHODS}, got {method!r}.")
  if method == "active_set":
    return simplex_qp(gram, max_iters=max_iters, tol=tol, init=init)
  k = gram.shape[0]
  dtype = gram.dtype
  zero = jnp.zeros((k,), dtype)
  w0 = jnp.full((k,), 1.0 / k, dtype) if init is None else init.astype(dtype)

  if method == "projected_gradient":
    scale = jnp.maximum(jnp.max(jnp.diagonal(gram)), jnp.finfo(dtype).tiny)
    normalized = gram / scale
    result = simplex_minimize(lambda w: 0.5 * w @ (normalized @ w), w0, max_iters=max_iters,
                              tol=tol, stop=lambda w: _certified(gram, zero, w, tol))
    return result._replace(converged=_certified(gram, zero, result.x, tol),
                           residual=certified_error(gram, zero, result.x))

  def cond(carry):
    w, i = carry
    return (i < max_iters) & ~_certified(gram, zero, w, tol)

  def body(carry):
    w, i = carry
    grad = gram @ w
    toward = jnp.argmin(grad)
    away = jnp.argmax(jnp.where(w > 0, grad, -jnp.inf))
    curvature = gram[toward, toward] + gram[away, away] - 2.0 * gram[toward, away]
    slope = grad[away] - grad[toward]
    # The exact minimiser along e_toward - e_away, capped by the weight the away vertex has.
    step = jnp.where(curvature > 0, slope / jnp.where(curvature > 0, curvature, 1.0), w[away])
    step = jnp.clip(step, 0.0, w[away])
    w = w.at[toward].add(step).at[away].add(-step)
    return jnp.maximum(w, 0.0), i + 1

  w, iterations = jax.lax.while_loop(cond, body, (w0, jnp.zeros([], jnp.int32)))
  return SolverResult(w, iterations, _certified(gram, zero, w, tol),
                      certified_error(gram, zero, w))


@full_precision
def min_linear_plus_norm(gram: jax.Array, linear: jax.Array, radius: jax.Array | float, *,
                         max_iters: int = 500, tol: float = 1e-6) -> SolverResult:
  """Exact minimiser of q^T w + r ||g_w|| over the simplex (||g_w||^2 = w^T G w).

  CAGrad's dual problem (q_i = <g_i, g0>, r = c ||g0||) and IMGrad's code variant. The norm
  is the minimum over s > 0 of (||g_w||^2 / s + s) / 2, so for tau = s / r the problem
  becomes the quadratic one of `simplex_qp` with linear term tau q, whose answer w(tau) has
  a norm n(tau) = ||g_w(tau)|| that grows with tau; the answer is w(tau*) where
  n(tau*) = tau* r, a one-dimensional root. It lies in [n(0) / r, max_i ||g_i|| / r] and is
  found by the Illinois variant of regula falsi (superlinear; each step one `simplex_qp`
  solve warm-started from the last one, which keeps its support affinely independent).
  No smoothing term is added to the norm: a sqrt(w^T G w + 1e-8), as the reference code
  writes it, on a Gram matrix normalised to unit mean diagonal moves the answer by 1e-4
  relative on imbalanced tasks, where ||g_w||^2 at the optimum is 1e-5 to 1e-6.

  Tolerance: the root finder stops when the duality gap of the problem (for u = g_w /
  ||g_w||, min_i q_i + r <g_i, u> is a lower bound on the optimum) is at most tol^2 of
  |q^T w| + r ||g_w||, or when the bracket of tau has shrunk to rounding. Non-convergence:
  past `max_iters` root-finding steps, or when an inner solve did not converge,
  `converged=False` with the last (feasible) iterate.

  Args:
    gram: (k, k) Gram matrix.
    linear: (k,) the linear term q.
    radius: r >= 0.
    max_iters: bound on the root finder's steps (and on each inner solve's iterations).
    tol: the inner solves' tolerance; the gap is asked to be below tol^2.

  Returns:
    A `SolverResult` with `x` the weights (k,), `iterations` the root finder's steps and
    `residual` the relative duality gap.

  References:
    Liu, Liu, Jin, Stone, Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
    NeurIPS 2021 (the problem); Dowell, Jarratt, "A modified regula falsi method for
    computing the root of an equation", BIT 1971 (the Illinois method).
  """
  k = gram.shape[0]
  dtype = gram.dtype
  q = linear.astype(dtype)
  r = jnp.asarray(radius, dtype)
  eps = jnp.finfo(dtype).eps
  tiny = jnp.finfo(dtype).tiny

  def solve(tau, init):
    result = simplex_qp(gram, tau * q, max_iters=max_iters, tol=tol, init=init)
    norm = jnp.sqrt(jnp.maximum(result.x @ (gram @ result.x), 0.0))
    return result, norm - tau * r

  def gap_of(w):
    norm = jnp.sqrt(jnp.maximum(w @ (gram @ w), 0.0))
    value = q @ w + r * norm
    bound = jnp.min(q + r * (gram @ w) / jnp.maximum(norm, tiny))
    return jnp.where(norm > 0, (value - bound) / jnp.maximum(jnp.abs(q @ w) + r * norm, tiny),
                     0.0)

  safe_r = jnp.maximum(r, tiny)
  hi0 = jnp.max(jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))) / safe_r
  zero = jnp.zeros([], dtype)

  # One loop, one inner solve per step (so that `simplex_qp` is traced once): step 0 solves
  # at tau = 0 (the min-norm point: n(0) and the bracket's low end), step 1 at the low end,
  # step 2 at the high end, and every later step at the Illinois point of the bracket.
  class Carry(NamedTuple):
    step: jax.Array
    lo: jax.Array
    f_lo: jax.Array
    hi: jax.Array
    f_hi: jax.Array
    side: jax.Array
    result: SolverResult
    first: SolverResult  # the tau = 0 solve
    at_lo: SolverResult
    through_zero: jax.Array
    inner_ok: jax.Array

  def pick(new, old, where):
    return jax.tree.map(lambda a, b: jnp.where(where, a, b), new, old)

  def bracketed(c):
    return (c.hi - c.lo > 4 * eps * c.hi) & (c.f_lo > 0) & (c.f_hi < 0)

  def cond(c):
    searching = bracketed(c) & ~(gap_of(c.result.x) <= tol * tol)
    return (c.step < 3) | ((c.step < max_iters + 3) & searching)

  def body(c):
    illinois = (c.lo * c.f_hi - c.hi * c.f_lo) / (c.f_hi - c.f_lo)
    illinois = jnp.where((illinois > c.lo) & (illinois < c.hi), illinois, 0.5 * (c.lo + c.hi))
    tau = jnp.select([c.step == 0, c.step == 1, c.step == 2], [zero, c.lo, c.hi], illinois)
    # Step 0 starts cold (a NaN warm start), every later solve from the last answer.
    result, f = solve(tau, jnp.where(c.step == 0, jnp.nan, c.result.x))
    ok = c.inner_ok & result.converged
    # Step 0: n(0) = f(0). 0 is in the hull, to within what the Gram matrix resolves
    # (n^2 = w^T G w is rounding below `norm_rounding`), when n(0) is below that; the
    # bracket then starts where n is resolved again.
    resolution = jnp.sqrt(norm_rounding(gram, result.x))
    through_zero = jnp.where(c.step == 0, f <= resolution, c.through_zero)
    lo_from_zero = jnp.where(f <= resolution, jnp.maximum(4.0 * resolution / safe_r,
                                                          eps * hi0), f / safe_r)
    lo = jnp.where(c.step == 0, lo_from_zero, c.lo)
    first = pick(result, c.first, c.step == 0)
    at_lo = pick(result, c.at_lo, c.step == 1)
    f_lo = jnp.where(c.step == 1, f, c.f_lo)
    f_hi = jnp.where(c.step == 2, f, c.f_hi)
    # Illinois: halve the value kept at the end that stays twice in a row.
    search = c.step >= 3
    left = f < 0  # the root is in [lo, tau]
    new_lo = jnp.where(search & ~left, tau, lo)
    new_f_lo = jnp.where(search, jnp.where(left, f_lo * jnp.where(c.side == 1, 0.5, 1.0), f),
                         f_lo)
    new_hi = jnp.where(search & left, tau, c.hi)
    new_f_hi = jnp.where(search, jnp.where(left, f, f_hi * jnp.where(c.side == -1, 0.5, 1.0)),
                         f_hi)
    side = jnp.where(search, jnp.where(left, 1, -1), 0).astype(jnp.int32)
    return Carry(c.step + 1, new_lo, new_f_lo, new_hi, new_f_hi, side, result, first, at_lo,
                 through_zero, ok)

  empty = SolverResult(jnp.full((k,), 1.0 / k, dtype), jnp.zeros([], jnp.int32),
                       jnp.ones([], bool), zero)
  start = Carry(jnp.zeros([], jnp.int32), zero, jnp.ones([], dtype), hi0, -jnp.ones([], dtype),
                jnp.zeros([], jnp.int32), empty, empty, empty, jnp.zeros([], bool),
                jnp.ones([], bool))
  c = jax.lax.while_loop(cond, body, start)
  steps = jnp.maximum(c.step - 3, 0)
  # Where the bracket is degenerate (f(lo) <= 0) the root is at lo: w(lo), or, for a hull
  # through 0, the min-norm point g_w = 0 (no point of the hull has a negative objective).
  result = pick(pick(c.first, c.at_lo, c.through_zero), c.result, c.f_lo <= 0)
  # r = 0: the objective is linear, its minimum a vertex.
  w = jnp.where(r > 0, result.x, jnp.zeros((k,), dtype).at[jnp.argmin(q)].set(1.0))
  gap = gap_of(w)
  settled = ((gap <= jnp.maximum(tol * tol, 64 * k * eps)) | (c.hi - c.lo <= 4 * eps * c.hi)
             | (c.f_lo <= 0) | (r <= 0))
  return SolverResult(w, steps, (c.inner_ok | (r <= 0)) & settled & jnp.all(jnp.isfinite(w)),
                      gap)


@full_precision
def simplex_minimize(fun: Callable[[jax.Array], jax.Array], x0: jax.Array, *,
                     max_iters: int = 500, tol: float = 1e-6,
                     stop: Callable[[jax.Array], jax.Array] | None = None) -> SolverResult:
  """Minimises a smooth convex function over the probability simplex.

  Accelerated projected gradient (FISTA) with backtracking on the step size and the
  gradient-based adaptive restart; gradients by `jax.grad(fun)`, the projection by
  `project_to_simplex` (optax's). Hand-written: optax has the projection but no projected
  solver with a convergence test. Step sizes and restarts are decided from gradients only, never
  from differences of objective values, which near the optimum fall below float32 precision.

  Tolerance: stops when the unit-step gradient mapping ||x - P(x - grad f(x))|| (zero
  exactly at a minimiser) is at most `tol`, or, where `stop` is given, when `stop(x)` is
  true (e.g. a certificate of the problem's own; `min_norm_point`); scale the objective so
  that its gradient is of order one. Non-convergence:
  after `max_iters` iterations the last iterate, always a point of the simplex, is
  returned with `converged=False`.

  Args:
    fun: the objective, jnp code of x (k,).
    x0: a starting point on the simplex.
    max_iters: iteration bound.
    tol: tolerance on the gradient mapping's norm.
    stop: optional stopping test `stop(x) -> bool` used instead of the gradient mapping's.

  Returns:
    A `SolverResult` whose `residual` is the last gradient mapping norm.

  References:
    Beck, Teboulle, "A Fast Iterative Shrinkage-Thresholding Algorithm for Linear Inverse
    Problems", SIAM J. Imaging Sci. 2009; O'Donoghue, Candes, "Adaptive Restart for
    Accelerated Gradient Schemes", Found. Comput. Math. 2015.
  """
  dtype = x0.dtype
  grad_fn = jax.grad(fun)
  max_lipschitz = 1.0 / jnp.finfo(dtype).eps

  def backtrack(y, gy, lipschitz):
    # Gradient-based test (the local Lipschitz estimate ||grad f(z) - grad f(y)|| / ||z - y||)
    # instead of the function-value test: near the optimum the decrease of f falls below the
    # float precision of f, and a function-value test then only sees noise.

    def trial(lip):
      z = project_to_simplex(y - gy / lip)
      gz = grad_fn(z)
      ok = jnp.linalg.norm(gz - gy) <= lip * jnp.linalg.norm(z - y)
      return z, gz, ok | jnp.all(z == y)

    def cond(c):
      lip, _, _, ok = c
      return ~ok & (lip < max_lipschitz)

    def body(c):
      lip = 2.0 * c[0]
      return (lip,) + trial(lip)

    lipschitz, z, gz, _ = jax.lax.while_loop(cond, body, (lipschitz,) + trial(lipschitz))
    return z, gz, lipschitz

  def cond(c):
    x, *_, i, residual = c
    done = residual <= tol if stop is None else (i > 0) & stop(x)
    return (i < max_iters) & ~done

  def body(c):
    x, y, t, lipschitz, i, _ = c
    z, gz, lipschitz = backtrack(y, grad_fn(y), lipschitz)
    residual = jnp.linalg.norm(z - project_to_simplex(z - gz))
    t_next = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
    # Gradient restart: drop the momentum when it points against the last step.
    restart = (y - z) @ (z - x) > 0
    y_next = jnp.where(restart, z, z + ((t - 1.0) / t_next) * (z - x))
    t_next = jnp.where(restart, jnp.ones_like(t), t_next)
    # Let the step grow again after a cautious phase (the estimate only doubles otherwise).
    return z, y_next, t_next, 0.9 * lipschitz, i + 1, residual

  x0 = project_to_simplex(x0)
  one = jnp.ones([], dtype)
  carry = (x0, x0, one, one, jnp.zeros([], jnp.int32), jnp.array(jnp.inf, dtype))
  x, _, _, _, iterations, residual = jax.lax.while_loop(cond, body, carry)
  return SolverResult(x, iterations, residual <= tol, residual)


@full_precision
def power_balance(gram: jax.Array, alpha: float = 1.0, x0: jax.Array | None = None, *,
                  max_iters: int = 50, tol: float = 1e-9) -> SolverResult:
  """Solves G w = w ** (-1 / alpha) for w > 0 (Nash-MTL for alpha = 1, FairGrad).

  The system is the stationarity condition of the strictly convex problem
  min_{w > 0} 1/2 w^T G w - sum_i h(w_i), with h(w) = log w (alpha = 1) or
  w^(1 - 1/alpha) / (1 - 1/alpha), so it is solved by damped Newton steps (Armijo
  backtracking, steps kept inside w > 0). Each step is solved in relative coordinates,
  (W H W) y = -W grad with W = diag(w) and the step W y: the Hessian H = G + diag(h'')
  has entries from 1 to 1e16 when the weights span 1e-8 to 1e4 (nearly opposite tasks of
  different scales), W H W does not. G is first divided by its Frobenius norm s (as
  Nash-MTL's authors do); the solution of the scaled system maps back to the original one
  as w = s^(-alpha / (alpha + 1)) * w_scaled. Hand-written (see the module docstring): the
  authors call cvxpy and SciPy on the CPU.

  Tolerance: stops when every |w_i^(1/alpha) (G w)_i - 1|, the elementwise relative
  residual of the system, is at most `tol` above its own rounding error (a few ulps of
  w_i^(1/alpha) (|G| w)_i, at most sqrt(eps)). Near the solution a step is accepted when it
  halves the residual, since the objective's change is then below its own rounding. The
  residual bounds the relative error of w: the Jacobian of
  the system in relative coordinates is (1/alpha) I + diag(w^(1/alpha)) G W, whose
  eigenvalues are at least 1/alpha, so ||dw / w|| <= alpha sqrt(cond W) ||residual||
  (for Nash-MTL, ||dw / w|| <= ||residual||). Non-convergence: the system has no solution
  when some w >= 0, w != 0 has G w = 0 (e.g. a zero gradient or two exactly opposite
  ones: the objective is unbounded below), and Newton may also run out of iterations; then
  `converged=False` and `x` is the last iterate, which callers should not use (Nash-MTL
  and FairGrad fall back to their previous weights).

  Args:
    gram: (k, k) Gram matrix of the task gradients.
    alpha: the exponent (alpha = 1 is Nash-MTL's G w = 1 / w).
    x0: optional warm start (k,) in the scale of the original system (e.g. the previous
      step's weights); ignored where not finite and positive.
    max_iters: bound on the Newton iterations.
    tol: tolerance on the relative residual, above rounding.

  Returns:
    A `SolverResult` with `x` the weights (k,) and `residual` the final relative residual
    (`NONFINITE_RESIDUAL` where the iterate is not finite).

  References:
    Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022; Ban, Ji, "Fair
    Resource Allocation in Multi-Task Learning", ICML 2024.
  """
  if alpha <= 0:
    raise ValueError(f"alpha must be positive, got {alpha}.")
  k = gram.shape[0]
  dtype = gram.dtype
  eps = jnp.finfo(dtype).eps
  scale = jnp.maximum(jnp.linalg.norm(gram), jnp.finfo(dtype).tiny)
  g = gram / scale
  inv = 1.0 / alpha
  back = scale ** (-alpha / (alpha + 1.0))

  def objective(w):
    h = jnp.log(w) if alpha == 1 else w ** (1.0 - inv) / (1.0 - inv)
    return 0.5 * w @ (g @ w) - jnp.sum(h)

  def residuals(w):
    power = w ** inv
    residual = jnp.abs(power * (g @ w) - 1.0)
    rounding = 2 * k * eps * (power * (jnp.abs(g) @ w) + 1.0)
    return residual, rounding

  def solved(w):
    # The rounding allowance is capped at sqrt(eps): beyond it (G w)_i is mostly
    # cancellation, as when w grows along a null vector of G where no solution exists.
    residual, rounding = residuals(w)
    allowed = tol + jnp.minimum(rounding, jnp.sqrt(eps))
    return jnp.all(residual <= allowed) & jnp.all(jnp.isfinite(w) & (w > 0))

  # Start on the ray t * 1, where the scalar equation has a closed form.
  mean_gram = jnp.sum(g) / k
  t = jnp.where(mean_gram > 0, jnp.abs(mean_gram), 1.0) ** (-alpha / (alpha + 1.0))
  start = jnp.full((k,), t, dtype)
  if x0 is not None:
    warm = x0.astype(dtype) / back
    start = jnp.where(jnp.all(jnp.isfinite(warm) & (warm > 0)), warm, start)

  # A zero gradient (G_ii = 0) leaves (G w)_i = 0 for every w: no solution, no iterations.
  hopeless = jnp.any(jnp.diagonal(g) <= 0)

  def cond(c):
    w, i = c
    return (i < max_iters) & ~solved(w) & ~hopeless & jnp.all(jnp.isfinite(w))

  def body(c):
    w, i = c
    grad = g @ w - w ** (-inv)
    relative_hessian = w[:, None] * g * w[None, :] + jnp.diag(inv * w ** (1.0 - inv))
    direction = -w * jnp.linalg.solve(relative_hessian, w * grad)
    # Largest step keeping w > 0 (fraction to the boundary), then Armijo backtracking.
    ratios = jnp.where(direction < 0, -w / jnp.where(direction < 0, direction, -1.0), jnp.inf)
    step0 = jnp.minimum(1.0, 0.99 * jnp.min(ratios))
    f0 = objective(w)
    decrease = grad @ direction
    r0 = jnp.max(residuals(w)[0])
    # Rounding slack: near the solution the decrease falls below float precision of f.
    slack = 16 * eps * (jnp.abs(f0) + 1.0)

    def ls_cond(s):
      # Armijo on the objective, or, near the solution, where the objective's change is
      # below its rounding (a sum with cancellations), a halved residual.
      step, n = s
      trial = w + step * direction
      bound = f0 + 0.25 * step * decrease + slack
      accepted = (objective(trial) <= bound) | (jnp.max(residuals(trial)[0]) <= 0.5 * r0)
      return ~accepted & (n < 40)

    step, _ = jax.lax.while_loop(ls_cond, lambda s: (0.5 * s[0], s[1] + 1),
                                 (step0.astype(dtype), 0))
    return w + step * direction, i + 1

  w, iterations = jax.lax.while_loop(cond, body, (start, jnp.zeros([], jnp.int32)))
  residual, _ = residuals(w)
  # Finite also where the iterate is not (no solution): the methods keep it in their state,
  # whose finiteness the train step checks.
  residual = jnp.where(jnp.all(jnp.isfinite(residual)), jnp.max(residual), NONFINITE_RESIDUAL)
  return SolverResult(w * back, iterations, solved(w), residual)


@full_precision
def nonnegative_qp(gram: jax.Array, linear: jax.Array, *, max_iters: int = 100,
                   tol: float = 1e-9) -> SolverResult:
  """Solves min_z 1/2 z^T G z + c^T z subject to z >= 0, for a positive definite G.

  A primal active-set method (Lawson & Hanson's NNLS iteration written on the normal
  equations), hand-written (see the module docstring; torchjd calls quadprog on the CPU):
  starting from z = 0, it frees the coordinate whose partial derivative is most negative,
  solves the equality-constrained problem on the free coordinates exactly (one
  k x k linear solve with the fixed coordinates masked out, diagonally equilibrated), and,
  when that solution leaves the orthant, moves back along the segment to the first
  coordinate that hits zero and fixes it. Each iteration either frees a coordinate or
  fixes one; on small problems (k tasks) it ends after about k iterations with the exact
  solution, up to rounding.

  Tolerance: stops at a solution of the free problem inside the orthant where no fixed
  coordinate has a partial derivative (G z + c)_j below -tol times the size of the terms
  it is made of, (|G| z + |c|)_j, beyond rounding: the KKT conditions, relative to the
  solution's own scale. `residual` is the largest violation in that relative measure:
  -(G z + c)_j on the coordinates at 0, |(G z + c)_j| on the others, each divided by
  (|G| z + |c|)_j. Non-convergence: after `max_iters` iterations the last iterate, always
  feasible (z >= 0), is returned with `converged=False`.

  Args:
    gram: (k, k) symmetric positive definite matrix (add a ridge to a Gram matrix).
    linear: (k,) linear term c.
    max_iters: iteration bound.
    tol: relative tolerance on the KKT conditions (above rounding).

  Returns:
    A `SolverResult` with `x` the solution z (k,) and `residual` the relative KKT residual.

  References:
    Lawson, Hanson, "Solving Least Squares Problems", Prentice-Hall 1974, chapter 23.
  """
  k = gram.shape[0]
  dtype = gram.dtype
  eps = jnp.finfo(dtype).eps
  tiny = jnp.finfo(dtype).tiny
  scaling = _equilibration(gram)
  scaled = gram * scaling[:, None] * scaling[None, :]
  eye = jnp.eye(k, dtype=dtype)
  linear = linear.astype(dtype)

  rounding = 2 * k * eps  # of a derivative relative to the terms it is made of

  def kkt(z):
    """(relative derivatives (G z + c)_j / size_j, sizes (|G| z + |c|)_j)."""
    size = jnp.abs(gram) @ jnp.abs(z) + jnp.abs(linear)
    return (gram @ z + linear) / jnp.maximum(size, tiny), size

  def residual_of(z):
    relative, size = kkt(z)
    complementarity = jnp.where(z > 0, jnp.abs(relative), 0.0)
    dual = jnp.where(z > 0, 0.0, jnp.maximum(-relative, 0.0))
    return jnp.max(jnp.where(size > 0, jnp.maximum(complementarity, dual), 0.0))

  def optimal(z, free):
    relative, _ = kkt(z)
    return jnp.all(jnp.where(free, True, relative >= -(tol + rounding)))

  def free_solution(free):
    both = free[:, None] & free[None, :]
    system = jnp.where(both, scaled, eye)
    solution = jnp.linalg.solve(system, jnp.where(free, -linear * scaling, 0.0))
    return jnp.where(free, solution * scaling, 0.0)

  def cond(c):
    _, _, i, done = c
    return (i < max_iters) & ~done

  def body(c):
    z, free, i, _ = c
    s = free_solution(free)
    inside = jnp.all(jnp.where(free, s > 0, True)) & jnp.all(jnp.isfinite(s))
    done = inside & optimal(s, free)
    # s is optimal on its face: free the coordinate with the most negative derivative.
    relative, _ = kkt(s)
    candidates = jnp.where(free, jnp.inf, relative)
    t = jnp.argmin(candidates)
    free_added = free.at[t].set(True)
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
    free = jnp.where(inside, jnp.where(done, free, free_added), free_back)
    return z, free, i + 1, done

  z0 = jnp.zeros((k,), dtype)
  z, free, iterations, done = jax.lax.while_loop(
      cond, body, (z0, jnp.zeros((k,), bool), jnp.zeros([], jnp.int32), optimal(z0, z0 > 0)))
  return SolverResult(z, iterations, done & jnp.all(jnp.isfinite(z)), residual_of(z))
