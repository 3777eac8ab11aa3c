"""The method and the optimiser chain a `Config` describes, and its learning-rate schedule.

    method, optimizer = build_optimizer(config, num_tasks, shared)
    optimizer = with_learning_rate_factor(optimizer)        # the schedule's hook
    state = set_learning_rate_factor(state, learning_rate_factor(config, epoch, epochs, 1.0))

The schedule is per epoch and applied as a factor after the optimiser (through
`optax.inject_hyperparams`), so any optax transformation can be the optimiser.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax

from ntkmtl_jax import methods
from ntkmtl_jax.config import OPTIMIZERS, SCHEDULES, Config
from ntkmtl_jax.method import Method
from ntkmtl_jax.methods.ntkmtl import clip_shared_by_global_norm
from ntkmtl_jax.step import TrainState


def build_optimizer(
  config: Config, num_tasks: int, shared
) -> tuple[Method, optax.GradientTransformation]:
  """The method and the optimiser chain for `config`.

  The method is `config.method` with its registered defaults (the published code's) and the
  run's hyper-parameters. Gradient methods (a backward pass per task over the shared
  parameters) get the shared-update clipping to `config.max_grad_norm` before the
  optimiser, loss-weighting and representation methods none, as the official trainers.

  Args:
    config: the run's `Config`.
    num_tasks: k.
    shared: the shared-parameter mask function of the model.

  Returns:
    (method, optax transformation applied to the method's update).
  """
  method = methods.get(
    config.method_key, num_tasks, shared=shared, **config.method_hyperparameters()
  )
  clip = (
    clip_shared_by_global_norm(config.max_grad_norm, shared)
    if method.needs.task_gradients and config.max_grad_norm is not None
    else optax.identity()
  )
  makers = {
    "adam": lambda: optax.adam(config.learning_rate),
    "adamw": lambda: optax.adamw(config.learning_rate, weight_decay=config.weight_decay),
    "sgd": lambda: optax.sgd(config.learning_rate),
  }
  if config.optimizer not in makers:
    raise ValueError(f"Unknown optimizer {config.optimizer!r}: choose one of {OPTIMIZERS}.")
  return method, optax.chain(clip, makers[config.optimizer]())


def learning_rate_factor(
  config: Config, epoch: int, num_epochs: int, plateau_scale: float
) -> float:
  """The factor on the base learning rate in `epoch` (0-based) under `config.lr_schedule`."""
  if config.lr_schedule == "constant":
    return 1.0
  if config.lr_schedule == "cosine":
    return 0.5 * (1.0 + math.cos(math.pi * epoch / max(num_epochs, 1)))
  if config.lr_schedule == "step":
    return config.lr_gamma ** (epoch // config.lr_step_size)
  if config.lr_schedule == "plateau":
    return max(plateau_scale, config.plateau_min_lr / config.learning_rate)
  raise ValueError(f"Unknown lr_schedule {config.lr_schedule!r}: use one of {SCHEDULES}.")


def with_learning_rate_factor(
  optimizer: optax.GradientTransformation,
) -> optax.GradientTransformation:
  """`optimizer` followed by an injectable scale (the schedule's factor, initially 1)."""
  return optax.chain(optimizer, optax.inject_hyperparams(optax.scale)(step_size=1.0))


def set_learning_rate_factor(state: TrainState, factor: float) -> TrainState:
  """`state` with the factor of `with_learning_rate_factor`'s optimiser replaced."""
  inner, scale = state.optimizer_state
  hyper = dict(scale.hyperparams)
  hyper["step_size"] = jnp.asarray(factor, hyper["step_size"].dtype)
  return state._replace(optimizer_state=(inner, scale._replace(hyperparams=hyper)))
