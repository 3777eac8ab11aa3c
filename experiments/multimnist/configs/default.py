"""MultiMNIST defaults (not in the NTKMTL paper; the field's usual LeNet setting with Adam).

There is no published STL row for this construction: Delta m % uses the STL runs of the
same report (`--method stl --hp task=0` and `task=1`).
"""

from experiments.common import Config


def get_config() -> Config:
  return Config(
      benchmark="multimnist",
      method="ls",
      method_hparams={},
      learning_rate=1e-3,
      batch_size=256,
      num_epochs=10,
      lr_schedule="constant",
      max_grad_norm=1.0,
      eval_batch_size=1000,
      data=dict(val_size=10_000, data_seed=0),
      metric_names=("left acc", "right acc"),
      higher_is_better=(True, True),
      metric_tasks=(0, 1),
      stl_row=None,
  )
