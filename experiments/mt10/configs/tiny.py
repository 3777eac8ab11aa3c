"""A smoke run: small networks, 20 steps, evaluations at steps 0 and 20."""

from experiments.mt10.configs import default


def get_config():
  return default.get_config().replace(
      num_train_steps=20, init_steps=8, warmup_updates=2, batch_size_per_task=4,
      replay_capacity_per_task=64, hidden_dim=32, num_layers=2, max_episode_steps=10,
      eval_freq=20, log_every=1)
