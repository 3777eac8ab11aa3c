"""Multi-task SAC (MTRL's MT-SAC) in flax: one actor and two critics shared by all tasks,
the multi-task method applied to the ten per-task losses of the critic and of the actor.

The whole update (critic, actor, temperature, target critics) is one function of
`(SACState, batch)`; `make_agent` jits it. Everything a loss needs that is not a parameter
(the critic targets, the reparameterisation noise, the temperature, the critic parameters
in the actor loss) rides in the loss's batch pytree.
"""

from __future__ import annotations

from typing import Any, NamedTuple
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import ntkmtl_jax
from ntkmtl_jax.step import TrainState


class MLP(nn.Module):
  """`num_layers` ReLU layers of `hidden_dim`, then a linear output (MTRL's `build_mlp`),
  orthogonal weights and zero biases (MTRL's `weight_init`)."""
  hidden_dim: int
  num_layers: int
  output_dim: int

  @nn.compact
  def __call__(self, x):
    dense = lambda n: nn.Dense(n, kernel_init=nn.initializers.orthogonal(),
                               bias_init=nn.initializers.zeros)
    for _ in range(self.num_layers):
      x = nn.relu(dense(self.hidden_dim)(x))
    return dense(self.output_dim)(x)


class Actor(nn.Module):
  """Gaussian policy head: the mean and the log standard deviation, the latter squashed
  into `log_std_bounds` by tanh (MTRL's actor)."""
  action_dim: int
  hidden_dim: int
  num_layers: int
  log_std_bounds: tuple = (-20.0, 2.0)

  @nn.compact
  def __call__(self, obs):
    out = MLP(self.hidden_dim, self.num_layers, 2 * self.action_dim)(obs)
    mu, log_std = jnp.split(out, 2, axis=-1)
    low, high = self.log_std_bounds
    log_std = low + 0.5 * (high - low) * (jnp.tanh(log_std) + 1.0)
    return mu, log_std


class DoubleCritic(nn.Module):
  """Two independent Q networks of (observation, action)."""
  hidden_dim: int
  num_layers: int

  @nn.compact
  def __call__(self, obs, action):
    x = jnp.concatenate([obs, action], axis=-1)
    q1 = MLP(self.hidden_dim, self.num_layers, 1, name="q1")(x)[..., 0]
    q2 = MLP(self.hidden_dim, self.num_layers, 1, name="q2")(x)[..., 0]
    return q1, q2


def squashed_sample(mu, log_std, noise):
  """A tanh-squashed Gaussian sample and its log-probability (SAC appendix C, MTRL's
  `_gaussian_logprob` + `_squash`, including its 1e-6 inside the log).

  Returns:
    (action, log_prob, deterministic action tanh(mu)); log_prob has shape (batch,).
  """
  pre_tanh = mu + noise * jnp.exp(log_std)
  log_prob = jnp.sum(-0.5 * noise ** 2 - log_std, axis=-1) - 0.5 * np.log(2 * np.pi) * mu.shape[-1]
  action = jnp.tanh(pre_tanh)
  log_prob = log_prob - jnp.sum(jnp.log(nn.relu(1.0 - action ** 2) + 1e-6), axis=-1)
  return action, log_prob, jnp.tanh(mu)


def per_task_mean(values, num_tasks: int):
  """Means of a task-major (num_tasks * n,) vector over each task's n rows: (num_tasks,)."""
  return values.reshape(num_tasks, -1).mean(axis=1)


def alpha_per_sample(log_alpha, task, per_task_alpha: bool):
  """The temperature of every row: its task's (per-task alpha) or the shared one."""
  alpha = jnp.exp(log_alpha)
  return alpha[task] if per_task_alpha else jnp.broadcast_to(alpha[0], task.shape)


class Networks(NamedTuple):
  actor: Actor
  critic: DoubleCritic


def critic_target(networks: Networks, actor_params, target_critic_params, batch, alpha,
                  noise, discount: float):
  """y = r + gamma * not_done * (min(Q1', Q2')(s', a') - alpha * log pi(a'|s')), a' ~ pi(s')."""
  mu, log_std = networks.actor.apply(actor_params, batch["next_obs"])
  next_action, next_log_prob, _ = squashed_sample(mu, log_std, noise)
  q1, q2 = networks.critic.apply(target_critic_params, batch["next_obs"], next_action)
  target_v = jnp.minimum(q1, q2) - alpha * next_log_prob
  return jax.lax.stop_gradient(batch["reward"] + batch["not_done"] * discount * target_v)


