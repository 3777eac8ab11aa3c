"""The official protocol on qm9, as the library's benchmark defines it
(`ntkmtl_jax.benchmarks.qm9.default_config`); `ntkmtl train --benchmark qm9` runs the same."""

from ntkmtl_jax.benchmarks import qm9


def get_config():
  return qm9.default_config()
