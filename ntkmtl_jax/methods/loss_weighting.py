"""Loss weightings: the weights are read off the task losses alone.

LS, STL, SI, RLW, DWA, UW, FAMO, STCH, Constant, GLS (GeometricMean), RGW, PBI and
GO4Align choose w from the k task losses (and their own state), never from the task
gradients (`Needs("losses")`), so the train step runs one backward pass of the weighted
loss sum_i w_i l_i per step and task-specific parameters get the same weighted gradient
(`Weighting`'s default `head_gradients="weighted"`; RGW gives them their plain gradients).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntkmtl_jax._tree import SharedSpec
from ntkmtl_jax.methods import register
from ntkmtl_jax.methods._common import (check_losses, check_num_tasks, method_optimizer,
                                        preference_vector)
from ntkmtl_jax.method import Needs, TaskStats, Weighting


class WeightsState(NamedTuple):
  """State of stateless weightings: the step count and the last weights (diagnostics)."""
  count: jax.Array
  weights: jax.Array


def _weights_init(num_tasks):
  return lambda params: WeightsState(jnp.zeros([], jnp.int32), jnp.ones(num_tasks, jnp.float32))


def _fixed(weights):

  def weighting(stats: TaskStats, state: WeightsState):
    w = jnp.asarray(weights, stats.losses.dtype)
    if w.shape != stats.losses.shape:
      raise ValueError(f"Got {stats.losses.shape[0]} task losses for {w.shape[0]} weights.")
    return w, WeightsState(state.count + 1, w.astype(jnp.float32))

  return weighting


@register("ls", properties=("permutation_equivariant", "linear_under_scaling"))
def linear_scalarization(num_tasks: int, *, shared: SharedSpec = None) -> Weighting:
  """LS: the plain sum of the task losses (all weights 1).

  Returns:
    A `Weighting` with state `WeightsState`.
  """
  check_num_tasks(num_tasks)
  return Weighting(name="ls", needs=Needs("losses"), init=_weights_init(num_tasks),
                   weights=_fixed(jnp.ones(num_tasks)), shared=shared)


@register("stl", properties=("direction_scale_invariant", "linear_under_scaling"))
def single_task(num_tasks: int, *, task: int = 0, shared: SharedSpec = None) -> Weighting:
  """STL: trains task `task` alone (weight 1, the others 0); the baseline of Delta m %.

  Returns:
    A `Weighting` with state `WeightsState`.
  """
  check_num_tasks(num_tasks)
  if not 0 <= task < num_tasks:
    raise ValueError(f"task must be in [0, {num_tasks}), got {task}.")
  return Weighting(name="stl", needs=Needs("losses"), init=_weights_init(num_tasks),
                   weights=_fixed(jnp.eye(num_tasks)[task]), shared=shared,
                   hparams=dict(task=task))


@register("si", properties=("permutation_equivariant", "scale_invariant"))
def scale_invariant(num_tasks: int, *, shared: SharedSpec = None) -> Weighting:
  """SI: the scale-invariant sum of log losses, sum_i log l_i.

  Its gradient is sum_i g_i / l_i, so the weights are 1 / l_i with the losses taken as
  constants: a task whose loss is multiplied by a constant gets the same update.

  Args:
    num_tasks: number of tasks k.
    shared: which parameters are shared (None: all).

  Returns:
    A `Weighting` with state `WeightsState`.

  References:
    Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022 (the
    "scale-invariant" baseline of its tables, `ScaleInvariantLinearScalarization`).
  """
  check_num_tasks(num_tasks)

  def weighting(stats: TaskStats, state: WeightsState):
    check_losses(stats, "si", num_tasks)
    w = 1.0 / stats.losses
    return w, WeightsState(state.count + 1, w.astype(jnp.float32))

  return Weighting(name="si", needs=Needs("losses"), init=_weights_init(num_tasks),
                   weights=weighting, shared=shared)


class RLWState(NamedTuple):
  """State of RLW: the step count, the last weights and a PRNG key (raw uint32 key data)."""
  count: jax.Array
  weights: jax.Array
  key: jax.Array


@register("rlw", properties=("linear_under_scaling",))
def random_loss_weighting(num_tasks: int, *, seed: int = 0,
                          shared: SharedSpec = None) -> Weighting:
  """RLW: random weights drawn afresh every step, softmax of standard normals.

  The weights lie on the simplex (they sum to 1, as in the authors' and LibMTL's code, so
  the update is about 1/k of LS's). The randomness comes from the `key` extra argument
  (`TaskStats.key`; `make_train_step` passes a fresh key every step); when none is given,
  the state's own key (from `seed`) is split each step.

  Args:
    num_tasks: number of tasks k.
    seed: seed of the state's key, used only when no key is passed.
    shared: which parameters are shared (None: all).

  Returns:
    A `Weighting` with state `RLWState`.

  References:
    Lin et al., "Reasonable Effectiveness of Random Weighting: A Litmus Test for
    Multi-Task Learning", TMLR 2022.
  """
  check_num_tasks(num_tasks)

  def init(params):
    del params
    return RLWState(jnp.zeros([], jnp.int32), jnp.full(num_tasks, 1.0 / num_tasks, jnp.float32),
                    jax.random.PRNGKey(seed))

  def weighting(stats: TaskStats, state: RLWState):
    check_losses(stats, "rlw", num_tasks)
    if stats.key is not None:
      key, next_key = stats.key, state.key
    else:
      next_key, key = jax.random.split(state.key)
    w = jax.nn.softmax(jax.random.normal(key, (num_tasks,), jnp.float32))
    return w.astype(stats.losses.dtype), RLWState(state.count + 1, w, next_key)

  return Weighting(name="rlw", needs=Needs("losses"), init=init, weights=weighting,
                   shared=shared, hparams=dict(seed=seed))


class DWAState(NamedTuple):
  """State of DWA.

  Attributes:
    count: steps taken.
    weights: the last weights.
    loss_sum: (k,) sum of the losses of the epoch in progress.
    epoch_losses: (2, k) mean losses of the two last complete epochs, older first.
    num_epochs: complete epochs seen.
  """
  count: jax.Array
  weights: jax.Array
  loss_sum: jax.Array
  epoch_losses: jax.Array
  num_epochs: jax.Array


@register("dwa", properties=("permutation_equivariant", "linear_under_scaling"))
def dynamic_weight_average(num_tasks: int, *, temperature: float = 2.0,
                           steps_per_epoch: int = 1,
                           shared: SharedSpec = None) -> Weighting:
  """DWA: weights from the rate at which each task's loss fell over the last two epochs.

  w_i(t) = k exp(r_i / T) / sum_j exp(r_j / T), r_i = L_i(t-1) / L_i(t-2), where L_i(e) is
  task i's mean loss over epoch e; the weights are 1 for the first two epochs. An "epoch"
  here is `steps_per_epoch` steps: the default 1 uses the per-step losses (weights 1 at
  steps 0 and 1, then r_i = l_i(t-1) / l_i(t-2)); set it to the number of steps in an epoch
  for the paper's form. (The Nash-MTL/FAMO code family instead compares two sliding
  windows of 25 steps, the newer one including the current step, and divides the weighted
  loss by k.)

  Args:
    num_tasks: number of tasks k.
    temperature: T; larger T makes the weights more even.
    steps_per_epoch: steps over which the losses are averaged.
    shared: which parameters are shared (None: all).

  Returns:
    A `Weighting` with state `DWAState`.

  References:
    Liu, Johns, Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019.
  """
  check_num_tasks(num_tasks)
  if temperature <= 0:
    raise ValueError(f"temperature must be positive, got {temperature}.")
  if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch must be a positive integer, got {steps_per_epoch!r}.")

  def init(params):
    del params
    return DWAState(jnp.zeros([], jnp.int32), jnp.ones(num_tasks, jnp.float32),
                    jnp.zeros(num_tasks, jnp.float32), jnp.ones((2, num_tasks), jnp.float32),
                    jnp.zeros([], jnp.int32))

  def weighting(stats: TaskStats, state: DWAState):
    check_losses(stats, "dwa", num_tasks)
    losses = stats.losses.astype(jnp.float32)
    rate = state.epoch_losses[1] / state.epoch_losses[0]
    w = jnp.where(state.num_epochs >= 2, num_tasks * jax.nn.softmax(rate / temperature),
                  jnp.ones(num_tasks, jnp.float32))
    loss_sum = state.loss_sum + losses
    epoch_done = (state.count + 1) % steps_per_epoch == 0
    epoch_losses = jnp.where(
        epoch_done, jnp.stack([state.epoch_losses[1], loss_sum / steps_per_epoch]),
        state.epoch_losses)
    new_state = DWAState(state.count + 1, w, jnp.where(epoch_done, 0.0, loss_sum),
                         epoch_losses, state.num_epochs + epoch_done.astype(jnp.int32))
    return w.astype(stats.losses.dtype), new_state

  return Weighting(name="dwa", needs=Needs("losses"), init=init, weights=weighting,
                   shared=shared,
                   hparams=dict(temperature=temperature, steps_per_epoch=steps_per_epoch))


class UWState(NamedTuple):
  """State of UW: step count, last weights 0.5 exp(-s_i), the log-variances s_i and the
  state of their optimiser."""
  count: jax.Array
  weights: jax.Array
  log_variances: jax.Array
  optimizer_state: optax.OptState


@register("uw", properties=("permutation_equivariant",))
def uncertainty_weighting(num_tasks: int, *, learning_rate: float = 0.025,
                          optimizer: optax.GradientTransformation | None = None,
                          shared: SharedSpec = None) -> Weighting:
  """UW: task weights from learned homoscedastic uncertainties (log-variances s_i).

  The objective is sum_i 0.5 (exp(-s_i) l_i + s_i) (Kendall et al.'s regression form with
  s_i = log sigma_i^2, as in the Nash-MTL/FAMO code and LibMTL), so the model update is
  sum_i 0.5 exp(-s_i) g_i. A weighting cannot change the model's parameters, so the s_i
  live in the state and take their own optimiser step on the same objective each step,
  with gradient d/ds_i = 0.5 (1 - exp(-s_i) l_i); by default Adam with learning rate 0.025,
  the `method-params-lr` those codes give the s_i. The weights of a step use the s_i from
  before that step's update, as in joint training.

  Args:
    num_tasks: number of tasks k.
    learning_rate: Adam's learning rate for the s_i (ignored when `optimizer` is given).
    optimizer: any optax transformation for the s_i instead of Adam.
    shared: which parameters are shared (None: all).

  Returns:
    A `Weighting` with state `UWState`.

  References:
    Kendall, Gal, Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for
    Scene Geometry and Semantics", CVPR 2018.
  """
  check_num_tasks(num_tasks)
  tx = method_optimizer(optimizer, learning_rate)

  def init(params):
    del params
    s = jnp.zeros(num_tasks, jnp.float32)
    return UWState(jnp.zeros([], jnp.int32), 0.5 * jnp.exp(-s), s, tx.init(s))

  def weighting(stats: TaskStats, state: UWState):
    check_losses(stats, "uw", num_tasks)
    s = state.log_variances
    w = 0.5 * jnp.exp(-s)
    grad = 0.5 * (1.0 - jnp.exp(-s) * stats.losses.astype(jnp.float32))
    updates, opt_state = tx.update(grad, state.optimizer_state, s)
    new_s = optax.apply_updates(s, updates).astype(jnp.float32)
    return w.astype(stats.losses.dtype), UWState(state.count + 1, w, new_s, opt_state)

  return Weighting(name="uw", needs=Needs("losses"), init=init, weights=weighting,
                   shared=shared, hparams=dict(learning_rate=learning_rate))


class FAMOState(NamedTuple):
  """State of FAMO.

  Attributes:
    count: steps taken.
    weights: the last weights applied to the task losses.
    logits: (k,) the logits xi; the task allocation is softmax(xi).
    optimizer_state: the state of the logits' optimiser.
    previous_losses: (k,) the losses of the last step, for the next logit update.
  """
  count: jax.Array
  weights: jax.Array
  logits: jax.Array
  optimizer_state: optax.OptState
  previous_losses: jax.Array


@register("famo", properties=("permutation_equivariant",))
def famo(num_tasks: int, *, learning_rate: float = 0.025, gamma: float = 0.01,
         min_losses=None, optimizer: optax.GradientTransformation | None = None,
         shared: SharedSpec = None) -> Weighting:
  """FAMO: logits xi move so that the task losses decrease at balanced (log) rates.

  With z = softmax(xi) and D_i = l_i - min_i + 1e-8, the model follows the gradient of
  sum_i z_i log D_i / c with c = sum_j z_j / D_j (a constant), i.e. weights
  w_i = z_i / (c D_i), which sum to 1. The logits then take a step along
  delta^T dz/dxi with delta_i = log D_i(before) - log D_i(after), with Adam (learning rate
  `learning_rate`) and L2 weight decay `gamma` coupled into the gradient as in PyTorch's
  Adam(weight_decay=gamma), as the authors' code does.

  One step delayed: the authors' code re-evaluates the losses on the same batch after the
  optimiser step and updates xi at once. A train step here evaluates the losses once, so
  the state keeps the previous step's losses and xi is updated at the next step, with
  delta_i = log D_i(t-1) - log D_i(t) on the next batch, before that step's weights are
  formed (no update at the first step). This costs no extra forward pass; the losses of
  two different batches stand in for the before/after pair.

  Clipping: the FAMO repository (and the NTKMTL one, which shares its trainers) calls a
  clip of the shared gradient's norm to 1.0 in the weight methods' base class before
  `loss.backward()`, while the gradients are still None, so it does nothing and their FAMO
  runs unclipped; chain `clip_shared_by_global_norm(1.0, shared)` to clip anyway.

  Args:
    num_tasks: number of tasks k.
    learning_rate: Adam's learning rate for the logits (the authors' `w_lr`).
    gamma: weight decay of the logits (the authors' default 0.01; their CelebA script uses
      0.01, QM9 0.001).
    min_losses: (k,) lower bounds of the losses (default 0).
    optimizer: any optax transformation for the logits instead of Adam + decay.
    shared: which parameters are shared (None: all).

  Returns:
    A `Weighting` with state `FAMOState`.

  References:
    Liu, Feng, Stone, Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023.
  """
  check_num_tasks(num_tasks)
  if not (math.isfinite(learning_rate) and learning_rate > 0):
    raise ValueError(f"FAMO: learning_rate={learning_rate!r}; it must be > 0 and finite.")
  if not (math.isfinite(gamma) and gamma >= 0):
    raise ValueError(f"FAMO: gamma={gamma!r}; it must be >= 0 and finite (weight decay).")
  tx = (optax.chain(optax.add_decayed_weights(gamma), optax.adam(learning_rate))
        if optimizer is None else optimizer)
  lower = (jnp.zeros(num_tasks, jnp.float32) if min_losses is None
           else jnp.asarray(min_losses, jnp.float32))
  if lower.shape != (num_tasks,):
    raise ValueError(f"min_losses must have shape ({num_tasks},), got {lower.shape}.")
  eps = 1e-8

  def init(params):
    del params
    xi = jnp.zeros(num_tasks, jnp.float32)
    return FAMOState(jnp.zeros([], jnp.int32), jnp.full(num_tasks, 1.0 / num_tasks, jnp.float32),
                     xi, tx.init(xi), jnp.ones(num_tasks, jnp.float32))

  def weighting(stats: TaskStats, state: FAMOState):
    check_losses(stats, "famo", num_tasks)
    losses = stats.losses.astype(jnp.float32)
    d = losses - lower + eps
    delta = jnp.log(state.previous_losses - lower + eps) - jnp.log(d)
    z = jax.nn.softmax(state.logits)
    grad = z * (delta - jnp.dot(z, delta))  # delta^T d softmax(xi) / d xi
    updates, opt_state = tx.update(grad, state.optimizer_state, state.logits)
    started = state.count > 0
    logits = jnp.where(started, optax.apply_updates(state.logits, updates), state.logits)
    opt_state = optax.tree.where(started, opt_state, state.optimizer_state)
    z = jax.nn.softmax(logits)
    w = z / d / jnp.sum(z / d)
    return w.astype(stats.losses.dtype), FAMOState(state.count + 1, w, logits.astype(jnp.float32),
                                                   opt_state, losses)

  return Weighting(name="famo", needs=Needs("losses"), init=init, weights=weighting,
                   shared=shared, hparams=dict(learning_rate=learning_rate, gamma=gamma))


class STCHState(NamedTuple):
  """State of STCH.

  Attributes:
    count: steps taken.
    weights: the last weights.
    loss_sum: (k,) sum of the losses recorded so far for the nadir point.
    nadir: (k,) the nadir point (the mean loss over the recording epoch), 1 before.
  """
  count: jax.Array
  weights: jax.Array
  loss_sum: jax.Array
  nadir: jax.Array


@register("stch", properties=("permutation_equivariant", "scale_invariant"))
def smooth_tchebycheff(num_tasks: int, *, mu: float = 1.0, warmup_epochs: int = 4,
                       steps_per_epoch: int = 1,
                       shared: SharedSpec = None) -> Weighting:
  """STCH: smooth Tchebycheff scalarisation of the normalised log losses.

  The authors' multi-task code (on LibMTL) trains sum_i log l_i for `warmup_epochs` epochs,
  then one more epoch of the same while recording the mean losses, which become the nadir
  point n; afterwards it trains
      k mu log sum_i exp(log(l_i / n_i + 1e-20) / mu),
  the smooth maximum of the log losses normalised by the nadir point (the ideal point of
  the paper's formula is 0 in log space). Its gradient is sum_i w_i g_i with
  w_i = k softmax(u / mu)_i / (l_i + 1e-20 n_i), u_i = log(l_i / n_i + 1e-20); during the
  warm-up w_i = 1 / (l_i + 1e-20). An "epoch" is `steps_per_epoch` steps: set it to the
  number of steps of an epoch to match the authors' schedule (the default 1 counts steps).

  Args:
    num_tasks: number of tasks k.
    mu: the smoothing parameter (as mu -> 0 the scalarisation tends to the max).
    warmup_epochs: epochs of sum-of-log-losses training before the recording epoch.
    steps_per_epoch: steps in an epoch.
    shared: which parameters are shared (None: all).

  Returns:
    A `Weighting` with state `STCHState`.

  References:
    Lin, Zhang, Yang, Zhang, Zhang, "Smooth Tchebycheff Scalarization for Multi-Objective
    Optimization", ICML 2024.
  """
  check_num_tasks(num_tasks)
  if mu <= 0:
    raise ValueError(f"mu must be positive, got {mu}.")
  if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch must be a positive integer, got {steps_per_epoch!r}.")
  if not isinstance(warmup_epochs, int) or warmup_epochs < 0:
    raise ValueError(f"warmup_epochs must be a non-negative integer, got {warmup_epochs!r}.")
  record_from = warmup_epochs * steps_per_epoch
  record_until = record_from + steps_per_epoch

  def init(params):
    del params
    return STCHState(jnp.zeros([], jnp.int32), jnp.ones(num_tasks, jnp.float32),
                     jnp.zeros(num_tasks, jnp.float32), jnp.ones(num_tasks, jnp.float32))

  def weighting(stats: TaskStats, state: STCHState):
    check_losses(stats, "stch", num_tasks)
    # The weights in the losses' dtype; the state in float32.
    losses = stats.losses
    t = state.count
    recording = (t >= record_from) & (t < record_until)
    loss_sum = state.loss_sum.astype(losses.dtype) + jnp.where(recording, losses, 0.0)
    nadir = jnp.where(t == record_until - 1, loss_sum / steps_per_epoch,
                      state.nadir.astype(losses.dtype))
    normalised = jnp.log(losses / nadir + 1e-20)
    smooth_max = num_tasks * jax.nn.softmax(normalised / mu) / (losses + 1e-20 * nadir)
    w = jnp.where(t >= record_until, smooth_max, 1.0 / (losses + 1e-20))
    return w, STCHState(t + 1, w.astype(jnp.float32), loss_sum.astype(jnp.float32),
                        nadir.astype(jnp.float32))

  return Weighting(name="stch", needs=Needs("losses"), init=init, weights=weighting,
                   shared=shared,
                   hparams=dict(mu=mu, warmup_epochs=warmup_epochs,
                                steps_per_epoch=steps_per_epoch))


# ------------------------------------------------- fixed, geometric and random scalarisations


@register("constant", properties=("linear_under_scaling",))
def constant(num_tasks: int, *, weights=None, shared: SharedSpec = None,
             head_gradients: str = "weighted") -> Weighting:
  """Constant: fixed user weights, the update sum_i w_i g_i (torchjd's `Constant`).

  Args:
    num_tasks: number of tasks k.
    weights: (k,) finite weights (default all 1, which is LS).
    shared: which parameters are shared (None: all).
    head_gradients: "weighted" (the backward pass of sum_i w_i l_i) or "sum".

  Returns:
    A `Weighting` with state `WeightsState`.

  References:
    torchjd's `aggregation.Constant` and `scalarization.Constant` (Quinton, Rey, "Jacobian
    Descent for Multi-Objective Optimization", 2024).
  """
  check_num_tasks(num_tasks)
  w = np.ones(num_tasks) if weights is None else np.asarray(weights, np.float64)
  if w.shape != (num_tasks,) or not np.all(np.isfinite(w)):
    raise ValueError(f"constant: weights must be {num_tasks} finite numbers, got {weights!r}.")
  return Weighting(name="constant", needs=Needs("losses"), init=_weights_init(num_tasks),
                   weights=_fixed(w), shared=shared, head_gradients=head_gradients,
                   hparams=dict(weights=w.tolist()))


def _geometric_mean(name: str, num_tasks: int, shared: SharedSpec) -> Weighting:
  check_num_tasks(num_tasks)

  def weighting(stats: TaskStats, state: WeightsState):
    check_losses(stats, name, num_tasks)
    # In log space; a zero loss is floored at the smallest normal number (its weight is then
    # large and finite instead of 0 / 0).
    logs = jnp.log(jnp.maximum(stats.losses, jnp.finfo(stats.losses.dtype).tiny))
    w = jnp.exp(jnp.mean(logs) - logs) / num_tasks
    return w, WeightsState(state.count + 1, w.astype(jnp.float32))

  return Weighting(name=name, needs=Needs("losses"), init=_weights_init(num_tasks),
                   weights=weighting, shared=shared)


@register("gls", properties=("permutation_equivariant", "direction_scale_invariant"))
def geometric_loss_strategy(num_tasks: int, *, shared: SharedSpec = None) -> Weighting:
  """GLS: the geometric mean of the task losses, (prod_i l_i) ** (1/k).

  Its gradient is sum_i w_i g_i with w_i = (prod_j l_j) ** (1/k) / (k l_i), computed in log
  space (the product of 40 losses under- or overflows). Multiplying one loss by c multiplies
  the objective by c ** (1/k) and leaves the update's direction (that of sum_i g_i / l_i)
  unchanged. LibMTL's `GLS` backpropagates the same objective (the weights it reports,
  l_i / (k prod_j l_j), are not the ones its gradient applies); torchjd calls it
  `GeometricMean` (registered here as "geometric_mean" too).

  Returns:
    A `Weighting` (needs "losses") with state `WeightsState`; `num_tasks` and `shared` as
    for every loss weighting.

  References:
    Chennupati, Sistu, Yogamani, Rawashdeh, "MultiNet++: Multi-Stream Feature Aggregation
    and Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019.
  """
  return _geometric_mean("gls", num_tasks, shared)


@register("geometric_mean", properties=("permutation_equivariant", "direction_scale_invariant"))
def geometric_mean(num_tasks: int, *, shared: SharedSpec = None) -> Weighting:
  """GeometricMean (torchjd's name for GLS): the geometric mean of the task losses.

  The same method as `geometric_loss_strategy` ("gls"), under torchjd's name.

  Returns:
    A `Weighting` with state `WeightsState`.

  References:
    Chennupati et al., "MultiNet++", CVPR Workshops 2019; torchjd's
    `scalarization.GeometricMean`.
  """
  return _geometric_mean("geometric_mean", num_tasks, shared)


@register("rgw", properties=("linear_under_scaling",))
def random_gradient_weighting(num_tasks: int, *, seed: int = 0,
                              shared: SharedSpec = None) -> Weighting:
  """RGW: random weights on the task gradients, softmax of standard normals, every step.

  The RLW paper's gradient form: the shared parameters get sum_i w_i g_i with w drawn as in
  `random_loss_weighting`, the task-specific parameters their plain gradients (LibMTL's
  `RGW`, whose per-task backward passes leave the heads unweighted). On the shared
  parameters this is RLW's update; the weights need no gradient, so the step runs the
  weighted backward pass plus one for the heads, never k.

  Args and returns: as `random_loss_weighting` (state `RLWState`).

  References:
    Lin et al., TMLR 2022 (the RLW paper's "RGW").
  """
  rlw = random_loss_weighting(num_tasks, seed=seed, shared=shared)
  return dataclasses.replace(rlw, name="rgw", head_gradients="sum")


@register("pbi", properties=("permutation_equivariant",))
def penalty_boundary_intersection(num_tasks: int, *, theta: float = 5.0, preference=None,
                                  reference=None, shared: SharedSpec = None) -> Weighting:
  """PBI: penalty-based boundary intersection, d1 + theta d2, of the loss vector.

  With f = l - z (z the reference point) and u = p / ||p|| (p the preference vector),
  d1 = <f, u> is the distance along the preference direction and d2 = ||f - d1 u|| the
  distance to it, computed as sqrt(||f - d1 u||^2 + 1e-12) as torchjd does, so that it stays
  differentiable on the line. The update is sum_i w_i g_i with
  w = u + theta (f - d1 u) / d2, the gradient of the scalarisation: a task ahead of the
  preference line gets a smaller (possibly negative) weight. MOEA/D updates z to the best
  losses seen; torchjd keeps a fixed reference (default the origin), as here.

  Args:
    num_tasks: number of tasks k.
    theta: the penalty on d2 (5, the value of the MOEA/D paper's experiments).
    preference: (k,) non-negative preference vector p (default uniform).
    reference: (k,) reference point z, a lower bound of the losses (default 0).
    shared: which parameters are shared (None: all).

  Returns:
    A `Weighting` with state `WeightsState`.

  References:
    Zhang, Li, "MOEA/D: A Multiobjective Evolutionary Algorithm Based on Decomposition",
    IEEE TEVC 2007; torchjd's `scalarization.PBI`.
  """
  check_num_tasks(num_tasks)
  if not (math.isfinite(theta) and theta >= 0):
    raise ValueError(f"pbi: theta must be non-negative and finite, got {theta!r}.")
  pref = preference_vector(preference, num_tasks, 1.0)
  if not pref.any():
    raise ValueError("pbi: the preference vector must have a positive entry.")
  unit = pref / np.linalg.norm(pref)
  ref = np.zeros(num_tasks) if reference is None else np.asarray(reference, np.float64)
  if ref.shape != (num_tasks,) or not np.all(np.isfinite(ref)):
    raise ValueError(f"pbi: reference must be {num_tasks} finite numbers, got {reference!r}.")

  def weighting(stats: TaskStats, state: WeightsState):
    check_losses(stats, "pbi", num_tasks)
    u = jnp.asarray(unit, stats.losses.dtype)
    f = stats.losses - jnp.asarray(ref, stats.losses.dtype)
    off_line = f - jnp.dot(f, u) * u
    w = u + theta * off_line / jnp.sqrt(jnp.dot(off_line, off_line) + 1e-12)
    return w, WeightsState(state.count + 1, w.astype(jnp.float32))

  return Weighting(name="pbi", needs=Needs("losses"), init=_weights_init(num_tasks),
                   weights=weighting, shared=shared,
                   hparams=dict(theta=theta, preference=pref.tolist(), reference=ref.tolist()))


# --------------------------------------------------------------------------------- GO4Align


def kmeans_1d(values: jax.Array, num_groups: int) -> jax.Array:
  """Each value replaced by the mean of its group in the optimal 1-D k-means partition.

  In one dimension the optimal groups are contiguous runs of the sorted values, so dynamic
  programming over the k + 1 cut positions finds the partition of least within-group sum of
  squares exactly (O(k^2 num_groups), jittable); `num_groups` is capped at k.
  """
  k = values.shape[0]
  groups = min(int(num_groups), k)
  order = jnp.argsort(values)
  xs = values[order]
  pos = jnp.arange(k + 1)
  # cost[i, j]: sum of squares of xs[i:j] about its mean (inf unless i < j).
  inside = (pos[:-1][None, None, :] >= pos[:, None, None]) & \
      (pos[:-1][None, None, :] < pos[None, :, None])
  size = jnp.sum(inside, axis=-1)
  mean = jnp.sum(jnp.where(inside, xs, 0.0), axis=-1) / jnp.maximum(size, 1)
  cost = jnp.sum(jnp.where(inside, (xs - mean[..., None]) ** 2, 0.0), axis=-1)
  cost = jnp.where(size > 0, cost, jnp.inf)
  best = jnp.where(pos == 0, 0.0, jnp.inf).astype(values.dtype)  # 0 groups cover 0 values
  cuts = []
  for _ in range(groups):
    total = best[:, None] + cost
    cuts.append(jnp.argmin(total, axis=0))
    best = jnp.min(total, axis=0)
  out, end = jnp.zeros_like(xs), jnp.asarray(k)
  for cut in reversed(cuts):
    start = cut[end]
    out = jnp.where((pos[:-1] >= start) & (pos[:-1] < end), mean[start, end], out)
    end = start
  return jnp.zeros_like(values).at[order].set(out)


class GO4AlignState(NamedTuple):
  """State of GO4Align: step count, last weights and the risk-guided task probabilities."""
  count: jax.Array
  weights: jax.Array
  probabilities: jax.Array


@register("go4align", properties=("permutation_equivariant",))
def go4align(num_tasks: int, *, num_groups: int = 5, robust_step_size: float = 1e-4,
             shared: SharedSpec = None) -> Weighting:
  """GO4Align: risk-guided task weights, pooled within groups of similar weight.

  As the NTKMTL repository's `methods/cluster_methods.py` (`GO4ALIGN`, the code behind its
  go4align baseline; the GO4Align authors' own code was not compared) does each step: the
  probabilities p move by p_i <- p_i exp(-eta l_i), renormalised to sum to 1; the raw
  weight of task i is (sum_j l_j / l_i) p_i; the k raw weights are grouped into
  `num_groups` clusters by k-means and every task gets its cluster's mean weight (with one
  group, the mean of all). That code clusters with scikit-learn's KMeans (k-means++
  from random_state 42, Lloyd iterations: a local optimum, and an error when k is smaller
  than the number of groups); here the optimal 1-D partition is found exactly
  (`kmeans_1d`) and the groups are capped at k, so that each task is then its own group.

  Args:
    num_tasks: number of tasks k.
    num_groups: the number of groups (that code's default 5).
    robust_step_size: eta (that code's default 1e-4).
    shared: which parameters are shared (None: all).

  Returns:
    A `Weighting` with state `GO4AlignState`.

  References:
    Shen, Wang, Xiao, van Noord, Worring, "GO4Align: Group Optimization for Multi-Task
    Alignment", NeurIPS 2024.
  """
  check_num_tasks(num_tasks)
  if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
    raise ValueError(f"go4align: num_groups must be a positive integer, got {num_groups!r}.")
  if not (math.isfinite(robust_step_size) and robust_step_size >= 0):
    raise ValueError(f"go4align: robust_step_size must be >= 0, got {robust_step_size!r}.")

  def init(params):
    del params
    return GO4AlignState(jnp.zeros([], jnp.int32), jnp.ones(num_tasks, jnp.float32),
                         jnp.full(num_tasks, 1.0 / num_tasks, jnp.float32))

  def weighting(stats: TaskStats, state: GO4AlignState):
    check_losses(stats, "go4align", num_tasks)
    losses = stats.losses
    p = state.probabilities.astype(losses.dtype) * jnp.exp(-robust_step_size * losses)
    p = p / jnp.sum(p)
    positive = jnp.maximum(losses, jnp.finfo(losses.dtype).tiny)
    w = kmeans_1d(jnp.sum(losses) / positive * p, num_groups)
    return w, GO4AlignState(state.count + 1, w.astype(jnp.float32), p.astype(jnp.float32))

  return Weighting(name="go4align", needs=Needs("losses"), init=init, weights=weighting,
                   shared=shared,
                   hparams=dict(num_groups=num_groups, robust_step_size=robust_step_size))
