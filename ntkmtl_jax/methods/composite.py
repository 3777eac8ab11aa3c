"""Loss transforms composed with a method: the method runs on transformed task losses.

A transform maps each loss l_i to phi_i(l_i) with d phi_i / d l_i = s_i > 0, so the task
gradients of the transformed losses are s_i g_i: the Gram matrix becomes diag(s) G diag(s),
the squared norms s_i^2 ||g_i||^2. The inner method chooses weights w' for the transformed
gradients, and the update sum_i w'_i s_i g_i is the raw gradients' weighted sum with
w_i = w'_i s_i, so the composite needs exactly what the inner method needs (a Gram method
stays a Gram method and runs with the streaming strategies) and costs nothing more.

- `log_losses(method)`: phi_i = log(l_i + eps), s_i = 1 / (l_i + eps); the authors' log_mgda,
  log_cagrad and log_imtl (the NTKMTL repository's `methods/weight_methods.py`) are MGDA,
  CAGrad and IMTL-G on log losses, which makes them invariant to each loss's scale.
- IMTL-L: phi_i = e^{s_i} l_i - s_i with learned scales s_i (`imtl_l` is LS on it), and the
  IMTL paper's hybrid `imtl`, IMTL-G on the same scaled losses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ntkmtl_jax._tree import SharedSpec
from ntkmtl_jax.methods import register
from ntkmtl_jax.methods._common import (check_losses, check_num_tasks, method_optimizer,
                                        zeros_int)
from ntkmtl_jax.methods.alignment import imtl_g
from ntkmtl_jax.methods.loss_weighting import linear_scalarization
from ntkmtl_jax.methods.min_norm import cagrad, mgda
from ntkmtl_jax.method import GradientRule, Method, TaskStats, Weighting


@dataclasses.dataclass(frozen=True)
class LossTransform:
  """A per-task, increasing transform of the losses, possibly with learned state.

  Attributes:
    name: what it is called in messages.
    init: `init(num_tasks) -> state`.
    apply: `apply(losses, state) -> (slopes s (k,), transformed losses (k,), new_state)`,
      where s_i = d phi_i / d l_i > 0 at the losses; the new state is for the next step.
  """
  name: str
  init: Callable[[int], Any]
  apply: Callable[[jax.Array, Any], tuple[jax.Array, jax.Array, Any]]


class ComposedState(NamedTuple):
  """State of a method on transformed losses.

  Attributes:
    count: steps taken.
    weights: the last weights applied to the raw task gradients (w'_i s_i).
    solver_failures: the inner method's count of failed solves (0 if it has none).
    transform: the transform's state.
    inner: the inner method's state.
  """
  count: jax.Array
  weights: jax.Array
  solver_failures: jax.Array
  transform: Any
  inner: Any


def _scaled_stats(stats: TaskStats, slopes: jax.Array, losses: jax.Array) -> TaskStats:
  """The statistics of the transformed losses: task gradients s_i g_i."""
  sq = slopes**2
  return stats._replace(
      losses=losses,
      sq_norms=None if stats.sq_norms is None else stats.sq_norms * sq,
      gram=None if stats.gram is None else slopes[:, None] * stats.gram * slopes[None, :],
      eigenvalues=None if stats.eigenvalues is None else stats.eigenvalues * sq)


def compose(transform: LossTransform, method: Method, num_tasks: int, *, name: str,
            normalize: bool = False) -> Method:
  """`method` run on the losses transformed by `transform` (see the module docstring).

  Args:
    transform: the loss transform.
    method: a `Weighting` or `GradientRule` built for `num_tasks` tasks.
    num_tasks: k.
    name: the composite's name.
    normalize: rescale the raw weights w'_i s_i to sum to 1 (the authors' log_mgda).

  Returns:
    A method of the same kind and needs as `method`, with state `ComposedState`.
  """
  check_num_tasks(num_tasks)

  def init(params):
    return ComposedState(zeros_int(), jnp.ones(num_tasks, jnp.float32), zeros_int(),
                         transform.init(num_tasks), method.init(params))

  def transformed(stats: TaskStats, state: ComposedState):
    check_losses(stats, name, num_tasks)
    slopes, losses, transform_state = transform.apply(stats.losses, state.transform)
    return slopes.astype(stats.losses.dtype), losses.astype(stats.losses.dtype), transform_state

  def new_state(state, weights, transform_state, inner_state):
    failures = getattr(inner_state, "solver_failures", zeros_int())
    return ComposedState(state.count + 1, weights.astype(jnp.float32),
                         jnp.asarray(failures, jnp.int32), transform_state, inner_state)

  def raw(inner_weights, slopes):
    w = inner_weights * slopes
    if not normalize:
      return w, 1.0
    total = jnp.sum(w)
    factor = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 1.0)
    return w * factor, factor

  if isinstance(method, Weighting):

    def weighting(stats: TaskStats, state: ComposedState):
      slopes, losses, transform_state = transformed(stats, state)
      inner_weights, inner_state = method.weights(_scaled_stats(stats, slopes, losses),
                                                  state.inner)
      w, _ = raw(inner_weights, slopes)
      return w, new_state(state, w, transform_state, inner_state)

    return dataclasses.replace(method, name=name, init=init, weights=weighting)

  if isinstance(method, GradientRule):

    def rule(matrix: jax.Array, state: ComposedState, stats: TaskStats):
      slopes, losses, transform_state = transformed(stats, state)
      direction, inner_weights, inner_state = method.rule(
          matrix * slopes[:, None].astype(matrix.dtype), state.inner,
          stats._replace(losses=losses))
      w, factor = raw(inner_weights, slopes)
      return (direction * factor, w, new_state(state, w, transform_state, inner_state))

    return dataclasses.replace(method, name=name, init=init, rule=rule)
  raise TypeError(f"{name}: expected a Weighting or a GradientRule, got {method!r}.")


# -------------------------------------------------------------------------------- log losses


def log_transform(eps: float) -> LossTransform:
  """phi_i = log(l_i + eps), slope 1 / (l_i + eps)."""

  def apply(losses, state):
    shifted = losses + eps
    return 1.0 / shifted, jnp.log(shifted), state

  return LossTransform("log", lambda num_tasks: zeros_int(), apply)


def log_losses(method: Method, num_tasks: int, *, eps: float = 1e-8, normalize: bool = False,
               name: str | None = None) -> Method:
  """`method` on the log losses log(l_i + eps): task gradients g_i / (l_i + eps).

  Composes with any method; the weights it applies to the raw gradients are the inner
  method's divided by l_i + eps. Multiplying a loss by c leaves its log loss's gradient
  unchanged, so the update does not depend on the losses' scales (up to eps).

  Args:
    method: the method to run on the log losses, built for `num_tasks` tasks.
    num_tasks: k.
    eps: added to the losses before the log.
    normalize: rescale the applied weights to sum to 1.
    name: the composite's name (default "log_" + the method's).

  Returns:
    A method with the inner method's kind and needs and state `ComposedState`.
  """
  if not eps >= 0:
    raise ValueError(f"eps must be non-negative, got {eps!r}.")
  return compose(log_transform(eps), method, num_tasks, name=name or f"log_{method.name}",
                 normalize=normalize)


@register("log_mgda", properties={"permutation_equivariant": {}, "non_conflicting": {},
                                  "direction_scale_invariant": {"eps": 0.0}})
def log_mgda(num_tasks: int, *, eps: float = 1e-8, normalization: str = "none",
             solver: str = "active_set", max_iters: int = 500, tol: float = 1e-6,
             shared: SharedSpec = None, head_gradients: str = "weighted") -> Weighting:
  """log-MGDA: MGDA's min-norm weights on the gradients of log(l_i + eps).

  As the authors' `LOG_MGDA`: the min-norm point w' of the hull of g_i / (l_i + 1e-8)
  (summing to 1, not scaled by k), then the loss sum_i w'_i log(l_i + eps) / c with
  c = sum_i w'_i / (l_i + eps), whose gradient applies w_i = w'_i / ((l_i + eps) c) to the
  raw gradients: weights that sum to 1. MGDA's min-norm point is solved exactly here
  (see `mgda`; the authors run Frank-Wolfe). The update conflicts with no task (each log
  gradient is a positive multiple of g_i) and its direction does not depend on the losses'
  scales (exactly when eps = 0).

  Args:
    num_tasks: k.
    eps: added to the losses before the log (the authors' 1e-8).
    normalization: the gradient normaliser of `mgda` ("none", as theirs).
    solver: `mgda`'s min-norm solver.
    max_iters: the solver's iteration bound.
    tol: the solver's certified relative error.
    shared: which parameters are shared.
    head_gradients: "weighted" (the backward pass of the weighted log loss, as theirs) or
      "sum".

  Returns:
    A `Weighting` (needs "gram") with state `ComposedState`.

  References:
    Sener, Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018; the
    log variant from the NTKMTL repository (Qin et al., NeurIPS 2025).
  """
  inner = mgda(num_tasks, normalization=normalization, scale_by_num_tasks=False, solver=solver,
               max_iters=max_iters, tol=tol, shared=shared, head_gradients=head_gradients)
  return log_losses(inner, num_tasks, eps=eps, normalize=True, name="log_mgda")


@register("log_cagrad", properties=("permutation_equivariant", "scale_invariant"))
def log_cagrad(num_tasks: int, *, eps: float = 0.0, c: float = 0.4, rescale: int = 1,
               scale_by_num_tasks: bool = True, max_iters: int = 500, tol: float = 1e-6,
               shared: SharedSpec = None, head_gradients: str = "sum") -> Weighting:
  """log-CAGrad: CAGrad on the gradients g_i / l_i of the log losses.

  As the authors' `LOG_CAGrad`: CAGrad (c = 0.4, the update divided by 1 + c^2 and
  multiplied by k) on the gradients of log l_i (no eps there: `eps=0`), so the update does
  not depend on the losses' scales. CAGrad's problem is solved exactly (see `cagrad`; their
  SLSQP call can return its start). Two differences: their task-specific parameters get the
  sum of the log-loss gradients, sum_i g_i / l_i, while `head_gradients="sum"` here gives
  them sum_i g_i (a `Weighting` applies one set of weights to the shared parameters and
  either those or ones to the heads); and their `backward` clips the shared gradient's norm
  to 1, which here is `clip_shared_by_global_norm(1.0, shared)` chained after the method.

  Args:
    num_tasks: k.
    eps: added to the losses before the log.
    c: CAGrad's radius relative to ||g0|| (0.4).
    rescale: `cagrad`'s 0, 1 (divide by 1 + c^2) or 2.
    scale_by_num_tasks: multiply the update by k.
    max_iters: bound on `cagrad`'s solver steps.
    tol: `cagrad`'s solver tolerance.
    shared: which parameters are shared.
    head_gradients: "sum" or "weighted".

  Returns:
    A `Weighting` (needs "gram") with state `ComposedState`.

  References:
    Liu, Liu, Jin, Stone, Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
    NeurIPS 2021; the log variant from the NTKMTL repository.
  """
  inner = cagrad(num_tasks, c=c, rescale=rescale, scale_by_num_tasks=scale_by_num_tasks,
                 max_iters=max_iters, tol=tol, shared=shared, head_gradients=head_gradients)
  return log_losses(inner, num_tasks, eps=eps, name="log_cagrad")


@register("log_imtl", properties=("permutation_equivariant",))
def log_imtl(num_tasks: int, *, eps: float = 1e-8, shared: SharedSpec = None,
             head_gradients: str = "weighted") -> Weighting:
  """log-IMTL: IMTL-G's closed form on the gradients of log(l_i + eps).

  As the authors' `LOG_IMTLG` (registered there as "log_imtl"): IMTL-G's weights alpha for
  the gradients g_i / (l_i + 1e-8), then the loss sum_i alpha_i log(l_i + eps), i.e. weights
  alpha_i / (l_i + eps) on the raw gradients. Where IMTL-G's linear system is regular the
  update does not depend on the losses' scales (exactly when eps = 0); it is not claimed for
  the registry's property suite, whose duplicated tasks (parallel log gradients) make that
  system singular and the answer a ridge's.

  Args:
    num_tasks: k.
    eps: added to the losses before the log (the authors' 1e-8).
    shared: which parameters are shared.
    head_gradients: "weighted" (as theirs) or "sum".

  Returns:
    A `Weighting` (needs "gram") with state `ComposedState`.

  References:
    Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021; the log variant from the
    NTKMTL repository.
  """
  inner = imtl_g(num_tasks, shared=shared, head_gradients=head_gradients)
  return log_losses(inner, num_tasks, eps=eps, name="log_imtl")


# ------------------------------------------------------------------------------------ IMTL


class LossScaleState(NamedTuple):
  """State of IMTL-L's transform: the log-scales s_i and the state of their optimiser."""
  log_scales: jax.Array
  optimizer_state: optax.OptState


def loss_scale_transform(optimizer: optax.GradientTransformation) -> LossTransform:
  """IMTL-L's phi_i = e^{s_i} l_i - s_i; the s_i take a step of `optimizer` each step.

  The slope is e^{s_i}; d phi_i / d s_i = e^{s_i} l_i - 1, so the s_i settle where every
  scaled loss e^{s_i} l_i is 1. A step uses the s_i from before its own update.
  """

  def init(num_tasks):
    s = jnp.zeros(num_tasks, jnp.float32)
    return LossScaleState(s, optimizer.init(s))

  def apply(losses, state: LossScaleState):
    s = state.log_scales
    scale = jnp.exp(s)
    grad = scale * losses.astype(jnp.float32) - 1.0
    updates, opt_state = optimizer.update(grad, state.optimizer_state, s)
    new_s = optax.apply_updates(s, updates).astype(jnp.float32)
    return scale, scale * losses - s, LossScaleState(new_s, opt_state)

  return LossTransform("loss_scale", init, apply)


@register("imtl_l", properties=("permutation_equivariant",))
def imtl_l(num_tasks: int, *, learning_rate: float = 0.025,
           optimizer: optax.GradientTransformation | None = None,
           shared: SharedSpec = None) -> Weighting:
  """IMTL-L: learned loss scales, the objective sum_i (e^{s_i} l_i - s_i).

  The model's update is sum_i e^{s_i} g_i; each s_i follows the gradient e^{s_i} l_i - 1 of
  the same objective, so the scaled losses are driven to 1. A weighting cannot change the
  model's parameters, so the s_i live in the state with their own optimiser: by default
  Adam with learning rate 0.025, as this library's UW (IMTL-L is UW with s -> -s and twice
  the weights, as torchjd notes; with Adam the two give weights e^{s_i} = 2 * UW's).
  LibMTL and torchjd train the s_i with the model's optimiser; the paper gives no rate of
  its own.

  Args:
    num_tasks: number of tasks k.
    learning_rate: Adam's learning rate for the s_i (ignored when `optimizer` is given).
    optimizer: any optax transformation for the s_i instead of Adam.
    shared: which parameters are shared (None: all).

  Returns:
    A `Weighting` (needs "losses") with state `ComposedState`.

  References:
    Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, "Towards Impartial Multi-task Learning",
    ICLR 2021; torchjd's `scalarization.IMTLL`.
  """
  transform = loss_scale_transform(method_optimizer(optimizer, learning_rate))
  method = compose(transform, linear_scalarization(num_tasks, shared=shared), num_tasks,
                   name="imtl_l")
  return dataclasses.replace(method, hparams=dict(learning_rate=learning_rate))


@register("imtl", properties=("permutation_equivariant",))
def imtl(num_tasks: int, *, learning_rate: float = 0.025,
         optimizer: optax.GradientTransformation | None = None, shared: SharedSpec = None,
         head_gradients: str = "weighted") -> Weighting:
  """IMTL: the IMTL paper's hybrid, IMTL-G's closed form on IMTL-L's scaled losses.

  The gradients of the scaled losses e^{s_i} l_i - s_i are e^{s_i} g_i; IMTL-G's weights
  alpha for them (equal projections of the update on every unit gradient, alpha summing to
  1) give the update sum_i alpha_i e^{s_i} g_i, and the s_i learn as in `imtl_l`. As
  LibMTL's `IMTL`. One difference: there the task-specific parameters get e^{s_i} times
  their gradients (the per-task backward passes), which a `Weighting` cannot express; here
  they get alpha_i e^{s_i} g_i ("weighted") or g_i ("sum"). The authors' NTKMTL repository
  registers IMTL-G alone under the name "imtl" (here `imtl_g`).

  Args:
    num_tasks: number of tasks k.
    learning_rate: as `imtl_l`'s, for the s_i.
    optimizer: as `imtl_l`'s.
    shared: which parameters are shared (None: all).
    head_gradients: "weighted" or "sum".

  Returns:
    A `Weighting` (needs "gram") with state `ComposedState`.

  References:
    Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021.
  """
  transform = loss_scale_transform(method_optimizer(optimizer, learning_rate))
  inner = imtl_g(num_tasks, shared=shared, head_gradients=head_gradients)
  method = compose(transform, inner, num_tasks, name="imtl")
  return dataclasses.replace(method, hparams=dict(learning_rate=learning_rate))
