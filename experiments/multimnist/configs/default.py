"""The official protocol on multimnist, as the library's benchmark defines it
(`ntkmtl_jax.benchmarks.multimnist.default_config`); `ntkmtl train --benchmark multimnist` runs the same."""

from ntkmtl_jax.benchmarks import multimnist


def get_config():
  return multimnist.default_config()
