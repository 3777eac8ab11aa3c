"""Methods that combine the task gradients of the shared parameters.

All but GradDrop choose weights from the k x k Gram matrix G_ij = <g_i, g_j> of the shared
task gradients alone (`needs="gram"`), so the train step can run them with the "streaming"
strategy, which never holds the k gradients at once: the update is then one weighted
backward pass. GradDrop works coordinate by coordinate and needs the gradients themselves.

Every solver is jnp code with a fixed iteration bound (see `solvers`); each state records
the weights applied to the shared task gradients, the number of conflicting pairs (negative
off-diagonal entries of G) and, for iterative methods, the iterations used and how many
steps the solver ended without meeting its tolerance.

Defaults follow the code the published tables were produced with (the Nash-MTL / FAMO /
FairGrad family of trainers, which NTKMTL's code extends), including its scaling
conventions (e.g. CAGrad and FairGrad multiply the update by k "to match the sum loss") and
which head gradients each method gives the task-specific parameters; every such convention
is an argument.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from ntkmtl_jax._tree import SharedSpec
from ntkmtl_jax.aggregator import (TaskAggregator, TaskStats, _annotate, gradient_aggregator,
                                   weighted_aggregator)
from ntkmtl_jax.methods import register, solvers

# Added to norms before dividing by them (the reference implementations use 1e-8 too).
EPS = 1e-8

_MGDA_NORMALIZATIONS = ("none", "l2", "loss", "loss+")
_CAGRAD_RESCALES = (0, 1, 2)
_IMGRAD_VARIANTS = ("paper", "code")


def conflicting_pairs(gram: jax.Array) -> jax.Array:
  """Number of task pairs i < j whose gradients conflict (G_ij < 0), as int32."""
  k = gram.shape[0]
  upper = jnp.triu(jnp.ones((k, k), dtype=bool), 1)
  return jnp.sum((gram < 0) & upper).astype(jnp.int32)


def _normalized(gram: jax.Array) -> jax.Array:
  """G divided by its mean diagonal; the methods' weights do not depend on this scale."""
  scale = jnp.mean(jnp.diagonal(gram))
  return gram / jnp.maximum(scale, jnp.finfo(gram.dtype).tiny)


def _gram_of(stats: TaskStats, name: str, num_tasks: int) -> jax.Array:
  if stats.gram is None:
    raise ValueError(f"{name} computes its weights from the Gram matrix of the task "
                     "gradients: pass it as update(..., gram=gram) or let the aggregator "
                     "compute it from the task gradients.")
  if stats.gram.shape != (num_tasks, num_tasks):
    raise ValueError(f"{name} was built for {num_tasks} tasks, got a Gram matrix of shape "
                     f"{stats.gram.shape}.")
  return stats.gram


def _key_of(stats: TaskStats, name: str) -> jax.Array:
  if stats.key is None:
    raise ValueError(f"{name} is stochastic: pass a PRNG key as update(..., key=key) "
                     "(make_train_step passes one every step).")
  return stats.key


def _check_num_tasks(num_tasks):
  if not isinstance(num_tasks, int) or num_tasks < 1:
    raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}.")


def _zeros_int():
  return jnp.zeros([], jnp.int32)


# ----------------------------------------------------------------------------------- MGDA


class MGDAState(NamedTuple):
  """State of `mgda` and `mgda_ub`.

  Attributes:
    count: number of updates made.
    weights: the last weights applied to the task gradients.
    conflicts: conflicting pairs (G_ij < 0, i < j) at the last step.
    iterations: min-norm solver iterations at the last step.
    solver_failures: steps so far whose min-norm solver reached its iteration bound before
      its tolerance (the iterate, a point of the simplex, was used anyway).
  """
  count: jax.Array
  weights: jax.Array
  conflicts: jax.Array
  iterations: jax.Array
  solver_failures: jax.Array


def _mgda_init(num_tasks):
  return lambda params: MGDAState(_zeros_int(), jnp.ones(num_tasks, jnp.float32), _zeros_int(),
                                  _zeros_int(), _zeros_int())


