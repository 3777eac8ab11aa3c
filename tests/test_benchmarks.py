"""A few train steps (LS, NTKMTL) of every paper benchmark's tiny config, through the
library's loop: tfds' mock data for the tfds benchmarks, generated files for the MTAN layout."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ntkmtl_jax import benchmarks, loop

from conftest import write_mtan_files

MOCK_EXAMPLES = {"qm9": 20, "celeba": 16, "multimnist": 24}  # enough for the tiny splits


@pytest.fixture(scope="module", params=["qm9", "celeba", "multimnist", "nyuv2", "cityscapes"])
def tiny_benchmark(request, tmp_path_factory):
  """One benchmark per name for the train-step tests, so they share its compilations."""
  name = request.param
  config = benchmarks.get_config(name, "tiny")
  if name not in MOCK_EXAMPLES:
    root = write_mtan_files(str(tmp_path_factory.mktemp(name)), name)
    return config.replace(data_dir=root), benchmarks.from_config(config.replace(data_dir=root))
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES[name]):
    return config, benchmarks.from_config(config)


@pytest.mark.parametrize("method", ["ls", "ntkmtl"])
def test_a_few_train_steps_have_finite_losses(method, tiny_benchmark, steps=2):
  config, bench = tiny_benchmark
  result = loop.fit(bench, config.replace(method=method, max_steps=steps), progress=False)
  # Every step taken, none skipped, finite last losses of every task, every metric scored,
  # and a finite Delta m % where the benchmark has a published STL row.
  assert result.steps == steps and result.skipped == 0
  assert len(result.last_losses) == bench.num_tasks
  assert np.all(np.isfinite(result.last_losses))
  assert set(result.metrics) == set(bench.metric_names)
  if bench.stl_row is not None:
    assert np.isfinite(bench.delta_m(result.metrics))
