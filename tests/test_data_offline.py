"""The built-in offline benchmarks: shapes, ranges, labels, determinism, the imbalance knob."""

import jax
import numpy as np
import pytest

from ntkmtl_jax import benchmarks, kernel
from ntkmtl_jax.data import Split, endless_batches, epoch_batches, offline

load_digits = pytest.importorskip("sklearn.datasets").load_digits  # MultiDigits is built on it


@pytest.fixture(scope="module")
def digits_lookup():
  d = load_digits()
  return {img.astype(np.float32).tobytes(): int(t) for img, t in zip(d.images / 16.0, d.target)}


def test_multidigits_shapes_ranges_and_labels(digits_lookup, seed):
  data = offline.multidigits(300, 120, data_seed=seed)
  assert data.task_names == ("left", "right", "number")
  for split, n in ((data.train, 300), (data.test, 120)):
    assert split.x.shape == (n, 128) and split.x.dtype == np.float32
    assert split.x.min() >= 0.0 and split.x.max() <= 1.0
    images = split.x.reshape(n, 8, 16)
    for side, name in ((slice(0, 8), "left"), (slice(8, 16), "right")):
      labels = split.targets[name]
      assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() <= 9
      # Each half is a scikit-learn digit, and the label is that digit's own label.
      recovered = [
        digits_lookup[np.ascontiguousarray(img[:, side]).astype(np.float32).tobytes()]
        for img in images
      ]
      np.testing.assert_array_equal(recovered, labels, err_msg=f"seed {seed}")
    np.testing.assert_array_equal(
      split.targets["number"], 10 * split.targets["left"] + split.targets["right"]
    )
  ink = offline.multidigits(50, 20, data_seed=seed, regression="ink")
  assert ink.task_names[2] == "ink"
  np.testing.assert_allclose(ink.train.targets["ink"], 100.0 * ink.train.x.mean(axis=1), rtol=1e-5)


def test_multidigits_test_images_are_disjoint_from_train(seed):
  data = offline.multidigits(2000, 500, data_seed=seed)
  halves = lambda x: {
    h.tobytes()
    for img in x.reshape(-1, 8, 16)
    for h in (np.ascontiguousarray(img[:, :8]), np.ascontiguousarray(img[:, 8:]))
  }
  train, test = halves(data.train.x), halves(data.test.x)
  # sklearn's digits contain a few byte-identical images; allow those, nothing more.
  assert len(train & test) <= 3, f"seed {seed}"


def test_multidigits_deterministic_and_scaled(seed):
  a = offline.multidigits(64, 32, data_seed=seed)
  b = offline.multidigits(64, 32, data_seed=seed)
  c = offline.multidigits(64, 32, data_seed=seed + 1)
  np.testing.assert_array_equal(a.train.x, b.train.x)
  np.testing.assert_array_equal(a.test.targets["left"], b.test.targets["left"])
  assert not np.array_equal(a.train.x, c.train.x)
  half = offline.multidigits(64, 32, data_seed=seed, regression_scale=0.5)
  np.testing.assert_allclose(
    half.train.targets["number"], 0.5 * a.train.targets["number"], rtol=1e-6
  )


def test_sines_amplitudes_frequencies_and_determinism(seed):
  rng = np.random.default_rng(seed)
  k, imbalance = int(rng.integers(2, 5)), float(rng.uniform(2, 50))
  data = offline.sines(k, imbalance=imbalance, num_train=4096, num_test=64, data_seed=seed)
  assert data.train.x.shape == (4096, 2) and np.abs(data.train.x).max() <= 1.0
  peaks = np.array([np.abs(data.train.targets[f"sine{i}"]).max() for i in range(k)])
  amplitudes = imbalance ** np.linspace(0, 1, k)
  # Noiseless targets are bounded by their amplitude and come close to it on 4096 points.
  assert np.all(peaks <= amplitudes * (1 + 1e-5)), f"seed {seed}"
  assert np.all(peaks >= 0.9 * amplitudes), f"seed {seed}"
  again = offline.sines(k, imbalance=imbalance, num_train=4096, num_test=64, data_seed=seed)
  np.testing.assert_array_equal(data.train.targets["sine0"], again.train.targets["sine0"])
  with pytest.raises(ValueError, match="imbalance"):
    offline.sines(3, imbalance=0.5)


def test_batches_cover_each_epoch_once_and_are_seeded(seed):
  split = Split.from_arrays({"x": np.arange(10, dtype=np.float32)[:, None], "y": np.arange(10)})
  it = endless_batches(split, 3, seed)
  epoch = [next(it) for _ in range(3)]  # 9 of 10 rows; the incomplete tail is dropped
  rows = np.concatenate([b["y"] for b in epoch])
  assert len(set(rows.tolist())) == 9 and all(b["x"].shape == (3, 1) for b in epoch)
  np.testing.assert_array_equal(np.concatenate([b["x"][:, 0] for b in epoch]), rows)
  again = endless_batches(split, 3, seed)
  np.testing.assert_array_equal(next(again)["y"], epoch[0]["y"])
  assert sum(len(b["y"]) for b in epoch_batches(split, 4, seed=None)) == 10


def test_resumed_epoch_repeats_the_order_and_the_augmentation(seed):
  draws = lambda batch, rng: dict(batch, noise=rng.random(len(batch["y"])))
  split = Split.from_arrays({"y": np.arange(20)}, draws)
  full = list(epoch_batches(split, 4, seed=seed, epoch=3))
  resumed = list(epoch_batches(split, 4, seed=seed, epoch=3, skip=2))
  assert len(full) == 5 and len(resumed) == 3
  for a, b in zip(full[2:], resumed):
    np.testing.assert_array_equal(a["y"], b["y"])
    np.testing.assert_array_equal(a["noise"], b["noise"])
  other_epoch = next(epoch_batches(split, 4, seed=seed, epoch=4))
  assert not np.array_equal(other_epoch["noise"], full[0]["noise"])


def _eigenvalues(bench, seed):
  batch = next(bench.train_data(seed, 64))
  fns = bench.functions
  params, state = fns.init(jax.random.key(seed), batch)
  losses = lambda p, b: fns.loss_fn(p, state, b)[0]
  eigenvalues = jax.jit(
    lambda p, b: kernel.ntk_weights(losses, p, b, shared=fns.shared).eigenvalues
  )
  return np.asarray(eigenvalues(params, batch))


@pytest.mark.one_seed
def test_multidigits_regression_task_dominates_the_kernel(seed):
  lam = _eigenvalues(
    benchmarks.get_benchmark("multidigits", num_train=256, num_test=64, data_seed=seed), seed
  )
  # The imbalance the demo is about: the number task's lambda dwarfs the digit tasks'.
  assert lam[2] > 1e3 * max(lam[0], lam[1]), f"seed {seed}: {lam}"


def test_sines_imbalance_knob_sets_the_eigenvalue_ratio(seed):
  ratio = {}
  for imbalance in (1.0, 30.0):
    bench = benchmarks.get_benchmark(
      "sines", imbalance=imbalance, min_frequency=1.0, max_frequency=1.0, data_seed=seed
    )
    lam = _eigenvalues(bench, seed)
    ratio[imbalance] = lam[-1] / lam[0]
  # Squared-error gradients scale like the amplitude: the ratio grows by about 30^2.
  growth = ratio[30.0] / ratio[1.0]
  assert 100 < growth < 10_000, f"seed {seed}: {ratio}"