def _mgda_weighting(name, num_tasks, normalization, scale_by_num_tasks, solver, max_iters,
                    tol):

  def weighting(stats: TaskStats, state: MGDAState):
    gram = _gram_of(stats, name, num_tasks)
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    if normalization == "none":
      scale = jnp.ones_like(norms)
    elif normalization == "l2":
      scale = norms
    else:
      if stats.losses is None:
        raise ValueError(f"{name} with normalization={normalization!r} needs the task "
                         "losses: pass update(..., losses=losses).")
      scale = stats.losses.astype(gram.dtype)
      if normalization == "loss+":
        scale = scale * norms
    scale = scale + EPS
    result = solvers.min_norm_point(gram / jnp.outer(scale, scale), method=solver,
                                    max_iters=max_iters, tol=tol)
    # As in the reference code, the weights found for the normalised gradients multiply
    # the raw task gradients (losses).
    weights = result.x * (num_tasks if scale_by_num_tasks else 1.0)
    return weights, MGDAState(
        count=state.count + 1, weights=weights.astype(jnp.float32),
        conflicts=conflicting_pairs(gram), iterations=result.iterations,
        solver_failures=state.solver_failures + (~result.converged).astype(jnp.int32))

  return weighting


def _check_mgda_args(normalization, solver, max_iters, tol):
  if solver not in solvers.MIN_NORM_METHODS:
    raise ValueError(f"solver must be one of {solvers.MIN_NORM_METHODS}, got {solver!r}.")
  if normalization not in _MGDA_NORMALIZATIONS:
    raise ValueError(f"normalization must be one of {_MGDA_NORMALIZATIONS}, got "
                     f"{normalization!r}.")
  if max_iters < 1 or tol <= 0:
    raise ValueError(f"max_iters must be >= 1 and tol > 0, got {max_iters} and {tol}.")


@register("mgda")
def mgda(num_tasks: int, *, normalization: str = "none", scale_by_num_tasks: bool = True,
         solver: str = "frank_wolfe", max_iters: int = 500, tol: float = 1e-6,
         shared: SharedSpec = None, head_gradients: str = "weighted") -> TaskAggregator:
  """MGDA: the minimum-norm point of the convex hull of the task gradients.

  The weights w on the simplex minimise ||sum_i w_i g_i||^2, found from the Gram matrix by
  pairwise Frank-Wolfe (`solvers.min_norm_point`). The reference code multiplies them by
  k so that they sum to k (`scale_by_num_tasks`), and chooses them for the gradients
  divided by a normaliser (`normalization`: "none", the default there; "l2", the norm;
  "loss", the loss; "loss+", loss times norm) while applying them to the raw gradients.

  Args:
    num_tasks: k.
    normalization: gradient normaliser used to choose the weights.
    scale_by_num_tasks: multiply the weights by k, as the reference code does.
    solver: "frank_wolfe" (pairwise Frank-Wolfe, the reference's kind of solver) or
      "projected_gradient" (more accurate when the hull nearly contains 0); see
      `solvers.min_norm_point`.
    max_iters: the solver's iteration bound.
    tol: the solver's tolerance (for Frank-Wolfe, on the duality gap relative to
      max_i G_ii); past the bound the iterate is used and the step counted in
      `MGDAState.solver_failures`.
    shared: which parameters are shared: None (all), a pytree of bools or a function.
    head_gradients: "weighted" (the backward of the weighted loss, as the reference code)
      or "sum".

  Returns:
    A `TaskAggregator` (needs "gram") with state `MGDAState`.

  References:
    Sener, Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018.
  """
  _check_num_tasks(num_tasks)
  _check_mgda_args(normalization, solver, max_iters, tol)
  return weighted_aggregator(
      "mgda", "gram",
      _mgda_weighting("mgda", num_tasks, normalization, scale_by_num_tasks, solver, max_iters,
                      tol),
      _mgda_init(num_tasks), shared=shared, head_gradients=head_gradients,
      normalization=normalization, scale_by_num_tasks=scale_by_num_tasks, solver=solver)