def critic_task_losses(networks: Networks, num_tasks: int) -> Callable:
  """`loss(critic_params, batch) -> (num_tasks,)`: each task's mean over its rows of
  (Q1 - y)^2 + (Q2 - y)^2; `batch` holds obs, action and target_q."""

  def loss(critic_params, batch):
    q1, q2 = networks.critic.apply(critic_params, batch["obs"], batch["action"])
    per_row = (q1 - batch["target_q"]) ** 2 + (q2 - batch["target_q"]) ** 2
    return per_task_mean(per_row, num_tasks)

  return loss


def actor_task_losses(networks: Networks, num_tasks: int) -> Callable:
  """`loss(actor_params, batch) -> (num_tasks,)`: each task's mean of
  alpha * log pi(a|s) - min(Q1, Q2)(s, a), a = the reparameterised sample; `batch` holds obs,
  noise, alpha (per row) and critic_params (held fixed)."""

  def loss(actor_params, batch):
    mu, log_std = networks.actor.apply(actor_params, batch["obs"])
    action, log_prob, _ = squashed_sample(mu, log_std, batch["noise"])
    critic_params = jax.lax.stop_gradient(batch["critic_params"])
    q1, q2 = networks.critic.apply(critic_params, batch["obs"], action)
    return per_task_mean(batch["alpha"] * log_prob - jnp.minimum(q1, q2), num_tasks)

  return loss


def temperature_loss(log_alpha, log_prob, task, target_entropy: float, per_task_alpha: bool):
  """MTRL's alpha loss: mean over rows of alpha * (-log pi - target_entropy), the bracket
  held fixed (so d/d log_alpha = alpha * (...))."""
  alpha = alpha_per_sample(log_alpha, task, per_task_alpha)
  return jnp.mean(alpha * jax.lax.stop_gradient(-log_prob - target_entropy))


class SACState(NamedTuple):
  """The whole agent: the critic's and the actor's `TrainState`s (parameters, optimiser and
  multi-task method states), the target critics, the temperature and its optimiser."""
  critic: TrainState
  actor: TrainState
  target_critic_params: Any
  log_alpha: jax.Array
  alpha_optimizer_state: Any
  step: jax.Array
  key: jax.Array


def update_noise(key, step, batch_size: int, action_dim: int):
  """The reparameterisation noise of update `step`: (for the target's next actions, for the
  actor loss), each (batch_size, action_dim)."""
  k_next, k_actor = jax.random.split(jax.random.fold_in(key, step))
  shape = (batch_size, action_dim)
  return jax.random.normal(k_next, shape), jax.random.normal(k_actor, shape)


# Methods whose weights take the logarithm of the losses cannot see the actor's losses,
# which are negative: like FAMO's own MT10 code, they weight the critic and leave the actor
# to LS.
ACTOR_METHOD_FALLBACK = {"famo": "ls", "db_mtl": "ls"}


class Agent(NamedTuple):
  """What `make_agent` builds: `init(key)`, `update(state, batch)` (jitted), `act(params,
  obs, key)` and `act_deterministic(params, obs)` (jitted), and the networks."""
  networks: Networks
  init: Callable
  update: Callable
  update_unjitted: Callable
  act: Callable
  act_deterministic: Callable


