"""A CPU run of minutes (docs/mt10_short_run.png): the paper's networks and SAC constants,
2,000 steps (20,000 transitions), 32 transitions per task per update instead of 128 (so
that NTKMTL's ten backward passes fit the time), a 500-step random warm-up and an
evaluation every 250 steps."""

from experiments.mt10.configs import default


def get_config():
  return default.get_config().replace(
      num_train_steps=2000, init_steps=500, warmup_updates=50, batch_size_per_task=32,
      replay_capacity_per_task=5000, eval_freq=250, log_every=25)
