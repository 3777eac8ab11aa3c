"""MultiMNIST: the overlay construction on tfds' mock `mnist`, the LeNet, accuracy, and a few
train steps (LS, NTKMTL) with a checkpoint and a resume."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

from experiments import common
from experiments.multimnist import configs, input_pipeline, main, train
from ntkmtl_jax.models.lenet import lenet_functions

NUM_MOCK = 24  # tfds mock examples per split


def test_overlay_matches_an_independent_bilinear_resize(seed):
  rng = np.random.default_rng(seed)
  left = rng.integers(0, 256, (3, 28, 28)).astype(np.uint8)
  right = rng.integers(0, 256, (3, 28, 28)).astype(np.uint8)
  canvas = np.zeros((3, 36, 36))
  canvas[:, :28, :28] = left / 255.0
  canvas[:, 8:, 8:] = np.maximum(canvas[:, 8:, 8:], right / 255.0)
  want = jax.image.resize(jnp.asarray(canvas), (3, 28, 28), "bilinear", antialias=False)
  got = input_pipeline.overlay(left, right)
  assert got.shape == (3, 28, 28, 1) and got.dtype == np.float32
  np.testing.assert_allclose(got[..., 0], np.asarray(want), atol=1e-5, err_msg=f"seed={seed}")


def test_pipeline_on_mock_mnist_shapes_labels_and_split_sizes():
  config = configs.get_config("tiny")
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    train_split, val_split, test_split = input_pipeline.load_splits(config)
    source = tfds.data_source("mnist", split="train")
    mnist_labels = np.asarray([source[i]["label"] for i in range(len(source))])
  val_size = config.data["val_size"]
  assert (len(train_split), len(val_split), len(test_split)) == (NUM_MOCK - val_size, val_size,
                                                                 NUM_MOCK)
  batch = train_split.take(np.arange(5))
  assert batch["image"].shape == (5, 28, 28, 1) and batch["image"].dtype == np.float32
  assert batch["image"].min() >= 0.0 and batch["image"].max() <= 1.0
  assert batch["labels"].shape == (5, 2) and batch["labels"].dtype == np.int32
  # Left digit = MNIST image i, right digit = its partner from the seeded permutation.
  partner = np.random.default_rng(config.data["data_seed"]).permutation(NUM_MOCK - val_size)
  np.testing.assert_array_equal(batch["labels"][:, 0], mnist_labels[:5])
  np.testing.assert_array_equal(batch["labels"][:, 1], mnist_labels[partner[:5]])


def test_lenet_shapes_and_parameter_count():
  functions = lenet_functions()
  batch = {"image": jnp.zeros((3, 28, 28, 1)), "labels": jnp.zeros((3, 2), jnp.int32)}
  params, model_state = jax.eval_shape(functions.init, jax.random.key(0), batch)
  count = sum(x.size for x in jax.tree.leaves(params))
  # Sener & Koltun's MultiLeNet: conv 1->10 (5x5), conv 10->20 (5x5), fc 320->50, and per
  # task fc 50->50, fc 50->10, all with biases.
  expected = (25 * 10 + 10) + (250 * 20 + 20) + (320 * 50 + 50) + 2 * (50 * 50 + 50 + 50 * 10 + 10)
  print(f"MultiMNIST LeNet parameters: {count:,} (reference network: {expected:,})")
  assert count == expected
  assert jax.eval_shape(functions.predict, params, model_state, batch).shape == (3, 2, 10)
  assert jax.eval_shape(functions.loss_fn, params, model_state, batch)[0].shape == (2,)


def test_accuracy_accumulator_against_hand_count():
  acc = train.Accuracy()
  logits = np.zeros((4, 2, 10))
  logits[np.arange(4), 0, [1, 2, 3, 4]] = 1.0  # left predictions 1, 2, 3, 4
  logits[np.arange(4), 1, [5, 5, 5, 5]] = 1.0  # right predictions all 5
  acc.update(logits[:2], {"labels": np.asarray([[1, 5], [0, 5]])})
  acc.update(logits[2:], {"labels": np.asarray([[3, 0], [4, 1]])})
  assert acc.result() == {"left acc": 75.0, "right acc": 50.0}


def test_a_few_ntkmtl_steps_have_finite_losses():
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    results = main.main(["--config", "tiny", "--method", "ntkmtl", "--max-steps", "2"])
  assert results["steps"] == 2 and results["skipped"] == 0
  assert np.all(np.isfinite(results["last_losses"])) and len(results["last_losses"]) == 2
  assert all(np.isfinite(v) for v in results["metrics"].values())
  assert all(np.all(np.isfinite(h["val"][n])) for h in results["history"] for n in h["val"])


def test_a_few_ls_steps_with_checkpoint_and_resume(tmp_path, capsys):
  workdir = str(tmp_path / "ls")
  config = configs.get_config("tiny").replace(method="ls")
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    pipeline = train.create_pipeline(config)
  first = common.fit(config.replace(max_steps=1), pipeline, workdir)
  second = common.fit(config.replace(max_steps=2), pipeline, workdir)
  assert "Resuming multimnist/ls" in capsys.readouterr().out
  assert (first["steps"], second["steps"]) == (1, 2)
  assert second["skipped"] == 0 and np.all(np.isfinite(second["last_losses"]))
  assert os.path.isdir(os.path.join(workdir, "best")) and os.path.isdir(
      os.path.join(workdir, "latest"))
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["steps"] == 2
  # The best checkpoint restores, and scores on validation what the run recorded for it.
  best = common.restore_checkpoint(config, pipeline, workdir, "best")
  val = common.evaluate(pipeline, jax.jit(pipeline.functions.predict), best.params,
                        best.model_state, pipeline.val, config.eval_batch_size)
  assert val == second["val_metrics"]
