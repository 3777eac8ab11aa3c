"""The official protocol on celeba, as the library's benchmark defines it
(`ntkmtl_jax.benchmarks.celeba.default_config`); `ntkmtl train --benchmark celeba` runs the same."""

from ntkmtl_jax.benchmarks import celeba


def get_config():
  return celeba.default_config()
