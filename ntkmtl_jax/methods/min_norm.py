"""The min-norm family: weights on the simplex from a small problem on the Gram matrix.

MGDA takes the minimum-norm point of the convex hull of the task gradients (MGDA-UB the
same on the gradients with respect to the shared representation); CAGrad and IMGrad move
from the mean gradient toward a min-norm-type direction within a ball; SDMGrad regularises
MGDA's problem toward the mean gradient; MoCo runs MGDA's problem one step at a time on
tracked (momentum) gradients. All but MoCo read only the k x k Gram matrix
G_ij = <g_i, g_j> (`Needs("gram")`), so the train step can use the "streaming" strategy
and one weighted backward pass; MoCo keeps a copy of the task gradients in its state
(a `GradientRule`).

Every solver is jnp code with a fixed iteration bound (see `solvers`), at full matmul
precision; each state records the weights applied to the shared task gradients, the
number of conflicting pairs (negative off-diagonal entries of G) and, for iterative
methods, the iterations used and how many steps the solver ended without meeting its
tolerance. Defaults follow the code the published tables were produced with (e.g. CAGrad
multiplies the update by k "to match the sum loss"); every such convention is an argument.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ntkmtl_jax import _tree
from ntkmtl_jax._tree import SharedSpec
from ntkmtl_jax.methods import register, solvers
from ntkmtl_jax.methods._common import (EPS, SolverState, check_losses, check_num_tasks,
                                        check_solver_budget, conflicting_pairs, full_precision,
                                        gram_of, initial_state, normalized)
from ntkmtl_jax.method import GradientRule, Needs, TaskStats, Weighting

_MGDA_NORMALIZATIONS = ("none", "l2", "loss", "loss+")
_CAGRAD_RESCALES = (0, 1, 2)
_IMGRAD_VARIANTS = ("paper", "code")

# ----------------------------------------------------------------------------------- MGDA


def _mgda(name, needs, num_tasks, normalization, scale_by_num_tasks, solver, max_iters, tol,
          shared, head_gradients) -> Weighting:
  """MGDA's weighting on the Gram matrix that `needs` names (see `mgda` and `mgda_ub`)."""
  check_num_tasks(num_tasks)
  if solver not in solvers.MIN_NORM_METHODS:
    raise ValueError(f"solver must be one of {solvers.MIN_NORM_METHODS}, got {solver!r}.")
  if normalization not in _MGDA_NORMALIZATIONS:
    raise ValueError(f"normalization must be one of {_MGDA_NORMALIZATIONS}, got "
                     f"{normalization!r}.")
  check_solver_budget(max_iters, tol)

  @full_precision
  def weights(stats: TaskStats, state: SolverState):
    if stats.gram is None and needs.uses_representation:
      raise ValueError(
          f"{name} needs the Gram matrix of the task gradients with respect to the shared "
          "representation: give make_train_step encode= and decode=, or call "
          "method.update(task_grads, state, params, gram=representation_gram) in your own "
          "step, or use 'mgda' for the parameter-gradient Gram.")
    gram = gram_of(stats, name, num_tasks)
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    if normalization == "none":
      scale = jnp.ones_like(norms)
    elif normalization == "l2":
      scale = norms
    else:
      check_losses(stats, f"{name} with normalization={normalization!r}", num_tasks)
      scale = stats.losses.astype(gram.dtype)
      if normalization == "loss+":
        scale = scale * norms
    scale = scale + EPS
    result = solvers.min_norm_point(gram / jnp.outer(scale, scale), method=solver,
                                    max_iters=max_iters, tol=tol)
    # As in the reference code, the weights found for the normalised gradients multiply
    # the raw task gradients (losses).
    w = result.x * (num_tasks if scale_by_num_tasks else 1.0)
    return w, SolverState(
        count=state.count + 1, weights=w.astype(jnp.float32),
        conflicts=conflicting_pairs(gram), iterations=result.iterations,
        solver_failures=state.solver_failures + (~result.converged).astype(jnp.int32))

  init = lambda params: initial_state(SolverState, num_tasks)
  return Weighting(name=name, needs=needs, init=init, weights=weights, shared=shared,
                   head_gradients=head_gradients,
                   hparams=dict(normalization=normalization,
                                scale_by_num_tasks=scale_by_num_tasks, solver=solver))


