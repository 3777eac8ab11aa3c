"""Small solvers on the k x k Gram matrix of task gradients, in pure jnp, jittable.

Hand-written because no dependency solves these problems on device inside a jitted step:
the reference codes call SciPy, cvxpy or quadprog on the CPU; optax ships the simplex
projection (used here, `optax.projections.projection_simplex`) but no constrained solver;
jaxopt, which had projected gradient and box-constrained QP solvers, is no longer
developed. So: Frank-Wolfe and accelerated projected gradient on the simplex, damped
Newton for the Nash-MTL / FairGrad systems, and an active-set method for the non-negative
QP of the dual-cone methods. All trace their products at full precision
(`_common.full_precision`), wherever they are called from.

Every solver runs a `lax.while_loop` with a fixed iteration bound, so a step always
finishes in bounded time on any backend, and reports what happened in a `SolverResult`
(the iterate, the iterations used, whether the stopping test passed, and the value of the
stopping measure). What a method does with an unconverged result is the method's choice and
is documented there: the Frank-Wolfe and projected-gradient iterates are always feasible
points of the simplex, usable as they are; the Newton solver for the Nash-MTL / FairGrad
systems may not have a solution at all (e.g. two exactly opposite gradients), and its callers
fall back to their previous weights.

The problems are small (k is the number of tasks), so each iteration costs O(k^2) (O(k^3)
for Newton), negligible next to the k backward passes that produced the Gram matrix.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

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
  return projections.projection_simplex(v, total)


MIN_NORM_METHODS = ("frank_wolfe", "projected_gradient")


@full_precision
def min_norm_point(gram: jax.Array, *, method: str = "frank_wolfe", max_iters: int = 500,
                   tol: float = 1e-6, init: jax.Array | None = None) -> SolverResult:
  """Minimum-norm point of the convex hull of k vectors, from their Gram matrix.

  Finds w on the simplex minimising w^T G w = ||sum_i w_i g_i||^2. Hand-written (see the
  module docstring): no library minimises over the simplex on device.

  - "frank_wolfe" (default; MGDA's solver): pairwise Frank-Wolfe with exact line search,
    each iteration moving weight from the active vertex with the largest gradient (G w)_i
    to the one with the smallest. Plain Frank-Wolfe (Sener & Koltun's MinNormSolver)
    zig-zags at O(1/t); the pairwise steps converge linearly on a polytope, but slow down
    when the hull (nearly) contains 0 or G is rank deficient (more tasks than gradient
    dimensions). Stops when the relative duality gap (below) is at most `tol`.
  - "projected_gradient": `simplex_minimize` on w^T G w / (2 max_i G_ii), stopping on its
    gradient mapping; more accurate in those degenerate cases, at about the same cost.

  Whatever the method, `residual` is the relative duality gap
  r = (w^T G w - min_i (G w)_i) / max_i G_ii, a certificate: the squared norm exceeds the
  optimum by at most 2 r max_i G_ii, and the direction d = sum_i w_i g_i is within
  sqrt(2 r max_i G_ii) of the minimum-norm point d*, since ||d||^2 >= ||d*||^2 +
  ||d - d*||^2 on the hull. Non-convergence: after `max_iters` iterations the last iterate,
  always a point of the simplex, is returned with `converged=False`.

  Args:
    gram: (k, k) symmetric positive semi-definite matrix.
    method: "frank_wolfe" or "projected_gradient".
    max_iters: iteration bound.
    tol: tolerance of the method's stopping test.
    init: optional starting point on the simplex (default: uniform weights).

  Returns:
    A `SolverResult` whose `x` are the weights (k,) and `residual` the relative duality gap.

  References:
    Sener, Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018;
    Lacoste-Julien, Jaggi, "On the Global Linear Convergence of Frank-Wolfe Optimization
    Variants", NeurIPS 2015.
  """
  if method not in MIN_NORM_METHODS:
    raise ValueError(f"method must be one of {MIN_NORM_METHODS}, got {method!r}.")
  k = gram.shape[0]
  dtype = gram.dtype
  scale = jnp.maximum(jnp.max(jnp.diagonal(gram)), jnp.finfo(dtype).tiny)
  w0 = jnp.full((k,), 1.0 / k, dtype) if init is None else init.astype(dtype)

  def gap_of(w):
    grad = gram @ w
    return (w @ grad - jnp.min(grad)) / scale

  if method == "projected_gradient":
    normalized = gram / scale
    result = simplex_minimize(lambda w: 0.5 * w @ (normalized @ w), w0, max_iters=max_iters,
                              tol=tol)
    return result._replace(residual=gap_of(result.x))

  def cond(carry):
    _, i, gap = carry
    return (i < max_iters) & ~(gap <= tol)

  def body(carry):
    w, i, _ = carry
    grad = gram @ w
    toward = jnp.argmin(grad)
    away = jnp.argmax(jnp.where(w > 0, grad, -jnp.inf))
    curvature = gram[toward, toward] + gram[away, away] - 2.0 * gram[toward, away]
    slope = grad[away] - grad[toward]
    # The exact minimiser along e_toward - e_away, capped by the weight the away vertex has.
    step = jnp.where(curvature > 0, slope / jnp.where(curvature > 0, curvature, 1.0), w[away])
    step = jnp.clip(step, 0.0, w[away])
    w = w.at[toward].add(step).at[away].add(-step)
    w = jnp.maximum(w, 0.0)
    return w, i + 1, gap_of(w)

  w, iterations, gap = jax.lax.while_loop(cond, body, (w0, jnp.zeros([], jnp.int32),
                                                       gap_of(w0)))
  return SolverResult(w, iterations, gap <= tol, gap)


@full_precision
def simplex_minimize(fun: Callable[[jax.Array], jax.Array], x0: jax.Array, *,
                     max_iters: int = 500, tol: float = 1e-6) -> SolverResult:
  """Minimises a smooth convex function over the probability simplex.

  Accelerated projected gradient (FISTA) with backtracking on the step size and the
  gradient-based adaptive restart; gradients by `jax.grad(fun)`, the projection by
  `project_to_simplex` (optax's). Hand-written: optax has the projection but no projected
  solver with a convergence test. Step sizes and restarts are decided from gradients only, never from
  differences of objective values, which near the optimum fall below float32 precision.

  Tolerance: stops when the unit-step gradient mapping ||x - P(x - grad f(x))|| (zero
  exactly at a minimiser) is at most `tol`; scale the objective so that its gradient is of
  order one (the callers normalise the Gram matrix by its mean diagonal). Non-convergence:
  after `max_iters` iterations the last iterate, always a point of the simplex, is
  returned with `converged=False`.

  Args:
    fun: the objective, jnp code of x (k,).
    x0: a starting point on the simplex.
    max_iters: iteration bound.
    tol: tolerance on the gradient mapping's norm.

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
    *_, i, residual = c
    return (i < max_iters) & ~(residual <= tol)

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
                  max_iters: int = 20, tol: float = 1e-4) -> SolverResult:
  """Solves G w = w ** (-1 / alpha) for w > 0 (Nash-MTL for alpha = 1, FairGrad).

  The system is the stationarity condition of the strictly convex problem
  min_{w > 0} 1/2 w^T G w - sum_i h(w_i), with h(w) = log w (alpha = 1) or
  w^(1 - 1/alpha) / (1 - 1/alpha), so it is solved by damped Newton steps (Armijo
  backtracking, steps kept inside w > 0). G is first divided by its Frobenius norm s (as
  Nash-MTL's authors do); the solution of the scaled system maps back to the original one
  as w = s^(-alpha / (alpha + 1)) * w_scaled. Hand-written (see the module docstring): the
  authors call cvxpy and SciPy on the CPU.

  Tolerance: stops when max_i |w_i^(1/alpha) (G w)_i - 1| <= tol, the elementwise relative
  residual of the system. Non-convergence: the system has no solution when some w >= 0,
  w != 0 has G w = 0 (e.g. two exactly opposite gradients: the objective is unbounded
  below), and Newton may also run out of iterations; then `converged=False` and `x` is the
  last iterate, which callers should not use (Nash-MTL and FairGrad fall back to their
  previous weights).

  Args:
    gram: (k, k) Gram matrix of the task gradients.
    alpha: the exponent (alpha = 1 is Nash-MTL's G w = 1 / w).
    x0: optional warm start (k,) in the scale of the original system (e.g. the previous
      step's weights); ignored where not finite and positive.
    max_iters: bound on the Newton iterations.
    tol: tolerance on the relative residual.

  Returns:
    A `SolverResult` with `x` the weights (k,) and `residual` the final relative residual.

  References:
    Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022; Ban, Ji, "Fair
    Resource Allocation in Multi-Task Learning", ICML 2024.
  """
  if alpha <= 0:
    raise ValueError(f"alpha must be positive, got {alpha}.")
  k = gram.shape[0]
  dtype = gram.dtype
  scale = jnp.maximum(jnp.linalg.norm(gram), jnp.finfo(dtype).tiny)
  g = gram / scale
  inv = 1.0 / alpha
  back = scale ** (-alpha / (alpha + 1.0))

  def objective(w):
    h = jnp.log(w) if alpha == 1 else w ** (1.0 - inv) / (1.0 - inv)
    return 0.5 * w @ (g @ w) - jnp.sum(h)

  def residual_of(w):
    return jnp.max(jnp.abs(w ** inv * (g @ w) - 1.0))

  # Start on the ray t * 1, where the scalar equation has a closed form.
  mean_gram = jnp.sum(g) / k
  t = jnp.where(mean_gram > 0, jnp.abs(mean_gram), 1.0) ** (-alpha / (alpha + 1.0))
  start = jnp.full((k,), t, dtype)
  if x0 is not None:
    warm = x0.astype(dtype) / back
    start = jnp.where(jnp.all(jnp.isfinite(warm) & (warm > 0)), warm, start)

  def cond(c):
    _, i, residual = c
    return (i < max_iters) & ~(residual <= tol)

  def body(c):
    w, i, _ = c
    grad = g @ w - w ** (-inv)
    hessian = g + jnp.diag(inv * w ** (-inv - 1.0))
    direction = -jnp.linalg.solve(hessian, grad)
    # Largest step keeping w > 0 (fraction to the boundary), then Armijo backtracking.
    ratios = jnp.where(direction < 0, -w / jnp.where(direction < 0, direction, -1.0), jnp.inf)
    step0 = jnp.minimum(1.0, 0.99 * jnp.min(ratios))
    f0 = objective(w)
    decrease = grad @ direction
    # Rounding slack: near the solution the decrease falls below float precision of f.
    slack = 16 * jnp.finfo(dtype).eps * (jnp.abs(f0) + 1.0)

    def ls_cond(s):
      step, n = s
      bound = f0 + 0.25 * step * decrease + slack
      return (objective(w + step * direction) > bound) & (n < 40)

    step, _ = jax.lax.while_loop(ls_cond, lambda s: (0.5 * s[0], s[1] + 1),
                                 (step0.astype(dtype), 0))
    w = w + step * direction
    return w, i + 1, residual_of(w)

  w, iterations, residual = jax.lax.while_loop(
      cond, body, (start, jnp.zeros([], jnp.int32), residual_of(start)))
  converged = (residual <= tol) & jnp.all(jnp.isfinite(w) & (w > 0))
  return SolverResult(w * back, iterations, converged, residual)


@full_precision
def nonnegative_qp(gram: jax.Array, linear: jax.Array, *, max_iters: int = 100,
                   tol: float = 1e-5) -> SolverResult:
  """Solves min_z 1/2 z^T G z + c^T z subject to z >= 0, for a positive definite G.

  A primal active-set method (Lawson & Hanson's NNLS iteration written on the normal
  equations), hand-written (see the module docstring; torchjd calls quadprog on the CPU):
  starting from z = 0, it frees the coordinate whose partial derivative is most negative,
  solves the equality-constrained problem on the free coordinates exactly (one
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
  return SolverResult(z, iterations, residual <= tol, residual)
