"""Training and evaluation on multimnist: the library's loop on the library's benchmark."""

from __future__ import annotations

from ntkmtl_jax import benchmarks, training


def train_and_evaluate(config: training.Config, workdir: str | None) -> training.RunResult:
  """Trains `config.method` on the benchmark `config` names; checkpoints in `workdir`."""
  return training.fit(benchmarks.from_config(config), config, workdir)