@register("mgda_ub")
def mgda_ub(num_tasks: int, *, normalization: str = "none", scale_by_num_tasks: bool = True,
            solver: str = "frank_wolfe", max_iters: int = 500, tol: float = 1e-6,
            shared: SharedSpec = None, head_gradients: str = "weighted") -> TaskAggregator:
  """MGDA-UB: MGDA with the Gram matrix of the gradients w.r.t. the shared representation.

  Sener & Koltun's upper bound: the min-norm weights are computed from the task gradients
  d l_i / d z of the shared representation z (k backward passes through the heads only),
  then applied to the losses (one ordinary backward pass). The aggregator takes that Gram
  matrix as the extra argument `gram=` (required: computing it from the parameter
  gradients would silently give plain MGDA):

    update, state = agg.update(task_grads, state, params, gram=representation_gram)

  It reports `needs="representation"`: `make_train_step` (given `encode` and `decode`)
  builds that Gram from k backward passes through the heads, then runs one weighted
  backward pass.

  Args:
    As `mgda`.

  Returns:
    A `TaskAggregator` with state `MGDAState`.

  References:
    Sener, Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018,
    Section 3.3.
  """
  _check_num_tasks(num_tasks)
  _check_mgda_args(normalization, solver, max_iters, tol)
  name = "mgda_ub"
  gram_weighting = _mgda_weighting(name, num_tasks, normalization, scale_by_num_tasks,
                                   solver, max_iters, tol)

  def weighting(stats: TaskStats, state: MGDAState):
    if stats.gram is None:
      raise ValueError(
          "mgda_ub needs the Gram matrix of the task gradients with respect to the shared "
          "representation: give make_train_step encode= and decode=, or call "
          "agg.update(task_grads, state, params, gram=representation_gram) in your own "
          "step, or use 'mgda' for the parameter-gradient Gram.")
    return gram_weighting(stats, state)

  base = weighted_aggregator(name, "gram", weighting, _mgda_init(num_tasks), shared=shared,
                             head_gradients=head_gradients, normalization=normalization,
                             scale_by_num_tasks=scale_by_num_tasks, solver=solver)

  def update_fn(task_grads, state, params=None, *, gram=None, **extra_args):
    if gram is None:
      weighting(TaskStats(), state)  # raises the explanation
    return base.update(task_grads, state, params, gram=gram, **extra_args)

  agg = TaskAggregator(base.init, update_fn)
  # `representation_statistic` tells a train step which statistic of the representation
  # gradients the weighting reads (NTKMTL-SR reads kernel eigenvalues).
  return _annotate(agg, name=name, needs="representation", weighting=weighting,
                   shared=shared, head_gradients=head_gradients, num_chunks=1,
                   options=dict(base.options, representation_statistic="gram"))


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


@register("pcgrad")
def pcgrad(num_tasks: int, *, reduction: str = "sum", shared: SharedSpec = None,
           head_gradients: str = "sum") -> TaskAggregator:
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
    A `TaskAggregator` (needs "gram", takes `key=`) with state `PCGradState`.

  References:
    Yu, Kumar, Gupta, Levine, Hausman, Finn, "Gradient Surgery for Multi-Task Learning",
    NeurIPS 2020.
  """
  _check_num_tasks(num_tasks)
  if reduction not in ("sum", "mean"):
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}.")

  def weighting(stats: TaskStats, state: PCGradState):
    gram = _gram_of(stats, "pcgrad", num_tasks)
    orders = pcgrad_orders(_key_of(stats, "pcgrad"), num_tasks)
    weights = jnp.sum(pcgrad_coefficients(gram, orders), axis=0)
    if reduction == "mean":
      weights = weights / num_tasks
    return weights, PCGradState(state.count + 1, weights.astype(jnp.float32),
                                conflicting_pairs(gram))

  init = lambda params: PCGradState(_zeros_int(), jnp.ones(num_tasks, jnp.float32),
                                    _zeros_int())
  return weighted_aggregator("pcgrad", "gram", weighting, init, shared=shared,
                             head_gradients=head_gradients, reduction=reduction)


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


@register("graddrop")
def graddrop(num_tasks: int, *, leak: float | Sequence[float] = 0.0,
             shared: SharedSpec = None, head_gradients: str = "sum") -> TaskAggregator:
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
    A `TaskAggregator` (needs "gradients", takes `key=`) with state `GradDropState`.

  References:
    Chen, Ngiam, Huang, Luong, Kretzschmar, Chai, Anguelov, "Just Pick a Sign: Optimizing
    Deep Multitask Models with Gradient Sign Dropout", NeurIPS 2020.
  """
  _check_num_tasks(num_tasks)
  leak_array = jnp.broadcast_to(jnp.asarray(leak, jnp.float32), (num_tasks,))
  if not bool(jnp.all((leak_array >= 0) & (leak_array <= 1))):
    raise ValueError(f"leak must lie in [0, 1], got {leak}.")

  def aggregate(matrix, state: GradDropState, stats: TaskStats):
    if matrix.shape[0] != num_tasks:
      raise ValueError(f"graddrop was built for {num_tasks} tasks, got {matrix.shape[0]}.")
    direction, keep = graddrop_direction(matrix, _key_of(stats, "graddrop"), leak_array)
    nonzero = matrix != 0
    kept = jnp.sum(keep, 1) / jnp.maximum(jnp.sum(nonzero, 1), 1)
    weights = jnp.ones(num_tasks, matrix.dtype)
    gram = matrix @ matrix.T
    return direction, weights, GradDropState(state.count + 1, weights.astype(jnp.float32),
                                             conflicting_pairs(gram),
                                             kept.astype(jnp.float32))

  init = lambda params: GradDropState(_zeros_int(), jnp.ones(num_tasks, jnp.float32),
                                      _zeros_int(), jnp.ones(num_tasks, jnp.float32))
  return gradient_aggregator("graddrop", init, aggregate, shared=shared,
                             head_gradients=head_gradients, leak=leak)