@register("mgda", properties=("permutation_equivariant", "non_conflicting"))
def mgda(num_tasks: int, *, normalization: str = "none", scale_by_num_tasks: bool = True,
         solver: str = "active_set", max_iters: int = 500, tol: float = 1e-6,
         shared: SharedSpec = None, head_gradients: str = "weighted") -> Weighting:
  """MGDA: the minimum-norm point of the convex hull of the task gradients.

  The weights w on the simplex minimise ||sum_i w_i g_i||^2, found exactly from the Gram
  matrix by Wolfe's active-set method (`solvers.min_norm_point`). The reference code
  (Sener & Koltun's MinNormSolver, also in the NTKMTL and Nash-MTL repositories) runs
  Frank-Wolfe and stops on a duality gap relative to the largest squared task norm, which
  leaves the direction off by a cosine of 0.5-0.8 when task scales differ by 1e3 and more;
  the exact solver is the default here and Frank-Wolfe an option (`solver`), stopped on the
  same relative certificate. The reference code multiplies the weights by k so that they
  sum to k (`scale_by_num_tasks`), and chooses them for the gradients divided by a
  normaliser (`normalization`: "none", the default there; "l2", the norm; "loss", the loss;
  "loss+", loss times norm) while applying them to the raw gradients.

  Args:
    num_tasks: k.
    normalization: gradient normaliser used to choose the weights.
    scale_by_num_tasks: multiply the weights by k, as the reference code does.
    solver: "active_set" (exact, the default), "frank_wolfe" (pairwise Frank-Wolfe, the
      reference's kind of solver) or "projected_gradient"; see `solvers.min_norm_point`.
    max_iters: the solver's iteration bound.
    tol: the relative error of the direction that the solver's stopping test certifies
      (`solvers.certified_error`); past the bound the iterate is used and the step counted
      in `SolverState.solver_failures`.
    shared: which parameters are shared: None (all), a pytree of bools or a function.
    head_gradients: "weighted" (the backward of the weighted loss, as the reference code)
      or "sum".

  Returns:
    A `Weighting` (needs "gram") with state `SolverState`.

  References:
    Sener, Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018.
  """
  return _mgda("mgda", Needs("gram"), num_tasks, normalization, scale_by_num_tasks, solver,
               max_iters, tol, shared, head_gradients)


@register("mgda_ub", properties=("permutation_equivariant", "non_conflicting"))
def mgda_ub(num_tasks: int, *, normalization: str = "none", scale_by_num_tasks: bool = True,
            solver: str = "active_set", max_iters: int = 500, tol: float = 1e-6,
            shared: SharedSpec = None, head_gradients: str = "weighted") -> Weighting:
  """MGDA-UB: MGDA with the Gram matrix of the gradients w.r.t. the shared representation.

  Sener & Koltun's upper bound: the min-norm weights are computed from the task gradients
  d l_i / d z of the shared representation z (k backward passes through the heads only),
  then applied to the losses (one ordinary backward pass). Its `update` takes that Gram
  matrix as the extra argument `gram=` (required: computing it from the parameter
  gradients would silently give plain MGDA):

    update, state = method.update(task_grads, state, params, gram=representation_gram)

  It needs `Needs("representation_gram")`: `make_train_step` (given `encode` and
  `decode`) builds that Gram from k backward passes through the heads, then runs one
  weighted backward pass.

  Args:
    num_tasks: k.
    normalization: as in `mgda`.
    scale_by_num_tasks: as in `mgda`.
    solver: as in `mgda`.
    max_iters: as in `mgda`.
    tol: as in `mgda`.
    shared: which parameters are shared: None (all), a pytree of bools or a function.
    head_gradients: "weighted" (the backward of the weighted loss, as the reference code)
      or "sum".

  Returns:
    A `Weighting` with state `SolverState`.

  References:
    Sener, Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018,
    Section 3.3.
  """
  return _mgda("mgda_ub", Needs("representation_gram"), num_tasks, normalization,
               scale_by_num_tasks, solver, max_iters, tol, shared, head_gradients)


