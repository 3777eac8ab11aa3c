"""The official protocol on nyuv2, as the library's benchmark defines it
(`ntkmtl_jax.benchmarks.nyuv2.default_config`); `ntkmtl train --benchmark nyuv2` runs the same."""

from ntkmtl_jax.benchmarks import nyuv2


def get_config():
  return nyuv2.default_config()
