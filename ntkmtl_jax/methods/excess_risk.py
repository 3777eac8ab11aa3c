"""Excess-risk weighting from the task gradients: ExcessMTL.

ExcessMTL raises the weight of the tasks farthest from their own optimum, measured by an
estimate of each task's excess risk that needs every coordinate of every task gradient
(an AdaGrad-style diagonal curvature per task), so it is a `GradientRule`
(`Needs("gradients")`) whose state holds a k x P array: k times the shared parameters.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ntkmtl_jax import _tree
from ntkmtl_jax._tree import SharedSpec
from ntkmtl_jax.methods import register
from ntkmtl_jax.methods._common import check_num_tasks
from ntkmtl_jax.method import GradientRule, TaskStats


class ExcessMTLState(NamedTuple):
  """State of ExcessMTL.

  Attributes:
    count: steps taken.
    weights: the last weights (they sum to k).
    log_weights: their logarithms, for the multiplicative update.
    sq_grad_sum: (k, P) the sum over steps of each task gradient's squared entries.
    baseline: (k,) the first step's excess risks, which later ones are divided by.
  """
  count: jax.Array
  weights: jax.Array
  log_weights: jax.Array
  sq_grad_sum: jax.Array
  baseline: jax.Array


@register("excess_mtl", properties={"permutation_equivariant": {},
                                    "linear_under_scaling": {"eps": 0.0}})
def excess_mtl(num_tasks: int, *, robust_step_size: float = 1e-2, eps: float = 1e-7,
               shared: SharedSpec = None) -> GradientRule:
  """ExcessMTL: exponentiated-gradient task weights driven by estimated excess risks.

  Each step, with S_i the running sum of g_i's squared entries (g_i included) and
  h_i = sqrt(S_i + eps), the excess risk of task i is estimated as
  e_i = sum_p g_ip^2 / h_ip (g_i^T H_i^{-1} g_i with AdaGrad's diagonal H_i, the paper's
  Eqs. 6-7). The first step records e as the baseline and keeps the weights at 1; later
  steps update w_i <- w_i exp(eta e_i / e_i(first)) and renormalise the weights to sum to k
  (Eq. 9), then the update is sum_i w_i g_i. As LibMTL's `ExcessMTL` (weights start at 1,
  step size 1e-2 in its configuration); torchjd starts from 1/k on the simplex, updates at
  the first step too with step size 1, and can average a warm-up's excess risks for the
  baseline (the paper's appendix uses three epochs). The update is computed in log space
  (w = k softmax(log w)), which cannot overflow.

  Memory: the state holds a k x P array (P the shared parameters).

  Args:
    num_tasks: number of tasks k.
    robust_step_size: eta.
    eps: added to S before the square root (LibMTL's 1e-7).
    shared: which parameters are shared (None: all).

  Returns:
    A `GradientRule` with state `ExcessMTLState`.

  References:
    He et al., "Robust Multi-Task Learning with Excess Risks", ICML 2024.
  """
  check_num_tasks(num_tasks)
  if not (math.isfinite(robust_step_size) and robust_step_size > 0):
    raise ValueError(f"excess_mtl: robust_step_size must be positive, got {robust_step_size!r}.")
  if not (math.isfinite(eps) and eps >= 0):
    raise ValueError(f"excess_mtl: eps must be non-negative, got {eps!r}.")

  def init(params):
    if params is None:
      raise ValueError("excess_mtl keeps a statistic per shared parameter: call "
                       "init(params) with the parameters.")
    mask = _tree.resolve_mask(shared, params)
    size = sum(int(x.size) for x in _tree.masked_leaves(params, mask))
    return ExcessMTLState(jnp.zeros([], jnp.int32), jnp.ones(num_tasks, jnp.float32),
                          jnp.zeros(num_tasks, jnp.float32),
                          jnp.zeros((num_tasks, size), jnp.float32),
                          jnp.ones(num_tasks, jnp.float32))

  def rule(matrix: jax.Array, state: ExcessMTLState, stats: TaskStats):
    del stats
    sq = matrix.astype(jnp.float32) ** 2
    total = state.sq_grad_sum + sq
    h = jnp.sqrt(total + eps)
    excess = jnp.sum(jnp.where(h > 0, sq / jnp.where(h > 0, h, 1.0), 0.0), axis=1)
    first = state.count == 0
    baseline = jnp.where(first, excess, state.baseline)
    ratio = jnp.where(baseline > 0, excess / jnp.where(baseline > 0, baseline, 1.0), 0.0)
    log_w = jnp.where(first, state.log_weights, state.log_weights + robust_step_size * ratio)
    log_w = log_w - jnp.max(log_w)
    w = num_tasks * jax.nn.softmax(log_w)
    direction = jnp.tensordot(w.astype(matrix.dtype), matrix, axes=1)
    return direction, w.astype(matrix.dtype), ExcessMTLState(state.count + 1, w, log_w,
                                                             total, baseline)

  return GradientRule(name="excess_mtl", init=init, rule=rule, shared=shared,
                      head_gradients="weighted",
                      hparams=dict(robust_step_size=robust_step_size, eps=eps))