def make_agent(config, obs_dim: int, action_dim: int, num_tasks: int,
               optimizer: Callable[[float], optax.GradientTransformation] | None = None,
               ) -> Agent:
  """Builds multi-task SAC for `config` (an `MT10Config`).

  Args:
    config: the run's hyper-parameters (method, learning rates, widths, SAC constants).
    obs_dim, action_dim, num_tasks: sizes of the problem.
    optimizer: `optimizer(learning_rate) -> optax transform` for the actor and the critic
      (default Adam, betas 0.9/0.999, after global-norm clipping when `max_grad_norm`).

  Returns:
    An `Agent`.
  """
  networks = Networks(
      Actor(action_dim, config.hidden_dim, config.num_layers, tuple(config.log_std_bounds)),
      DoubleCritic(config.hidden_dim, config.num_layers))
  if optimizer is None:
    def optimizer(lr):
      adam = optax.adam(lr, b1=0.9, b2=0.999)
      if config.max_grad_norm is None:
        return adam
      return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adam)
  hparams = config.hparams()
  # The SAC networks have no task heads: every parameter is shared, said so explicitly.
  critic_method = ntkmtl_jax.methods.get(config.method, num_tasks, shared=True, **hparams)
  if critic_method.needs.uses_representation:
    raise ValueError(f"{config.method} works at a shared representation, which MT10's SAC "
                     "networks do not split off (the paper does not run NTKMTL-SR on MT10); "
                     "use method='ntkmtl'.")
  actor_method_name = ACTOR_METHOD_FALLBACK.get(config.method, config.method)
  actor_method = ntkmtl_jax.methods.get(
      actor_method_name, num_tasks, shared=True,
      **(hparams if actor_method_name == config.method else {}))
  critic_step = ntkmtl_jax.make_train_step(critic_task_losses(networks, num_tasks),
                                           critic_method, optimizer(config.critic_lr),
                                           jit=False)
  actor_step = ntkmtl_jax.make_train_step(actor_task_losses(networks, num_tasks),
                                          actor_method, optimizer(config.actor_lr), jit=False)
  alpha_optimizer = optax.adam(config.alpha_lr, b1=0.9, b2=0.999)
  target_entropy = -float(action_dim)
  per_task_alpha = bool(config.per_task_alpha)

  def init(key) -> SACState:
    k_actor, k_critic, k_actor_step, k_critic_step, k_update = jax.random.split(key, 5)
    obs = jnp.zeros((1, obs_dim))
    actor_params = networks.actor.init(k_actor, obs)
    critic_params = networks.critic.init(k_critic, obs, jnp.zeros((1, action_dim)))
    log_alpha = jnp.full((num_tasks,), np.log(config.init_temperature), jnp.float32)
    return SACState(critic=critic_step.init(critic_params, key=k_critic_step),
                    actor=actor_step.init(actor_params, key=k_actor_step),
                    target_critic_params=jax.tree.map(jnp.copy, critic_params),
                    log_alpha=log_alpha,
                    alpha_optimizer_state=alpha_optimizer.init(log_alpha),
                    step=jnp.zeros([], jnp.int32), key=k_update)

  def update(state: SACState, batch) -> tuple[SACState, dict]:
    batch_size = batch["obs"].shape[0]
    next_noise, actor_noise = update_noise(state.key, state.step, batch_size, action_dim)
    alpha = alpha_per_sample(state.log_alpha, batch["task"], per_task_alpha)
    target_q = critic_target(networks, state.actor.params, state.target_critic_params, batch,
                             alpha, next_noise, config.discount)
    critic_state, critic_metrics = critic_step(
        state.critic, dict(obs=batch["obs"], action=batch["action"], target_q=target_q))

    # The actor sees the freshly updated critic, as in MTRL.
    actor_state, actor_metrics = actor_step(
        state.actor, dict(obs=batch["obs"], noise=actor_noise, alpha=alpha,
                          critic_params=critic_state.params))
    mu, log_std = networks.actor.apply(state.actor.params, batch["obs"])
    _, log_prob, _ = squashed_sample(mu, log_std, actor_noise)
    alpha_loss, alpha_grad = jax.value_and_grad(temperature_loss)(
        state.log_alpha, log_prob, batch["task"], target_entropy, per_task_alpha)
    alpha_updates, alpha_opt_state = alpha_optimizer.update(alpha_grad,
                                                            state.alpha_optimizer_state)
    log_alpha = optax.apply_updates(state.log_alpha, alpha_updates)
    if config.actor_update_freq > 1:
      do_actor = state.step % config.actor_update_freq == 0
      pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(do_actor, a, b), new, old)
      actor_state = pick(actor_state, state.actor)
      log_alpha = pick(log_alpha, state.log_alpha)
      alpha_opt_state = pick(alpha_opt_state, state.alpha_optimizer_state)

    tau = config.critic_tau
    if config.critic_target_update_freq > 1:
      tau = jnp.where(state.step % config.critic_target_update_freq == 0, tau, 0.0)
    target = jax.tree.map(lambda t, p: (1 - tau) * t + tau * p, state.target_critic_params,
                          critic_state.params)
    metrics = dict(
        critic_losses=critic_metrics["losses"], critic_weights=critic_metrics["weights"],
        actor_losses=actor_metrics["losses"], actor_weights=actor_metrics["weights"],
        alpha_loss=alpha_loss, alpha=jnp.exp(log_alpha),
        skipped=critic_metrics["skipped"] + actor_metrics["skipped"],
        entropy=-jnp.mean(log_prob))
    return SACState(critic=critic_state, actor=actor_state, target_critic_params=target,
                    log_alpha=log_alpha, alpha_optimizer_state=alpha_opt_state,
                    step=state.step + 1, key=state.key), metrics

  @jax.jit
  def act(actor_params, obs, key):
    mu, log_std = networks.actor.apply(actor_params, obs)
    action, _, _ = squashed_sample(mu, log_std, jax.random.normal(key, mu.shape))
    return action

  @jax.jit
  def act_deterministic(actor_params, obs):
    return jnp.tanh(networks.actor.apply(actor_params, obs)[0])

  return Agent(networks, init, jax.jit(update, donate_argnums=(0,)), update, act,
               act_deterministic)