# --------------------------------------------------------------------------------- CAGrad


class CAGradState(NamedTuple):
  """State of `cagrad`.

  Attributes:
    count: number of updates made.
    weights: the last coefficients of the task gradients in the update (after rescaling).
    conflicts: conflicting pairs (G_ij < 0, i < j) at the last step.
    iterations: iterations of the simplex solver at the last step.
    solver_failures: steps so far whose simplex solver reached its iteration bound before
      its tolerance (the iterate, a point of the simplex, was used anyway).
  """
  count: jax.Array
  weights: jax.Array
  conflicts: jax.Array
  iterations: jax.Array
  solver_failures: jax.Array


def _rescale_factor(rescale, c):
  return {0: 1.0, 1: 1.0 / (1.0 + c * c), 2: 1.0 / (1.0 + c)}[rescale]


def cagrad_weights(gram: jax.Array, c: float, *, max_iters: int = 500, tol: float = 1e-6
                   ) -> tuple[jax.Array, solvers.SolverResult]:
  """CAGrad's update d = g0 + c ||g0|| / ||g_w|| g_w as coefficients of the task gradients.

  g0 is the mean gradient; w on the simplex minimises g_w^T g0 + c ||g0|| ||g_w||, the dual
  of max_d min_i <g_i, d> subject to ||d - g0|| <= c ||g0||. Returns the coefficients
  (1/k + lambda w_i) (no rescaling) and the simplex solver's result.
  """
  k = gram.shape[0]
  a = _normalized(gram)
  mean = jnp.full((k,), 1.0 / k, a.dtype)
  a_mean = a @ mean
  radius = c * jnp.sqrt(jnp.maximum(mean @ a_mean, 0.0))

  def objective(w):
    return w @ a_mean + radius * jnp.sqrt(jnp.maximum(w @ (a @ w), 0.0) + EPS)

  result = solvers.simplex_minimize(objective, mean, max_iters=max_iters, tol=tol)
  w = result.x
  gw_norm = jnp.sqrt(jnp.maximum(w @ (a @ w), 0.0))
  return mean + radius / (gw_norm + EPS) * w, result


@register("cagrad")
def cagrad(num_tasks: int, *, c: float = 0.4, rescale: int = 1,
           scale_by_num_tasks: bool = True, max_iters: int = 500, tol: float = 1e-6,
           shared: SharedSpec = None, head_gradients: str = "sum") -> TaskAggregator:
  """CAGrad: the update maximising the worst task improvement near the mean gradient.

  d = g0 + c ||g0|| / ||g_w|| g_w (see `cagrad_weights`), solved on the Gram matrix by
  accelerated projected gradient on the simplex (`solvers.simplex_minimize`, where the
  reference code calls SciPy's SLSQP). The reference code then divides d by 1 + c^2
  (`rescale=1`; 0: no rescaling, 2: divide by 1 + c) and multiplies it by k "to match the
  sum loss" (`scale_by_num_tasks`); both are on by default, as in the runs behind the
  published tables.

  Args:
    num_tasks: k.
    c: the radius of the ball around g0, relative to ||g0|| (0.4 in the tables).
    rescale: 0, 1 or 2 as above.
    scale_by_num_tasks: multiply the update by k.
    max_iters: bound on the simplex solver's iterations.
    tol: tolerance on its gradient mapping (on the Gram matrix divided by its mean
      diagonal); past the bound the iterate is used and the step counted in
      `CAGradState.solver_failures`.
    shared: which parameters are shared.
    head_gradients: "sum" (task-specific parameters get their plain gradients, as the
      reference code) or "weighted".

  Returns:
    A `TaskAggregator` (needs "gram") with state `CAGradState`.

  References:
    Liu, Liu, Jin, Stone, Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
    NeurIPS 2021.
  """
  _check_num_tasks(num_tasks)
  if c < 0:
    raise ValueError(f"c must be non-negative, got {c}.")
  if rescale not in _CAGRAD_RESCALES:
    raise ValueError(f"rescale must be one of {_CAGRAD_RESCALES}, got {rescale!r}.")
  factor = _rescale_factor(rescale, c) * (num_tasks if scale_by_num_tasks else 1.0)

  def weighting(stats: TaskStats, state: CAGradState):
    gram = _gram_of(stats, "cagrad", num_tasks)
    weights, result = cagrad_weights(gram, c, max_iters=max_iters, tol=tol)
    weights = weights * factor
    return weights, CAGradState(
        state.count + 1, weights.astype(jnp.float32), conflicting_pairs(gram),
        result.iterations, state.solver_failures + (~result.converged).astype(jnp.int32))

  init = lambda params: CAGradState(_zeros_int(), jnp.ones(num_tasks, jnp.float32),
                                    _zeros_int(), _zeros_int(), _zeros_int())
  return weighted_aggregator("cagrad", "gram", weighting, init, shared=shared,
                             head_gradients=head_gradients, c=c, rescale=rescale,
                             scale_by_num_tasks=scale_by_num_tasks)


