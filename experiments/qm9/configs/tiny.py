"""A QM9 smoke run: a handful of molecules, batches of 4, a few steps."""

from experiments.qm9.configs import default


def get_config():
  return default.get_config().replace(batch_size=4, num_epochs=1, max_steps=3, log_every=1,
                                      eval_batch_size=8,
                                      data=dict(test_size=4, val_size=4, split_seed=0))
