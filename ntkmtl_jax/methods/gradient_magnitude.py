"""Gradient-magnitude balancing: weights that even out the sizes of the task gradients.

GradNorm learns loss weights so that the weighted task-gradient norms train at balanced
rates; it reads the losses and the squared norms of the shared task gradients
(`Needs("sq_norms")`), so the "streaming" strategy never holds the k gradients. DB-MTL
rescales moving averages of the gradients of the log losses to a common norm; the
averages are (k, P) state, so it is a `GradientRule` on the task gradients themselves.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ntkmtl_jax import _tree
from ntkmtl_jax._tree import SharedSpec
from ntkmtl_jax.methods import register
from ntkmtl_jax.methods._common import EPS, check_losses, check_num_tasks, method_optimizer
from ntkmtl_jax.method import GradientRule, Needs, TaskStats, Weighting

class GradNormState(NamedTuple):
  """State of GradNorm.

  Attributes:
    count: steps taken.
    weights: the weights applied at the last step.
    loss_weights: (k,) the learned weights for the next step (they sum to k).
    initial_losses: (k,) the losses of the first step, L_i(0).
    optimizer_state: the state of the weights' optimiser.
  """
  count: jax.Array
  weights: jax.Array
  loss_weights: jax.Array
  initial_losses: jax.Array
  optimizer_state: optax.OptState


@register("gradnorm", properties=("permutation_equivariant",))
def gradnorm(num_tasks: int, *, alpha: float = 1.5, learning_rate: float = 0.025,
             optimizer: optax.GradientTransformation | None = None,
             shared: SharedSpec = None) -> Weighting:
  """GradNorm: learned loss weights that equalise the task-gradient norms' training rates.

  With n_i = ||g_i|| over the shared parameters (the paper uses the last shared layer),
  G_i = |w_i| n_i, Gbar = mean_j G_j, inverse training rates r_i = L~_i / mean_j L~_j with
  L~_i = l_i(t) / l_i(0), the weights descend L_grad = sum_i |G_i - Gbar r_i^alpha| with the
  targets held constant: dL_grad/dw_i = sign(G_i - Gbar r_i^alpha) sign(w_i) n_i. As in the
  paper's Algorithm 1, step t applies w(t), then updates w and renormalises it to sum to k.
  The initial losses are those of the first step. The paper gives no optimiser for w; the
  default is Adam at 0.025 (the rate the Nash-MTL/FAMO code family gives method parameters).

  Needs the squared task-gradient norms (`needs="sq_norms"`), so the "streaming" strategy
  computes them without holding the k gradients.

  Args:
    num_tasks: number of tasks k.
    alpha: the asymmetry; larger alpha pulls harder towards balanced training rates.
    learning_rate: Adam's learning rate for the weights (ignored when `optimizer` is given).
    optimizer: any optax transformation for the weights instead of Adam.
    shared: which parameters are shared (None: all).

  Returns:
    A `Weighting` with state `GradNormState`.

  References:
    Chen, Badrinarayanan, Lee, Rabinovich, "GradNorm: Gradient Normalization for Adaptive
    Loss Balancing in Deep Multitask Networks", ICML 2018.
  """
  check_num_tasks(num_tasks)
  tx = method_optimizer(optimizer, learning_rate)

  def init(params):
    del params
    w = jnp.ones(num_tasks, jnp.float32)
    return GradNormState(jnp.zeros([], jnp.int32), w, w, jnp.ones(num_tasks, jnp.float32),
                         tx.init(w))

  def weighting(stats: TaskStats, state: GradNormState):
    check_losses(stats, "gradnorm", num_tasks)
    losses = stats.losses.astype(jnp.float32)
    norms = jnp.sqrt(stats.sq_norms.astype(jnp.float32))
    initial = jnp.where(state.count == 0, losses, state.initial_losses)
    w = state.loss_weights
    grad_norms = jnp.abs(w) * norms
    rates = losses / initial
    target = jnp.mean(grad_norms) * (rates / jnp.mean(rates)) ** alpha
    grad = jnp.sign(grad_norms - target) * jnp.sign(w) * norms
    updates, opt_state = tx.update(grad, state.optimizer_state, w)
    new_w = optax.apply_updates(w, updates)
    new_w = (num_tasks * new_w / jnp.sum(new_w)).astype(jnp.float32)
    return w.astype(stats.losses.dtype), GradNormState(state.count + 1, w, new_w, initial,
                                                       opt_state)

  return Weighting(name="gradnorm", needs=Needs("sq_norms"), init=init, weights=weighting,
                   shared=shared, hparams=dict(alpha=alpha, learning_rate=learning_rate))


class DBMTLState(NamedTuple):
  """State of DB-MTL.

  Attributes:
    count: steps taken.
    weights: (k,) the last gradient-magnitude scales max_j ||b_j|| / ||b_i||.
    grad_buffer: (k, P) the moving averages b_i of the shared gradients of log l_i.
  """
  count: jax.Array
  weights: jax.Array
  grad_buffer: jax.Array


@register("db_mtl", properties=("permutation_equivariant", "scale_invariant"))
def db_mtl(num_tasks: int, *, beta: float = 0.9, beta_sigma: float = 0.0,
           shared: SharedSpec = None) -> GradientRule:
  """DB-MTL: log losses (loss-scale balancing), then max-norm gradient balancing.

  Each task's shared gradient of log(l_i + 1e-8), h_i = g_i / (l_i + 1e-8), enters a moving
  average b_i <- h_i + beta_t (b_i - h_i) with beta_t = beta / t^beta_sigma (t = 1, 2, ...;
  the buffer starts at 0). The shared update is sum_i (max_j ||b_j|| / (||b_i|| + 1e-8)) b_i:
  every task's averaged gradient rescaled to the largest norm. Task-specific parameters get
  the gradient of sum_i log(l_i + 1e-8), as in the authors' code (LibMTL), where they
  accumulate it during the per-task backward passes. The state's `weights` are the scales.

  Needs the task gradients themselves (the buffer is a (k, P) array), so not the
  "streaming" strategy.

  Args:
    num_tasks: number of tasks k.
    beta: the moving-average coefficient (LibMTL's default 0.9).
    beta_sigma: its decay exponent over steps (LibMTL's default 0: a constant beta).
    shared: which parameters are shared (None: all).

  Returns:
    A `GradientRule` with state `DBMTLState`.

  References:
    Lin, Jiang, Ye, Zhang, Chen, Chen, Liu, Kwok, "Dual-Balancing for Multi-Task
    Learning", arXiv 2308.12029 (2023).
  """
  check_num_tasks(num_tasks)

  def init(params):
    mask = _tree.resolve_mask(shared, params)
    size = sum(int(x.size) for x in _tree.masked_leaves(params, mask))
    return DBMTLState(jnp.zeros([], jnp.int32), jnp.ones(num_tasks, jnp.float32),
                      jnp.zeros((num_tasks, size), jnp.float32))

  def rule(matrix, state: DBMTLState, stats: TaskStats):
    check_losses(stats, "db_mtl", num_tasks)
    if matrix.shape != state.grad_buffer.shape:
      raise ValueError(f"db_mtl's buffer has shape {state.grad_buffer.shape} but the shared "
                       f"task gradients have shape {matrix.shape}; init the state with the "
                       "same params and `shared` mask.")
    inv_losses = 1.0 / (stats.losses + EPS)
    log_grads = matrix * inv_losses[:, None].astype(matrix.dtype)
    t = (state.count + 1).astype(jnp.float32)
    beta_t = beta / t ** beta_sigma
    buffer = log_grads + beta_t * (state.grad_buffer.astype(matrix.dtype) - log_grads)
    norms = jnp.linalg.norm(buffer, axis=1)
    scales = jnp.max(norms) / (norms + EPS)
    direction = scales @ buffer
    return direction, inv_losses, DBMTLState(state.count + 1, scales.astype(jnp.float32),
                                             buffer.astype(jnp.float32))

  return GradientRule(name="db_mtl", init=init, rule=rule, shared=shared,
                      head_gradients="weighted",
                      hparams=dict(beta=beta, beta_sigma=beta_sigma))