# --------------------------------------------------------------------------------- IMTL-G


class IMTLGState(NamedTuple):
  """State of `imtl_g`.

  Attributes:
    count: number of updates made.
    weights: the last weights applied to the task gradients.
    conflicts: conflicting pairs (G_ij < 0, i < j) at the last step.
    solver_failures: steps so far whose linear system was singular (solved with a 1e-8
      ridge instead, as the reference code does).
  """
  count: jax.Array
  weights: jax.Array
  conflicts: jax.Array
  solver_failures: jax.Array


def imtl_g_weights(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
  """IMTL-G's closed form on the Gram matrix; returns (weights summing to 1, singular).

  With u_i = g_i / ||g_i||, D the rows g_1 - g_i and U the rows u_1 - u_i (i = 2..k), the
  weights are a_{2:k} = g_1 U^T (D U^T)^{-1}, a_1 = 1 - sum a_{2:k}; then d = sum a_i g_i
  has equal projections on every u_i. Every inner product is read off G.
  """
  k = gram.shape[0]
  if k == 1:
    return jnp.ones(1, gram.dtype), jnp.array(False)
  a = _normalized(gram)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(a), jnp.finfo(a.dtype).tiny))
  g_u = a / norms[None, :]  # g_u[i, j] = <g_i, u_j>
  first = g_u[0, 0] - g_u[0, 1:]  # <g_1, u_1 - u_j>
  # <g_1 - g_i, u_1 - u_j>
  system = (g_u[0, 0] - g_u[0, 1:][None, :] - g_u[1:, 0][:, None] + g_u[1:, 1:])
  rest = jnp.linalg.solve(system.T, first)
  singular = ~jnp.all(jnp.isfinite(rest))
  ridge = jnp.linalg.solve(system.T + EPS * jnp.eye(k - 1, dtype=a.dtype), first)
  rest = jnp.where(singular, ridge, rest)
  return jnp.concatenate([1.0 - jnp.sum(rest, keepdims=True), rest]), singular


@register("imtl_g")
def imtl_g(num_tasks: int, *, shared: SharedSpec = None,
           head_gradients: str = "weighted") -> TaskAggregator:
  """IMTL-G: the update whose projections on every unit task gradient are equal.

  Closed form (`imtl_g_weights`), weights summing to one, from the Gram matrix.

  Args:
    num_tasks: k.
    shared: which parameters are shared.
    head_gradients: "weighted" (the backward of the weighted loss, as the reference code)
      or "sum".

  Returns:
    A `TaskAggregator` (needs "gram") with state `IMTLGState`.

  References:
    Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, "Towards Impartial Multi-task Learning",
    ICLR 2021.
  """
  _check_num_tasks(num_tasks)

  def weighting(stats: TaskStats, state: IMTLGState):
    gram = _gram_of(stats, "imtl_g", num_tasks)
    weights, singular = imtl_g_weights(gram)
    return weights, IMTLGState(state.count + 1, weights.astype(jnp.float32),
                               conflicting_pairs(gram),
                               state.solver_failures + singular.astype(jnp.int32))

  init = lambda params: IMTLGState(_zeros_int(), jnp.ones(num_tasks, jnp.float32),
                                   _zeros_int(), _zeros_int())
  return weighted_aggregator("imtl_g", "gram", weighting, init, shared=shared,
                             head_gradients=head_gradients)


