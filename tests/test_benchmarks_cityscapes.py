"""Cityscapes: the MTAN `.npy` layout (label_7, depth) on generated files, SegNet-MTAN for
two tasks, the metrics and Delta m % on the paper's rows (train steps of every benchmark:
test_benchmarks.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkmtl_jax import metrics
from ntkmtl_jax.benchmarks import cityscapes
from ntkmtl_jax.benchmarks.mtan import DenseMetrics
from ntkmtl_jax.models import mtan

from conftest import check_published_delta_m, tiny_mtan_splits, write_mtan_files

H, W = 32, 64


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return write_mtan_files(str(tmp_path_factory.mktemp("cityscapes")), "cityscapes", H, W)


def test_pipeline_reads_the_mtan_layout(data_dir, seed):
  train_split, test_split = tiny_mtan_splits("cityscapes", data_dir)
  batch = test_split.take(np.arange(4))
  assert set(batch) == {"image", "label", "depth"}
  assert batch["image"].shape == (4, H, W, 3) and batch["label"].dtype == np.int32
  assert batch["depth"].shape == (4, H, W, 1) and batch["depth"].dtype == np.float32
  assert -1 <= batch["label"].min() and batch["label"].max() <= 6
  np.testing.assert_array_equal(batch["label"][3], np.load(f"{data_dir}/val/label_7/3.npy"))
  # Training batches are augmented: same shapes, labels from the originals.
  rng = np.random.default_rng(seed)
  augmented = train_split.take(np.arange(4), rng)
  assert {k: v.shape for k, v in augmented.items()} == {k: v.shape for k, v in batch.items()}
  assert set(np.unique(augmented["label"])) <= set(range(-1, 7))


def test_segnet_mtan_two_tasks_size_and_outputs():
  functions = mtan.mtan_functions(7, ("segmentation", "depth"))
  batch = {
    "image": jnp.zeros((2, 128, 256, 3)),
    "label": jnp.zeros((2, 128, 256), jnp.int32),
    "depth": jnp.ones((2, 128, 256, 1)),
  }
  params, state = jax.eval_shape(functions.init, jax.random.key(0), batch)
  count = sum(x.size for x in jax.tree.leaves(params))
  # One attention branch fewer than NYUv2's three-task network, and two heads.
  print(f"SegNet-MTAN (Cityscapes) parameters: {count:,}")
  three = jax.eval_shape(
    mtan.mtan_functions(7, ("segmentation", "depth", "depth")).init, jax.random.key(0), batch
  )[0]
  branch = sum(x.size for x in jax.tree.leaves(three)) - count
  assert (
    branch
    == sum(x.size for k, v in three["encoder"].items() if "_t2_" in k for x in jax.tree.leaves(v))
    + 64 * 64 * 9
    + 64
    + 64
    + 1
  )
  seg, depth = jax.eval_shape(functions.predict, params, state, batch)
  assert (seg.shape, depth.shape) == ((2, 128, 256, 7), (2, 128, 256, 1))


def test_metrics_for_segmentation_and_depth_by_hand():
  acc = DenseMetrics(("segmentation", "depth"), num_classes=2)
  logits = np.asarray([[[[1.0, 0.0], [0.0, 1.0]]]])  # predictions 0, 1
  acc.update(
    (logits, np.asarray([[[[0.5], [0.1]]]])),
    {"label": np.asarray([[[0, 0]]]), "depth": np.asarray([[[[1.0], [0.2]]]])},
  )
  r = acc.result()
  assert r["pix acc"] == pytest.approx(50.0)
  assert r["mIoU"] == pytest.approx(100 * (1 / 2 + 0 / 1) / 2)
  assert r["abs err"] == pytest.approx((0.5 + 0.1) / 2)
  assert r["rel err"] == pytest.approx((0.5 + 0.5) / 2)


def test_delta_m_of_the_paper_rows():
  scoring = cityscapes.SCORING
  assert metrics.delta_m(
    cityscapes.PAPER_ROWS["ntkmtl"], cityscapes.STL, scoring.higher_is_better
  ) == pytest.approx(1.92, abs=0.005)
  # Published values are means over seeds of Delta m, so they differ from Delta m of the
  # mean row by up to ~0.1.
  check_published_delta_m(scoring, cityscapes.PAPER_ROWS, cityscapes.PAPER_DELTA_M, 0.11)
