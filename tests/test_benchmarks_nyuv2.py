"""NYUv2: the MTAN `.npy` layout on generated files, SegNet-MTAN (size, outputs, the
representation z), the dense metrics against hand-computed examples and Delta m % on the
paper's rows (train steps of every benchmark: test_benchmarks.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkmtl_jax import benchmarks, metrics
from ntkmtl_jax.benchmarks import nyuv2
from ntkmtl_jax.benchmarks.mtan import DenseMetrics
from ntkmtl_jax.data import DatasetMissingError
from ntkmtl_jax.data import mtan as layout
from ntkmtl_jax.models import mtan

from conftest import check_published_delta_m, tiny_mtan_splits, write_mtan_files

H, W = 32, 64


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return write_mtan_files(str(tmp_path_factory.mktemp("nyuv2")), "nyuv2", H, W)


def test_pipeline_reads_the_mtan_layout(data_dir):
  train_split, test_split = tiny_mtan_splits("nyuv2", data_dir)
  batch = test_split.take(np.arange(3))
  assert batch["image"].shape == (3, H, W, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (3, H, W) and batch["label"].dtype == np.int32
  assert batch["depth"].shape == (3, H, W, 1) and batch["normal"].shape == (3, H, W, 3)
  assert batch["label"].min() >= -1 and batch["label"].max() <= 12
  np.testing.assert_array_equal(batch["depth"][1], np.load(f"{data_dir}/val/depth/1.npy"))
  np.testing.assert_array_equal(batch["label"][2], np.load(f"{data_dir}/val/label/2.npy"))


def test_augmentation_keeps_shapes_labels_and_unflipped_normals(data_dir, seed):
  example = {
    k: np.load(f"{data_dir}/train/{k}/0.npy").astype(np.float32)
    for k in ("image", "label", "depth", "normal")
  }
  rng = np.random.default_rng(seed)
  out = layout.augment(example, rng)
  assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in example.items()}
  # Nearest-neighbour resizing keeps labels among the original ones; depth only shrinks.
  assert set(np.unique(out["label"])) <= set(np.unique(example["label"]))
  assert out["depth"].max() <= example["depth"].max() + 1e-6
  assert 0.0 <= out["image"].min() and out["image"].max() <= 1.0


def test_flip_negates_the_normals_x_component():
  example = {
    "image": np.zeros((4, 4, 3), np.float32),
    "label": np.zeros((4, 4), np.float32),
    "depth": np.ones((4, 4, 1), np.float32),
    "normal": np.tile(np.asarray([0.6, 0.0, 0.8], np.float32), (4, 4, 1)),
  }

  class Always:  # scale 1 (index 0), crop at 0, flip
    def integers(self, low, high=None):
      return 0

    def random(self):
      return 0.0

  out = layout.augment(example, Always())
  np.testing.assert_allclose(out["normal"][0, 0], [-0.6, 0.0, 0.8])


def test_missing_data_gives_one_clear_message(tmp_path):
  config = benchmarks.get_config("nyuv2", "tiny").replace(data_dir=str(tmp_path))
  with pytest.raises(DatasetMissingError, match="--data-dir") as error:
    benchmarks.from_config(config)
  assert "lorenmt/mtan" in str(error.value)


def test_segnet_mtan_size_outputs_and_representation():
  functions = mtan.mtan_functions(13, ("segmentation", "depth", "normal"))
  batch = {
    "image": jnp.zeros((2, 288, 384, 3)),
    "label": jnp.zeros((2, 288, 384), jnp.int32),
    "depth": jnp.ones((2, 288, 384, 1)),
    "normal": jnp.ones((2, 288, 384, 3)),
  }
  params, state = jax.eval_shape(functions.init, jax.random.key(0), batch)
  count = sum(x.size for x in jax.tree.leaves(params))
  print(f"SegNet-MTAN (NYUv2) parameters: {count:,} (MTAN paper: 44.23M)")
  assert abs(count - 44.23e6) / 44.23e6 < 1e-3
  heads = sum(x.size for x in jax.tree.leaves(params["heads"]))
  assert heads == sum(64 * 64 * 9 + 64 + 64 * c + c for c in (13, 1, 3))
  seg, depth, normal = jax.eval_shape(functions.predict, params, state, batch)
  assert (seg.shape, depth.shape, normal.shape) == (
    (2, 288, 384, 13),
    (2, 288, 384, 1),
    (2, 288, 384, 3),
  )
  z, _ = jax.eval_shape(functions.encode, params, state, batch)
  assert [t.shape for t in z] == [(2, 288, 384, 64)] * 3


@pytest.mark.one_seed
def test_tiny_mtan_normals_are_unit_and_losses_match_their_definitions(seed):
  rng = np.random.default_rng(seed)
  functions = mtan.mtan_functions(13, ("segmentation", "depth", "normal"), filters=(4,))
  batch = {
    "image": rng.random((2, 8, 8, 3), np.float32),
    "label": rng.integers(-1, 13, (2, 8, 8)).astype(np.int32),
    "depth": rng.uniform(0.0, 3.0, (2, 8, 8, 1)).astype(np.float32),
    "normal": rng.normal(size=(2, 8, 8, 3)).astype(np.float32),
  }
  batch["depth"][0, :2] = 0.0
  params, state = jax.jit(functions.init)(jax.random.key(seed, impl="rbg"), batch)
  seg, depth, normal = jax.jit(functions.predict)(params, state, batch)
  # Unit length wherever the head's output is not zero. With 4 filters a pixel can be dead
  # at init (its head output is exactly 0: two of 128 with seed 0); like F.normalize, the
  # model maps it to 0, not NaN.
  norms = np.linalg.norm(normal, axis=-1)
  live = norms != 0
  assert live.mean() > 0.9, f"seed={seed}: {np.sum(~live)} dead pixels"
  np.testing.assert_allclose(norms[live], 1.0, rtol=1e-5, err_msg=f"seed={seed}")
  # Reference losses in NumPy from the eval-mode outputs.
  seg, depth, normal = (np.asarray(a, np.float64) for a in (seg, depth, normal))
  log_p = seg - np.log(np.exp(seg).sum(-1, keepdims=True))
  valid = batch["label"] >= 0
  ce = -np.take_along_axis(log_p, np.maximum(batch["label"], 0)[..., None], -1)[..., 0][valid]
  has_depth = batch["depth"] != 0
  has_normal = np.any(batch["normal"] != 0, axis=-1)
  want = [
    ce.mean(),
    np.abs(depth - batch["depth"])[has_depth].mean(),
    1 - np.sum(normal * batch["normal"], -1)[has_normal].mean(),
  ]
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  got = [
    mtan.segmentation_loss(f32(seg), batch["label"]),
    mtan.depth_loss(f32(depth), batch["depth"]),
    mtan.normal_loss(f32(normal), batch["normal"]),
  ]
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, err_msg=f"seed={seed}")


def test_dense_metrics_against_a_hand_computed_example():
  acc = DenseMetrics(("segmentation", "depth", "normal"), num_classes=3)
  logits = np.zeros((1, 2, 3, 3))
  predicted = np.asarray([[0, 1, 2], [0, 0, 2]])
  logits[0, np.arange(2)[:, None], np.arange(3)[None, :], predicted] = 1.0
  labels = np.asarray([[[0, 1, 1], [2, -1, 2]]])  # one ignored pixel
  depth_pred = np.asarray([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).reshape(1, 2, 3, 1)
  depth_true = np.asarray([[2.0, 2.0, 0.0], [2.0, 5.0, 3.0]]).reshape(1, 2, 3, 1)
  angle = np.radians([[0.0, 10.0, 20.0], [40.0, 90.0, 0.0]])
  normal_pred = np.stack([np.cos(angle), np.sin(angle), np.zeros_like(angle)], -1)[None]
  normal_true = np.tile(np.asarray([1.0, 0.0, 0.0]), (1, 2, 3, 1))
  normal_true[0, 1, 2] = 0.0  # no normal there
  acc.update(
    (logits, depth_pred, normal_pred), {"label": labels, "depth": depth_true, "normal": normal_true}
  )
  r = acc.result()
  # Labelled pixels: (0->0) (1->1) (1->2) (2->0) (2->2): pixel acc 3/5.
  # IoU: class 0: 1 / (1 + 1) ; class 1: 1 / 2 ; class 2: 1 / 3.
  assert r["pix acc"] == pytest.approx(60.0)
  assert r["mIoU"] == pytest.approx(100 * (1 / 2 + 1 / 2 + 1 / 3) / 3)
  # Depth pixels with a target: errors 1, 0, 2, 0, 3; relative 1/2, 0, 1, 0, 1.
  assert r["abs err"] == pytest.approx(6 / 5)
  assert r["rel err"] == pytest.approx(2.5 / 5)
  # Angles 0, 10, 20, 40, 90 degrees.
  assert r["mean angle"] == pytest.approx(32.0, abs=1e-6)
  assert r["median angle"] == pytest.approx(20.0, abs=0.01)
  assert (r["<11.25"], r["<22.5"], r["<30"]) == pytest.approx((40.0, 60.0, 60.0))


def test_histogram_scores_match_the_exact_ones(seed):
  angles = np.random.default_rng(seed).uniform(0, 120, 10_001)
  exact = metrics.surface_normal_scores(angles)
  approx = metrics.surface_normal_scores_from_histogram(
    metrics.angle_histogram(angles), angles.sum()
  )
  np.testing.assert_allclose(approx[0], exact[0], rtol=1e-12)
  assert abs(approx[1] - exact[1]) <= 0.01
  np.testing.assert_allclose(approx[2:], exact[2:], atol=1e-9, err_msg=f"seed={seed}")


def test_delta_m_of_the_paper_rows():
  scoring = nyuv2.SCORING
  assert metrics.delta_m(
    nyuv2.PAPER_ROWS["ntkmtl"], nyuv2.STL, scoring.higher_is_better
  ) == pytest.approx(-6.99, abs=0.005)
  check_published_delta_m(scoring, nyuv2.PAPER_ROWS, nyuv2.PAPER_DELTA_M, 0.015)