# ---------------------------------------------------------------------- Nash-MTL, FairGrad


class NashMTLState(NamedTuple):
  """State of `nash_mtl`.

  Attributes:
    count: number of updates made.
    weights: the weights in use (the last solution, or the previous weights after a
      failure or between updates when `update_weights_every > 1`).
    conflicts: conflicting pairs (G_ij < 0, i < j) at the last step.
    iterations: Newton iterations at the last solve.
    residual: max_i |a_i (G a)_i - 1| of the last solve's final iterate.
    solver_failures: solves so far that did not converge (previous weights kept).
  """
  count: jax.Array
  weights: jax.Array
  conflicts: jax.Array
  iterations: jax.Array
  residual: jax.Array
  solver_failures: jax.Array


class FairGradState(NamedTuple):
  """State of `fairgrad`; the fields are those of `NashMTLState` (residual:
  max_i |w_i^(1/alpha) (G w)_i - 1|), weights after the factor k when `scale_by_num_tasks`."""
  count: jax.Array
  weights: jax.Array
  conflicts: jax.Array
  iterations: jax.Array
  residual: jax.Array
  solver_failures: jax.Array


def _balance_weighting(name, state_cls, num_tasks, alpha, factor, every, max_iters, tol):

  def weighting(stats: TaskStats, state):
    gram = _gram_of(stats, name, num_tasks)
    previous = state.weights.astype(gram.dtype)
    # Warm start from the previous solution (not from the initial ones).
    warm = jnp.where(state.count > 0, previous / factor, jnp.nan)

    def solve(_):
      r = solvers.power_balance(gram, alpha, warm, max_iters=max_iters, tol=tol)
      weights = jnp.where(r.converged, r.x * factor, previous)
      return (weights, r.iterations, r.residual.astype(jnp.float32),
              (~r.converged).astype(jnp.int32))

    def reuse(_):
      return previous, _zeros_int(), state.residual, _zeros_int()

    if every == 1:
      weights, iterations, residual, failed = solve(None)
    else:
      weights, iterations, residual, failed = jax.lax.cond(state.count % every == 0, solve,
                                                           reuse, None)
    return weights, state_cls(state.count + 1, weights.astype(jnp.float32),
                              conflicting_pairs(gram), iterations, residual,
                              state.solver_failures + failed)

  return weighting


def _balance_init(state_cls, num_tasks):
  return lambda params: state_cls(_zeros_int(), jnp.ones(num_tasks, jnp.float32), _zeros_int(),
                                  _zeros_int(), jnp.zeros([], jnp.float32), _zeros_int())


@register("nash_mtl")
def nash_mtl(num_tasks: int, *, update_weights_every: int = 1, optim_niter: int = 20,
             tol: float = 1e-4, shared: SharedSpec = None,
             head_gradients: str = "weighted") -> TaskAggregator:
  """Nash-MTL: the Nash bargaining solution, weights a > 0 with G a = 1 / a.

  The authors approach the solution by `optim_niter` = 20 concave-convex steps, each a
  cvxpy/ECOS solve on the CPU; here the system is solved directly by damped Newton steps
  on its convex potential (`solvers.power_balance` with alpha = 1), at most `optim_niter`
  of them, inside the step. When the solve does not converge (the system has no solution
  when 0 is in the convex hull of the gradients, e.g. two opposite ones), the previous
  weights are kept, as the authors do, and the failure is counted in the state. The
  authors clip the shared update's global norm to 1 afterwards: chain
  `clip_shared_by_global_norm(1.0, shared)` after this aggregator.

  Args:
    num_tasks: k.
    update_weights_every: solve every this many steps, reuse the weights in between.
    optim_niter: bound on the Newton iterations.
    tol: tolerance on max_i |a_i (G a)_i - 1|.
    shared: which parameters are shared.
    head_gradients: "weighted" (the backward of the weighted loss, as the reference code)
      or "sum".

  Returns:
    A `TaskAggregator` (needs "gram") with state `NashMTLState`.

  References:
    Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya, "Multi-Task Learning as
    a Bargaining Game", ICML 2022.
  """
  _check_num_tasks(num_tasks)
  if update_weights_every < 1 or optim_niter < 1 or tol <= 0:
    raise ValueError("update_weights_every and optim_niter must be >= 1 and tol > 0, got "
                     f"{update_weights_every}, {optim_niter}, {tol}.")
  return weighted_aggregator(
      "nash_mtl", "gram",
      _balance_weighting("nash_mtl", NashMTLState, num_tasks, 1.0, 1.0, update_weights_every,
                         optim_niter, tol),
      _balance_init(NashMTLState, num_tasks), shared=shared, head_gradients=head_gradients,
      update_weights_every=update_weights_every, optim_niter=optim_niter)


