"""CelebA: the input pipeline on tfds' mock `celeb_a`, the paper's network and per-attribute
F1 (train steps of every benchmark: test_benchmarks.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
f1_score = pytest.importorskip("sklearn.metrics").f1_score
pytest.importorskip("PIL")  # the input pipeline resizes with it

from ntkmtl_jax import benchmarks, cli
from ntkmtl_jax.benchmarks import celeba
from ntkmtl_jax.models.celeba import celeba_functions

NUM_MOCK = 16


def test_pipeline_on_mock_celeba_shapes_ranges_labels_and_splits():
  config = benchmarks.get_config("celeba", "default")
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    splits = celeba.load_splits(config.data_dir, **config.data)
    source = tfds.data_source("celeb_a", split="validation")
    want = np.asarray(
      [[bool(source[i]["attributes"][a]) for a in celeba.ATTRIBUTES] for i in range(3)], np.int32
    )
  assert [len(s) for s in splits] == [NUM_MOCK] * 3
  batch = splits[1].take(np.arange(3))
  assert batch["x"].shape == (3, 64, 64, 3) and batch["x"].dtype == np.float32
  assert 0.0 <= batch["x"].min() and batch["x"].max() <= 1.0
  assert batch["y"].shape == (3, 40) and batch["y"].dtype == np.int32
  np.testing.assert_array_equal(batch["y"], want)


def test_resize_keeps_a_constant_image_constant(seed):
  colour = np.random.default_rng(seed).integers(0, 256, 3)
  image = np.broadcast_to(colour, (218, 178, 3)).astype(np.uint8)
  out = celeba.resize(image, 64)
  assert out.shape == (64, 64, 3)
  np.testing.assert_allclose(
    out, np.broadcast_to(colour / 255.0, out.shape), atol=1e-6, err_msg=f"seed={seed}"
  )


def test_network_shapes_and_parameter_count():
  functions = celeba_functions()
  batch = {"x": jnp.zeros((2, 64, 64, 3)), "y": jnp.zeros((2, 40), jnp.int32)}
  params, model_state = jax.eval_shape(functions.init, jax.random.key(0), batch)
  count = sum(x.size for x in jax.tree.leaves(params))
  convs = [(3, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512), (512, 512)]
  expected = (
    sum(9 * i * o + 2 * o for i, o in convs)  # bias-free 3x3 convs + BatchNorm
    + 2 * (512 * 512 + 2 * 512)  # two bias-free dense layers + BatchNorm
    + 40 * (512 + 1)
  )  # 40 linear heads
  print(f"CelebA network parameters: {count:,} (the paper's network: {expected:,})")
  assert count == expected
  assert jax.eval_shape(functions.predict, params, model_state, batch).shape == (2, 40)


def test_f1_accumulator_against_sklearn(seed):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(50, 5))
  labels = rng.integers(0, 2, (50, 5))
  acc = celeba.F1(("a", "b", "c", "d", "e"))
  acc.update(logits[:20], {"y": labels[:20]})
  acc.update(logits[20:], {"y": labels[20:]})
  got = np.asarray(list(acc.result().values()))
  want = [f1_score(labels[:, j], logits[:, j] >= 0, zero_division=0) * 100 for j in range(5)]
  np.testing.assert_allclose(got, want, atol=1e-9, err_msg=f"seed={seed}")


def test_model_selection_is_the_mean_validation_f1(seed):
  scoring = celeba.scoring(benchmarks.get_config("celeba", "tiny").data["num_attributes"])
  assert scoring.metric_names == tuple(f"{a} F1" for a in celeba.ATTRIBUTES[:4])
  values = dict(zip(scoring.metric_names, np.random.default_rng(seed).uniform(0, 100, 4)))
  assert scoring.selection_score(values) == pytest.approx(np.mean(list(values.values())))
  assert scoring.delta_m(values) is None  # the paper publishes no STL row


def test_missing_dataset_gives_one_clear_message(tmp_path, capsys):
  assert (
    cli.main(
      [
        "train",
        "--benchmark",
        "celeba",
        "--preset",
        "tiny",
        "--data-dir",
        str(tmp_path),
        "--workdir",
        str(tmp_path / "out"),
        "--quiet",
      ]
    )
    == 2
  )
  message = capsys.readouterr().err
  assert "celeb_a" in message and "tfds build celeb_a" in message
  assert "--data-dir DIR" in message and str(tmp_path) in message