# --------------------------------------------------------------------------------- CAGrad


def _rescale_factor(rescale, c):
  return {0: 1.0, 1: 1.0 / (1.0 + c * c), 2: 1.0 / (1.0 + c)}[rescale]


def cagrad_weights(gram: jax.Array, c: float, *, max_iters: int = 500, tol: float = 1e-6
                   ) -> tuple[jax.Array, solvers.SolverResult]:
  """CAGrad's update d = g0 + c ||g0|| / ||g_w|| g_w as coefficients of the task gradients.

  g0 is the mean gradient; w on the simplex minimises g_w^T g0 + c ||g0|| ||g_w||, the dual
  of max_d min_i <g_i, d> subject to ||d - g0|| <= c ||g0||, solved exactly
  (`solvers.min_linear_plus_norm`). Where g_w = 0 is optimal (the hull reaches 0 and no
  task gains from leaving g0), d = g0. Returns the coefficients (1/k + lambda w_i) (no
  rescaling) and the solver's result.
  """
  k = gram.shape[0]
  a = normalized(gram)
  mean = jnp.full((k,), 1.0 / k, a.dtype)
  a_mean = a @ mean
  radius = c * jnp.sqrt(jnp.maximum(mean @ a_mean, 0.0))
  result = solvers.min_linear_plus_norm(a, a_mean, radius, max_iters=max_iters, tol=tol)
  return mean + _toward(a, result.x, radius), result


def _toward(a: jax.Array, w: jax.Array, radius: jax.Array) -> jax.Array:
  """radius * w / ||g_w|| (the step from g0 to the ball's boundary along g_w), 0 where
  g_w = 0."""
  norm = jnp.sqrt(jnp.maximum(w @ (a @ w), 0.0))
  return jnp.where(norm > 0, radius / jnp.where(norm > 0, norm, 1.0), 0.0) * w


@register("cagrad", properties=("permutation_equivariant",))
def cagrad(num_tasks: int, *, c: float = 0.4, rescale: int = 1,
           scale_by_num_tasks: bool = True, max_iters: int = 500, tol: float = 1e-6,
           shared: SharedSpec = None, head_gradients: str = "sum") -> Weighting:
  """CAGrad: the update maximising the worst task improvement near the mean gradient.

  d = g0 + c ||g0|| / ||g_w|| g_w (see `cagrad_weights`), its problem solved exactly on the
  Gram matrix (`solvers.min_linear_plus_norm`), where the reference code (the Nash-MTL,
  FAMO and NTKMTL repositories' CAGrad) calls SciPy's SLSQP from w = 1/k on the raw Gram
  matrix with sqrt(w^T G w + 1e-8): on imbalanced tasks that call returns its starting
  point (an objective 335 times the optimum on task scales 1 to 1000, in the NTKMTL
  repository). No 1e-8 is added here: on a Gram matrix normalised to unit mean diagonal,
  ||g_w||^2 at the optimum is 1e-5 to 1e-6 on imbalanced tasks, and the 1e-8 moves the
  answer by 1e-4 relative. The reference code then divides d by 1 + c^2 (`rescale=1`; 0:
  no rescaling, 2: divide by 1 + c) and multiplies it by k "to match the sum loss"
  (`scale_by_num_tasks`); both are on by default, as in the runs behind the published
  tables.

  Args:
    num_tasks: k.
    c: the radius of the ball around g0, relative to ||g0|| (0.4 in the tables).
    rescale: 0, 1 or 2 as above.
    scale_by_num_tasks: multiply the update by k.
    max_iters: bound on the solver's root-finding steps and on each of its inner solves.
    tol: the inner solves' certified relative error (the duality gap is asked to be below
      tol^2); where the solver does not converge the iterate is used and the step counted
      in `SolverState.solver_failures`.
    shared: which parameters are shared.
    head_gradients: "sum" (task-specific parameters get their plain gradients, as the
      reference code) or "weighted".

  Returns:
    A `Weighting` (needs "gram") with state `SolverState`.

  References:
    Liu, Liu, Jin, Stone, Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
    NeurIPS 2021.
  """
  check_num_tasks(num_tasks)
  if c < 0:
    raise ValueError(f"c must be non-negative, got {c}.")
  if rescale not in _CAGRAD_RESCALES:
    raise ValueError(f"rescale must be one of {_CAGRAD_RESCALES}, got {rescale!r}.")
  factor = _rescale_factor(rescale, c) * (num_tasks if scale_by_num_tasks else 1.0)

  @full_precision
  def weighting(stats: TaskStats, state: SolverState):
    gram = gram_of(stats, "cagrad", num_tasks)
    weights, result = cagrad_weights(gram, c, max_iters=max_iters, tol=tol)
    weights = weights * factor
    return weights, SolverState(
        state.count + 1, weights.astype(jnp.float32), conflicting_pairs(gram),
        result.iterations, state.solver_failures + (~result.converged).astype(jnp.int32))

  init = lambda params: initial_state(SolverState, num_tasks)
  return Weighting(name="cagrad", needs=Needs("gram"), init=init, weights=weighting,
                   shared=shared, head_gradients=head_gradients,
                   hparams=dict(c=c, rescale=rescale, scale_by_num_tasks=scale_by_num_tasks))


