"""CelebA: the input pipeline on tfds' mock `celeb_a`, the paper's network, per-attribute F1,
and a few train steps (LS, NTKMTL) on the tiny config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
f1_score = pytest.importorskip("sklearn.metrics").f1_score
pytest.importorskip("PIL")  # the input pipeline resizes with it

from experiments import common
from experiments.celeba import configs, input_pipeline, train
from ntkmtl_jax.models.celeba import celeba_functions
from conftest import fit_a_few_steps

NUM_MOCK = 16


def test_pipeline_on_mock_celeba_shapes_ranges_labels_and_splits():
  config = configs.get_config("default")
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    splits = input_pipeline.load_splits(config)
    source = tfds.data_source("celeb_a", split="validation")
    want = np.asarray([[bool(source[i]["attributes"][a]) for a in input_pipeline.ATTRIBUTES]
                       for i in range(3)], np.int32)
  assert [len(s) for s in splits] == [NUM_MOCK] * 3
  batch = splits[1].take(np.arange(3))
  assert batch["x"].shape == (3, 64, 64, 3) and batch["x"].dtype == np.float32
  assert 0.0 <= batch["x"].min() and batch["x"].max() <= 1.0
  assert batch["y"].shape == (3, 40) and batch["y"].dtype == np.int32
  np.testing.assert_array_equal(batch["y"], want)


def test_resize_keeps_a_constant_image_constant(seed):
  colour = np.random.default_rng(seed).integers(0, 256, 3)
  image = np.broadcast_to(colour, (218, 178, 3)).astype(np.uint8)
  out = input_pipeline.resize(image, 64)
  assert out.shape == (64, 64, 3)
  np.testing.assert_allclose(out, np.broadcast_to(colour / 255.0, out.shape), atol=1e-6,
                             err_msg=f"seed={seed}")


def test_network_shapes_and_parameter_count():
  functions = celeba_functions()
  batch = {"x": jnp.zeros((2, 64, 64, 3)), "y": jnp.zeros((2, 40), jnp.int32)}
  params, model_state = jax.eval_shape(functions.init, jax.random.key(0), batch)
  count = sum(x.size for x in jax.tree.leaves(params))
  convs = [(3, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512), (512, 512)]
  expected = (sum(9 * i * o + 2 * o for i, o in convs)  # bias-free 3x3 convs + BatchNorm
              + 2 * (512 * 512 + 2 * 512)  # two bias-free dense layers + BatchNorm
              + 40 * (512 + 1))  # 40 linear heads
  print(f"CelebA network parameters: {count:,} (the paper's network: {expected:,})")
  assert count == expected
  assert jax.eval_shape(functions.predict, params, model_state, batch).shape == (2, 40)


def test_f1_accumulator_against_sklearn(seed):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(50, 5))
  labels = rng.integers(0, 2, (50, 5))
  acc = train.F1(("a", "b", "c", "d", "e"))
  acc.update(logits[:20], {"y": labels[:20]})
  acc.update(logits[20:], {"y": labels[20:]})
  got = np.asarray(list(acc.result().values()))
  want = [f1_score(labels[:, j], logits[:, j] >= 0, zero_division=0) * 100 for j in range(5)]
  np.testing.assert_allclose(got, want, atol=1e-9, err_msg=f"seed={seed}")


def test_model_selection_is_the_mean_validation_f1(seed):
  config = configs.get_config("tiny")
  values = dict(zip(config.metric_names, np.random.default_rng(seed).uniform(0, 100, 4)))
  assert common.selection_score(config, values) == pytest.approx(np.mean(list(values.values())))
  assert common.delta_m_of(config, values) is None  # the paper publishes no STL row


@pytest.fixture(scope="module")
def tiny_pipeline():
  """One pipeline for the train-step tests, so they share the init and predict compilations."""
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    config = configs.get_config("tiny")
    pipeline = train.create_pipeline(config)
  return config, pipeline


@pytest.mark.parametrize("method", ["ls", "ntkmtl"])
def test_a_few_train_steps_have_finite_losses(method, tiny_pipeline):
  config, pipeline = tiny_pipeline
  results = fit_a_few_steps(config, pipeline, method, num_tasks=4)
  assert set(results["metrics"]) == set(configs.get_config("tiny").metric_names)


def test_missing_dataset_gives_one_clear_message(tmp_path):
  from experiments.celeba import main
  with pytest.raises(SystemExit) as exit_info:
    main.main(["--config", "tiny", "--data-dir", str(tmp_path)])
  message = str(exit_info.value)
  assert "celeb_a" in message and "tfds build celeb_a" in message
  assert "--data-dir DIR" in message and str(tmp_path) in message
