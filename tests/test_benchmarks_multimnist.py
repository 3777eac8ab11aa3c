"""MultiMNIST: the overlay construction on tfds' mock `mnist`, the LeNet, accuracy, a few
train steps (LS, NTKMTL) with a checkpoint and a resume, and the same run from the `ntkmtl`
command and from the experiment's command line."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from ntkmtl_jax import benchmarks, cli, loop, metrics, report
from ntkmtl_jax.benchmarks import multimnist
from ntkmtl_jax.checkpoints import RunCheckpoints
from ntkmtl_jax.models.lenet import lenet_functions
from ntkmtl_jax.results import RunResult

NUM_MOCK = 24  # tfds mock examples per split


def _ntkmtl(command, workdir, flags):
  """`ntkmtl COMMAND --benchmark multimnist FLAGS --quiet --no-plots --workdir WORKDIR` in
  process, FLAGS a string of words separated by spaces; the exit status."""
  argv = [command, "--benchmark", "multimnist", *flags.split(), "--quiet", "--no-plots"]
  return cli.main(argv + ["--workdir", str(workdir)])


def test_overlay_matches_an_independent_bilinear_resize(seed):
  rng = np.random.default_rng(seed)
  left = rng.integers(0, 256, (3, 28, 28)).astype(np.uint8)
  right = rng.integers(0, 256, (3, 28, 28)).astype(np.uint8)
  canvas = np.zeros((3, 36, 36))
  canvas[:, :28, :28] = left / 255.0
  canvas[:, 8:, 8:] = np.maximum(canvas[:, 8:, 8:], right / 255.0)
  want = jax.image.resize(jnp.asarray(canvas), (3, 28, 28), "bilinear", antialias=False)
  got = multimnist.overlay(left, right)
  assert got.shape == (3, 28, 28, 1) and got.dtype == np.float32
  np.testing.assert_allclose(got[..., 0], np.asarray(want), atol=1e-5, err_msg=f"seed={seed}")


def test_pipeline_on_mock_mnist_shapes_labels_and_split_sizes():
  config = benchmarks.get_config("multimnist", "tiny")
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    train_split, val_split, test_split = multimnist.load_splits(config.data_dir, **config.data)
    source = tfds.data_source("mnist", split="train")
    mnist_labels = np.asarray([source[i]["label"] for i in range(len(source))])
  val_size = config.data["val_size"]
  assert (len(train_split), len(val_split), len(test_split)) == (
    NUM_MOCK - val_size,
    val_size,
    NUM_MOCK,
  )
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
  acc = multimnist.Accuracy()
  logits = np.zeros((4, 2, 10))
  logits[np.arange(4), 0, [1, 2, 3, 4]] = 1.0  # left predictions 1, 2, 3, 4
  logits[np.arange(4), 1, [5, 5, 5, 5]] = 1.0  # right predictions all 5
  acc.update(logits[:2], {"labels": np.asarray([[1, 5], [0, 5]])})
  acc.update(logits[2:], {"labels": np.asarray([[3, 0], [4, 1]])})
  assert acc.result() == {"left acc": 75.0, "right acc": 50.0}


def test_comparison_of_stl_and_ntkmtl_prints_and_writes_the_report(tmp_path, capsys):
  workdir = str(tmp_path / "compare")
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    code = _ntkmtl("compare", workdir, "--preset tiny --methods stl,ntkmtl --seeds 0 --steps 2")
  assert code == 0
  with open(os.path.join(workdir, "results.json")) as f:
    runs = [RunResult.from_dict(r) for r in json.load(f)["runs"]]
  assert [(r.method, r.hparams.get("task")) for r in runs] == [
    ("stl", 0),
    ("stl", 1),
    ("ntkmtl", None),
  ]
  ntk = runs[-1]
  assert ntk.steps == 2 and ntk.skipped == 0
  assert np.all(np.isfinite(ntk.last_losses)) and len(ntk.last_losses) == 2
  assert all(np.isfinite(v) for v in ntk.metrics.values())
  # Delta m % against the STL runs (no published STL row for MultiMNIST).
  stl = [runs[0].metrics["left acc"], runs[1].metrics["right acc"]]
  want = (
    metrics.delta_m([ntk.metrics["left acc"], ntk.metrics["right acc"]], stl, [True, True])
    if min(stl) > 0
    else None
  )
  scoring = multimnist.SCORING
  summary = report.summarize(
    runs, scoring.metric_names, scoring.higher_is_better, scoring.metric_tasks, scoring.stl_row
  )
  assert list(summary) == ["stl", "ntkmtl"]
  if want is not None:
    assert summary["ntkmtl"]["delta_m_mean"] == pytest.approx(want)
  out = capsys.readouterr().out
  assert "STL" in out and "ntkmtl" in out and "MR" in out
  assert os.path.isfile(os.path.join(workdir, "results.csv"))
  assert os.path.isfile(os.path.join(workdir, "ntkmtl-seed0", "results.json"))


def test_a_few_ls_steps_with_checkpoint_and_resume(tmp_path, capsys):
  workdir = str(tmp_path / "ls")
  config = benchmarks.get_config("multimnist", "tiny").replace(method="ls")
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    bench = benchmarks.from_config(config)
  first = loop.fit(bench, config.replace(max_steps=1), workdir, progress=False)
  second = loop.fit(bench, config.replace(max_steps=2), workdir, progress=False)
  assert "Resuming multimnist/ls" in capsys.readouterr().out
  assert (first.steps, second.steps) == (1, 2)
  assert second.skipped == 0 and np.all(np.isfinite(second.last_losses))
  assert second.history.losses.shape == (2, 2)  # the resumed run keeps the first step's record
  np.testing.assert_array_equal(second.history.losses[:1], first.history.losses)
  assert os.path.isdir(os.path.join(workdir, "best"))
  assert RunCheckpoints(workdir).steps()[0] == 2  # the newest checkpoint: where it stopped
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["steps"] == 2
  # The best checkpoint restores, and scores on validation what the run recorded for it.
  best = loop.restore_checkpoint(bench, config, workdir, "best")
  val = bench.evaluate(best.params, best.model_state, "val", config.eval_batch_size)
  assert val == second.val_metrics


def test_the_ntkmtl_command_and_the_python_api_run_the_same_protocol(tmp_path):
  out = tmp_path / "cli"
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    code = _ntkmtl("train", out, "--option val_size=8 --method ntkmtl --steps 2 --batch-size 8")
    assert code == 0
    config = benchmarks.get_config("multimnist", "tiny").replace(method="ntkmtl", max_steps=2)
    from_experiment = loop.fit(benchmarks.from_config(config), config, progress=False)
  [from_cli] = json.loads((out / "results.json").read_text())["runs"]
  # Same benchmark, method, optimiser, batches and model selection: the same run.
  assert from_cli["steps"] == from_experiment.steps == 2
  np.testing.assert_array_equal(from_cli["history"]["losses"], from_experiment.history.losses)
  assert from_cli["metrics"] == from_experiment.metrics
  assert from_cli["val_metrics"] == from_experiment.val_metrics


def test_library_registry_builds_the_benchmark_for_the_loop():
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    bench = benchmarks.get_benchmark("multimnist", val_size=8)
  assert bench.metric_names == ("left acc", "right acc") and bench.num_tasks == 2
  result = loop.fit(
    bench, bench.config.replace(method="ntkmtl_sr", batch_size=8, max_steps=2), progress=False
  )
  assert result.steps == 2 and result.skipped == 0
  assert np.all(np.isfinite(result.history.losses))
  assert set(result.metrics) == set(bench.metric_names)