# --------------------------------------------------------------------------------- IMGrad


class IMGradState(NamedTuple):
  """State of `imgrad`.

  Attributes:
    count: number of updates made.
    weights: the last coefficients of the task gradients in the update.
    conflicts: conflicting pairs (G_ij < 0, i < j) at the last step.
    cosine: cos(theta) between the mean gradient and the MGDA direction at the last step.
    iterations: iterations of the sub-problem's solver at the last step (for the code
      variant, its root-finding steps).
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
  [0, 1], since <g_m, g_i> >= ||g_m||^2 for every i; 0 where g_m = 0 to working precision,
  `solvers.norm_rounding`, where its direction is rounding). w on the simplex
  minimises (1 - mu) g_w^T g0 + mu c ||g0|| ||g_w||^2 (the paper's Eq. 11,
  `variant="paper"`: a quadratic problem, `solvers.simplex_qp`) or
  (1.5 - mu) g_w^T g0 + mu c ||g0|| ||g_w|| (the authors' code, `variant="code"`: CAGrad's
  problem, `solvers.min_linear_plus_norm`, without the code's 1e-8 under the root), both
  exactly, on the Gram matrix normalised to unit mean diagonal: Eq. 11 adds a term of
  degree 2 in the gradients to one of degree 3, so its answer depends on their scale, and
  the normalisation fixes one (a common rescaling of the losses changes nothing; the code
  variant is homogeneous anyway). The code's mu divides by ||g_m|| ||g0|| + 1e-8, which
  moves mu by 10 % when g_m is small on a normalised Gram (nearly opposite tasks); here the
  quotient is exact.

  Returns:
    (coefficients (k,) without rescaling, mu, sub-problem `SolverResult`, min-norm
    `SolverResult`).
  """
  k = gram.shape[0]
  a = normalized(gram)
  mean = jnp.full((k,), 1.0 / k, a.dtype)
  a_mean = a @ mean
  g0_norm = jnp.sqrt(jnp.maximum(mean @ a_mean, 0.0))
  min_norm = solvers.min_norm_point(a, max_iters=max_iters, tol=tol)
  wm = min_norm.x
  gm_norm = jnp.sqrt(jnp.maximum(wm @ (a @ wm), 0.0))
  denominator = gm_norm * g0_norm
  # A g_m whose squared norm is below its rounding is 0 to working precision (a hull
  # through 0): its direction, and mu, are noise there.
  resolved = (gm_norm ** 2 > solvers.norm_rounding(a, wm)) & (denominator > 0)
  mu = jnp.clip(jnp.where(resolved, (wm @ a_mean) / jnp.where(resolved, denominator, 1.0),
                          0.0), 0.0, 1.0)
  radius = c * g0_norm
  if variant == "paper":
    result = solvers.simplex_qp(mu * radius * a, 0.5 * (1.0 - mu) * a_mean,
                                max_iters=max_iters, tol=tol)
  else:
    result = solvers.min_linear_plus_norm(a, (1.5 - mu) * a_mean, mu * radius,
                                          max_iters=max_iters, tol=tol)
  return mean + _toward(a, result.x, radius), mu, result, min_norm