@register("fairgrad")
def fairgrad(num_tasks: int, *, alpha: float = 2.0, scale_by_num_tasks: bool = True,
             max_iters: int = 20, tol: float = 1e-4, shared: SharedSpec = None,
             head_gradients: str = "sum") -> TaskAggregator:
  """FairGrad: alpha-fair weights w > 0 solving G w = w ** (-1 / alpha).

  The authors solve the system with SciPy's `least_squares` from w = 1/k; here damped
  Newton steps on its convex potential (`solvers.power_balance`) run inside the step. When
  the solve does not converge, the previous weights are kept and the failure counted. The
  reference code multiplies the update by k (`scale_by_num_tasks`) and gives task heads
  their plain gradients. alpha = 2 is what the authors' run scripts use (their argument
  parser defaults to 1, which is Nash-MTL's system).

  Args:
    num_tasks: k.
    alpha: the fairness exponent (1: proportional fairness, as Nash-MTL; large: max-min).
    scale_by_num_tasks: multiply the update by k.
    max_iters: bound on the Newton iterations.
    tol: tolerance on max_i |w_i^(1/alpha) (G w)_i - 1|.
    shared: which parameters are shared.
    head_gradients: "sum" (the reference code) or "weighted".

  Returns:
    A `TaskAggregator` (needs "gram") with state `FairGradState`.

  References:
    Ban, Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024.
  """
  _check_num_tasks(num_tasks)
  if alpha <= 0 or max_iters < 1 or tol <= 0:
    raise ValueError(f"alpha and tol must be positive and max_iters >= 1, got {alpha}, "
                     f"{tol}, {max_iters}.")
  factor = float(num_tasks) if scale_by_num_tasks else 1.0
  return weighted_aggregator(
      "fairgrad", "gram",
      _balance_weighting("fairgrad", FairGradState, num_tasks, float(alpha), factor, 1,
                         max_iters, tol),
      _balance_init(FairGradState, num_tasks), shared=shared, head_gradients=head_gradients,
      alpha=alpha, scale_by_num_tasks=scale_by_num_tasks)


# --------------------------------------------------------------------------------- IMGrad


class IMGradState(NamedTuple):
  """State of `imgrad`.

  Attributes:
    count: number of updates made.
    weights: the last coefficients of the task gradients in the update.
    conflicts: conflicting pairs (G_ij < 0, i < j) at the last step.
    cosine: cos(theta) between the mean gradient and the MGDA direction at the last step.
    iterations: iterations of the simplex solver at the last step.
    solver_failures: steps so far where the min-norm or the simplex solver reached its
      iteration bound before its tolerance (the iterates were used anyway).
  """
  count: jax.Array
  weights: jax.Array
  conflicts: jax.Array
  cosine: jax.Array
  iterations: jax.Array
  solver_failures: jax.Array


def imgrad_weights(gram: jax.Array, c: float, variant: str = "paper", *,
                   max_iters: int = 500, tol: float = 1e-6):
  """IMGrad's update g0 + c ||g0|| / ||g_w|| g_w as coefficients of the task gradients.

  mu = cos(theta) between the mean gradient g0 and the MGDA min-norm direction g_m (in
  [0, 1], since <g_m, g_i> >= ||g_m||^2 for every i). w on the simplex minimises
  (1 - mu) g_w^T g0 + mu c ||g0|| ||g_w||^2 (the paper's Eq. 11, `variant="paper"`) or
  (1.5 - mu) g_w^T g0 + mu c ||g0|| ||g_w|| (the authors' code, `variant="code"`).

  Returns:
    (coefficients (k,) without rescaling, mu, simplex `SolverResult`, min-norm
    `SolverResult`).
  """
  k = gram.shape[0]
  a = _normalized(gram)
  mean = jnp.full((k,), 1.0 / k, a.dtype)
  a_mean = a @ mean
  g0_norm = jnp.sqrt(jnp.maximum(mean @ a_mean, 0.0))
  min_norm = solvers.min_norm_point(a, max_iters=max_iters, tol=tol)
  wm = min_norm.x
  gm_norm = jnp.sqrt(jnp.maximum(wm @ (a @ wm), 0.0))
  mu = jnp.clip((wm @ a_mean) / (gm_norm * g0_norm + EPS), 0.0, 1.0)
  radius = c * g0_norm

  if variant == "paper":
    def objective(w):
      return (1.0 - mu) * (w @ a_mean) + mu * radius * (w @ (a @ w))
  else:
    def objective(w):
      return ((1.5 - mu) * (w @ a_mean)
              + mu * radius * jnp.sqrt(jnp.maximum(w @ (a @ w), 0.0) + EPS))

  result = solvers.simplex_minimize(objective, mean, max_iters=max_iters, tol=tol)
  w = result.x
  gw_norm = jnp.sqrt(jnp.maximum(w @ (a @ w), 0.0))
  return mean + radius / (gw_norm + EPS) * w, mu, result, min_norm


