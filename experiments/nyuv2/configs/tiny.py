"""A NYUv2 smoke run: a one-stage SegNet-MTAN of width 8, batch 4, a few steps; point
--data-dir at MTAN-layout files (`ntkmtl_jax.data.mtan.write_example_files` makes random
ones)."""

from experiments.nyuv2.configs import default


def get_config():
  return default.get_config().replace(batch_size=4, num_epochs=1, max_steps=3, log_every=1,
                                      eval_batch_size=4, model=dict(filters=(8,)))