@register("imgrad", properties=("permutation_equivariant",))
def imgrad(num_tasks: int, *, c: float = 0.8, variant: str = "paper",
           rescale: int | None = None, scale_by_num_tasks: bool | None = None,
           max_iters: int = 500, tol: float = 1e-6, shared: SharedSpec = None,
           head_gradients: str = "sum") -> Weighting:
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
    tol: the relative error the min-norm and sub-problem solvers certify (see `solvers`).
    shared: which parameters are shared.
    head_gradients: "sum" (task-specific parameters get their plain gradients) or
      "weighted".

  Returns:
    A `Weighting` (needs "gram") with state `IMGradState`.

  References:
    Zhou et al., "Injecting Imbalance Sensitivity for Multi-Task Learning", IJCAI 2025
    (arXiv 2503.08006).
  """
  check_num_tasks(num_tasks)
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

  @full_precision
  def weighting(stats: TaskStats, state: IMGradState):
    gram = gram_of(stats, "imgrad", num_tasks)
    weights, mu, result, min_norm = imgrad_weights(gram, c, variant, max_iters=max_iters,
                                                   tol=tol)
    weights = weights * factor
    failed = ~(result.converged & min_norm.converged)
    return weights, IMGradState(state.count + 1, weights.astype(jnp.float32),
                                conflicting_pairs(gram), mu.astype(jnp.float32),
                                result.iterations,
                                state.solver_failures + failed.astype(jnp.int32))

  init = lambda params: initial_state(IMGradState, num_tasks,
                                      cosine=jnp.zeros([], jnp.float32))
  return Weighting(name="imgrad", needs=Needs("gram"), init=init, weights=weighting,
                   shared=shared, head_gradients=head_gradients,
                   hparams=dict(c=c, variant=variant, rescale=rescale,
                                scale_by_num_tasks=scale_by_num_tasks))


# -------------------------------------------------------------------------------- SDMGrad


class SDMGradState(NamedTuple):
  """State of `sdmgrad`.

  Attributes:
    count: number of updates made.
    weights: the last coefficients of the task gradients in the update.
    conflicts: conflicting pairs (G_ij < 0, i < j) at the last step.
    simplex_weights: the weights w on the simplex, carried to warm-start the next step.
    solver_failures: steps so far whose exact solve (`solver="exact"`) did not converge;
      always 0 for the authors' iteration, which has no stopping test.
  """
  count: jax.Array
  weights: jax.Array
  conflicts: jax.Array
  simplex_weights: jax.Array
  solver_failures: jax.Array


@full_precision
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


_SDMGRAD_SOLVERS = ("authors", "exact")


@register("sdmgrad", properties=("permutation_equivariant",))
def sdmgrad(num_tasks: int, *, lamda: float = 0.3, num_iters: int = 20,
            learning_rate: float = 10.0, momentum: float = 0.5, solver: str = "authors",
            scale_by_num_tasks: bool = False, shared: SharedSpec = None,
            head_gradients: str = "sum") -> Weighting:
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
  `solver="exact"` solves the sub-problem instead, the min-norm point of the shifted
  gradients g_i + lamda g0 (`solvers.simplex_qp`, Wolfe's active-set method), so that w is
  a function of G alone; the default stays the authors' iteration, which is the method as
  published (its w carries over from step to step like MoCo's).

  Args:
    num_tasks: k.
    lamda: the regularisation strength toward the mean gradient (0.3, LibMTL's default,
      from the authors' implementation).
    num_iters: projected steps per update.
    learning_rate: their step size.
    momentum: their momentum.
    solver: "authors" (the iteration above) or "exact" (the sub-problem's minimiser;
      `num_iters`, `learning_rate` and `momentum` are then unused).
    scale_by_num_tasks: multiply the update by k (off: the authors' update is on the
      scale of the mean gradient).
    shared: which parameters are shared.
    head_gradients: "sum" (task-specific parameters get their plain gradients) or
      "weighted".

  Returns:
    A `Weighting` (needs "gram") with state `SDMGradState`.

  References:
    Xiao, Ban, Ji, "Direction-oriented Multi-objective Learning: Simple and Provable
    Stochastic Algorithms", NeurIPS 2023.
  """
  check_num_tasks(num_tasks)
  if lamda < 0 or num_iters < 1 or learning_rate <= 0 or not 0 <= momentum < 1:
    raise ValueError("sdmgrad: need lamda >= 0, num_iters >= 1, learning_rate > 0 and "
                     f"momentum in [0, 1); got {lamda}, {num_iters}, {learning_rate}, "
                     f"{momentum}.")
  if solver not in _SDMGRAD_SOLVERS:
    raise ValueError(f"solver must be one of {_SDMGRAD_SOLVERS}, got {solver!r}.")
  factor = float(num_tasks) if scale_by_num_tasks else 1.0

  @full_precision
  def weighting(stats: TaskStats, state: SDMGradState):
    gram = gram_of(stats, "sdmgrad", num_tasks)
    if solver == "exact":
      a = normalized(gram)
      result = solvers.simplex_qp(a, lamda * jnp.mean(a, axis=1))
      w, failed = result.x, ~result.converged
    else:
      w = sdmgrad_simplex_weights(gram, state.simplex_weights, lamda, num_iters=num_iters,
                                  learning_rate=learning_rate, momentum=momentum)
      failed = jnp.zeros([], bool)
    weights = factor * (w + lamda / num_tasks) / (1.0 + lamda)
    return weights, SDMGradState(state.count + 1, weights.astype(jnp.float32),
                                 conflicting_pairs(gram), w.astype(jnp.float32),
                                 state.solver_failures + failed.astype(jnp.int32))

  init = lambda params: initial_state(
      SDMGradState, num_tasks,
      simplex_weights=jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32))
  return Weighting(name="sdmgrad", needs=Needs("gram"), init=init, weights=weighting,
                   shared=shared, head_gradients=head_gradients,
                   hparams=dict(lamda=lamda, num_iters=num_iters, solver=solver,
                                scale_by_num_tasks=scale_by_num_tasks))


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