@register("imgrad")
def imgrad(num_tasks: int, *, c: float = 0.8, variant: str = "paper",
           rescale: int | None = None, scale_by_num_tasks: bool | None = None,
           max_iters: int = 500, tol: float = 1e-6, shared: SharedSpec = None,
           head_gradients: str = "sum") -> TaskAggregator:
  """IMGrad: CAGrad with a sub-problem that leans toward MGDA as tasks grow imbalanced.

  See `imgrad_weights`. `variant="paper"` (default) is the paper's Eq. 11 with the update
  d = g0 + c ||g0|| / ||g_w|| g_w as written; `variant="code"` is the authors' code: its
  objective, then d divided by 1 + c^2 and multiplied by k. `rescale` (as in `cagrad`) and
  `scale_by_num_tasks` override what the variant implies (paper: none; code: 1 and True).

  Args:
    num_tasks: k.
    c: radius relative to ||g0|| (0.8 in the authors' scripts).
    variant: "paper" or "code".
    rescale: 0, 1 or 2 as in `cagrad`, or None for the variant's.
    scale_by_num_tasks: multiply the update by k, or None for the variant's.
    max_iters: bound on each solver's iterations.
    tol: tolerance of the min-norm and simplex solvers (see `solvers`).
    shared: which parameters are shared.
    head_gradients: "sum" (task-specific parameters get their plain gradients) or
      "weighted".

  Returns:
    A `TaskAggregator` (needs "gram") with state `IMGradState`.

  References:
    Zhou et al., "Injecting Imbalance Sensitivity for Multi-Task Learning", IJCAI 2025
    (arXiv 2503.08006).
  """
  _check_num_tasks(num_tasks)
  if variant not in _IMGRAD_VARIANTS:
    raise ValueError(f"variant must be one of {_IMGRAD_VARIANTS}, got {variant!r}.")
  if c < 0:
    raise ValueError(f"c must be non-negative, got {c}.")
  if rescale is None:
    rescale = 1 if variant == "code" else 0
  if rescale not in _CAGRAD_RESCALES:
    raise ValueError(f"rescale must be one of {_CAGRAD_RESCALES} or None, got {rescale!r}.")
  if scale_by_num_tasks is None:
    scale_by_num_tasks = variant == "code"
  factor = _rescale_factor(rescale, c) * (num_tasks if scale_by_num_tasks else 1.0)

  def weighting(stats: TaskStats, state: IMGradState):
    gram = _gram_of(stats, "imgrad", num_tasks)
    weights, mu, result, min_norm = imgrad_weights(gram, c, variant, max_iters=max_iters,
                                                   tol=tol)
    weights = weights * factor
    failed = ~(result.converged & min_norm.converged)
    return weights, IMGradState(state.count + 1, weights.astype(jnp.float32),
                                conflicting_pairs(gram), mu.astype(jnp.float32),
                                result.iterations,
                                state.solver_failures + failed.astype(jnp.int32))

  init = lambda params: IMGradState(_zeros_int(), jnp.ones(num_tasks, jnp.float32),
                                    _zeros_int(), jnp.zeros([], jnp.float32), _zeros_int(),
                                    _zeros_int())
  return weighted_aggregator("imgrad", "gram", weighting, init, shared=shared,
                             head_gradients=head_gradients, c=c, variant=variant,
                             rescale=rescale, scale_by_num_tasks=scale_by_num_tasks)
