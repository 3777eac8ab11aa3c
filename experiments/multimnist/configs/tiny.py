"""A MultiMNIST smoke run: a few small batches (for tests and `--config tiny`)."""

from experiments.multimnist.configs import default


def get_config():
  return default.get_config().replace(batch_size=8, num_epochs=1, max_steps=3, log_every=1,
                                      eval_batch_size=16, data=dict(val_size=8, data_seed=0))