@register("moco", properties=("permutation_equivariant",))
def moco(num_tasks: int, *, beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1,
         gamma_sigma: float = 0.5, rho: float = 0.0, simplex_map: str = "softmax",
         shared: SharedSpec = None, head_gradients: str = "sum") -> GradientRule:
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
    beta: step size of the tracking variables.
    beta_sigma: its decay exponent.
    gamma: step size of the weights.
    gamma_sigma: its decay exponent.
    rho: ridge in the weights' objective.
    simplex_map: "softmax" or "projection".
    shared: which parameters are shared.
    head_gradients: "sum" (task-specific parameters get their plain gradients, as the
      reference implementation) or "weighted" (weighted by lambda).

  Returns:
    A `GradientRule` (needs "gradients", takes `losses=`) with state `MoCoState`.

  References:
    Fernando, Shen, Liu, Chaudhury, Murugesan, Chen, "Mitigating Gradient Bias in
    Multi-objective Learning: A Provably Convergent Approach", ICLR 2023. Defaults of
    LibMTL's implementation (Lin, Zhang, "LibMTL", JMLR 2023), from the authors' code.
  """
  check_num_tasks(num_tasks)
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
    return initial_state(MoCoState, num_tasks,
                         weights=jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32),
                         tracking=jnp.zeros((num_tasks, size), dtype))

  @full_precision
  def rule(matrix, state: MoCoState, stats: TaskStats):
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

  return GradientRule(name="moco", init=init, rule=rule, shared=shared,
                      head_gradients=head_gradients,
                      hparams=dict(beta=beta, gamma=gamma, simplex_map=simplex_map))
