"""The official protocol on cityscapes, as the library's benchmark defines it
(`ntkmtl_jax.benchmarks.cityscapes.default_config`); `ntkmtl train --benchmark cityscapes` runs the same."""

from ntkmtl_jax.benchmarks import cityscapes


def get_config():
  return cityscapes.default_config()
