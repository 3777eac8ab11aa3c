"""The MTAN layout's resizing and augmentation against float64 references and the formula
they replaced (the same numbers, the same random draws), and `splits.prefetch`: the plain
iterator's items in order, its exceptions, and its thread stopped when the consumer stops."""

from __future__ import annotations

import contextlib
import os
import threading
import traceback

import numpy as np
import pytest

from ntkmtl_jax.data import mtan as layout
from ntkmtl_jax.data.splits import Split, epoch_batches, prefetch

# The implementation the MTAN augmentation had before the separable resize: a dense
# three-operand einsum (here in float64), two-step nearest indexing, the same draws.


def old_align_corners_matrix(size_in, size_out):
  if size_in == 1:
    return np.ones((size_out, 1), np.float32)
  pos = np.arange(size_out) * (size_in - 1) / max(size_out - 1, 1)
  lo = np.clip(np.floor(pos).astype(int), 0, size_in - 2)
  frac = (pos - lo).astype(np.float32)
  m = np.zeros((size_out, size_in), np.float32)
  m[np.arange(size_out), lo] = 1.0 - frac
  m[np.arange(size_out), lo + 1] += frac
  return m


def old_resize_bilinear(x, height, width):
  rows = old_align_corners_matrix(x.shape[0], height).astype(np.float64)
  cols = old_align_corners_matrix(x.shape[1], width).astype(np.float64)
  return np.einsum("Hh,hwc,Ww->HWc", rows, np.asarray(x, np.float64), cols)


def old_resize_nearest(x, height, width):
  rows = np.minimum((np.arange(height) * x.shape[0] / height).astype(int), x.shape[0] - 1)
  cols = np.minimum((np.arange(width) * x.shape[1] / width).astype(int), x.shape[1] - 1)
  return x[rows][:, cols]


def old_augment(example, rng):
  height, width = example["image"].shape[:2]
  scale = layout.SCALES[rng.integers(len(layout.SCALES))]
  h, w = int(height / scale), int(width / scale)
  i, j = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
  crop = {k: v[i : i + h, j : j + w] for k, v in example.items()}
  out = {
    "image": old_resize_bilinear(crop["image"], height, width),
    "label": old_resize_nearest(crop["label"], height, width),
    "depth": old_resize_nearest(crop["depth"], height, width) / scale,
  }
  if "normal" in crop:
    out["normal"] = old_resize_bilinear(crop["normal"], height, width)
  flipped = rng.random() < 0.5
  if flipped:
    out = {k: v[:, ::-1] for k, v in out.items()}
    if "normal" in out:
      out["normal"] = out["normal"] * np.asarray([-1.0, 1.0, 1.0])
  return out, (scale, flipped)


def loop_resize_bilinear(x, height, width):
  """Bilinear resize with align_corners=True written out pixel by pixel, in float64."""
  x = np.asarray(x, np.float64)
  h, w = x.shape[:2]

  def source(i, size_in, size_out):  # (lower index, upper index, weight of the upper)
    pos = i * (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
    lower = int(np.floor(pos))
    return lower, min(lower + 1, size_in - 1), pos - lower

  out = np.zeros((height, width) + x.shape[2:])
  for r in range(height):
    r0, r1, dr = source(r, h, height)
    for c in range(width):
      c0, c1, dc = source(c, w, width)
      top = (1 - dc) * x[r0, c0] + dc * x[r0, c1]
      bottom = (1 - dc) * x[r1, c0] + dc * x[r1, c1]
      out[r, c] = (1 - dr) * top + dr * bottom
  return out


SIZES = [(1, 1, 1, 1), (1, 5, 4, 3), (5, 1, 3, 7), (4, 6, 1, 1), (3, 3, 3, 3), (7, 9, 11, 13)]


@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_resize_bilinear_matches_the_pixel_formula_and_the_old_einsum(sizes, seed):
  rng = np.random.default_rng(seed)
  h, w, height, width = sizes
  for channels in (1, 3):
    x = rng.random((h, w, channels)).astype(np.float32)
    got = layout.resize_bilinear(x, height, width)
    assert got.shape == (height, width, channels) and got.dtype == np.float32
    np.testing.assert_allclose(got, loop_resize_bilinear(x, height, width), atol=1e-6)
    np.testing.assert_allclose(got, old_resize_bilinear(x, height, width), atol=1e-6)


def test_resize_bilinear_on_random_odd_sizes_up_and_down(seed):
  rng = np.random.default_rng(seed)
  for _ in range(4):
    h, w, height, width = (int(s) for s in rng.integers(1, 14, 4))
    x = rng.normal(size=(h, w, 2)).astype(np.float32)
    want = loop_resize_bilinear(x, height, width)
    np.testing.assert_allclose(
      layout.resize_bilinear(x, height, width), want, atol=2e-6, err_msg=f"{h, w, height, width}"
    )


def test_resize_bilinear_to_the_same_size_is_an_exact_copy(seed):
  x = np.random.default_rng(seed).random((6, 5, 3)).astype(np.float32)
  out = layout.resize_bilinear(x, 6, 5)
  np.testing.assert_array_equal(out, x)
  np.testing.assert_array_equal(out, old_resize_bilinear(x, 6, 5))  # exact there too
  assert not np.shares_memory(out, x)


def test_resize_nearest_equals_the_old_indexing(seed):
  rng = np.random.default_rng(seed)
  for shape, size in [((5, 7), (9, 4)), ((6, 6, 1), (6, 6)), ((1, 3, 1), (4, 5))]:
    x = rng.integers(-1, 13, shape).astype(np.float32)
    np.testing.assert_array_equal(layout.resize_nearest(x, *size), old_resize_nearest(x, *size))


def random_example(rng, height, width, normals):
  example = {
    "image": rng.random((height, width, 3)).astype(np.float32),
    "label": rng.integers(-1, 13, (height, width)).astype(np.float32),
    "depth": rng.uniform(0.5, 10.0, (height, width, 1)).astype(np.float32),
  }
  if normals:
    n = rng.normal(size=(height, width, 3)).astype(np.float32)
    example["normal"] = n / np.linalg.norm(n, axis=-1, keepdims=True)
  return example


@pytest.mark.parametrize("normals", [True, False], ids=["nyuv2", "cityscapes"])
def test_augment_equals_the_old_implementation_with_the_same_draws(normals, seed):
  data_rng = np.random.default_rng(seed)
  seen = set()
  for draw in range(12):
    height, width = [(12, 16), (9, 13), (10, 10)][draw % 3]
    example = random_example(data_rng, height, width, normals)
    new_rng, old_rng = np.random.default_rng([seed, draw]), np.random.default_rng([seed, draw])
    got = layout.augment(example, new_rng)
    want, drawn = old_augment(example, old_rng)
    seen.add(drawn)
    # The same draws: both generators are left in the same state.
    assert new_rng.bit_generator.state == old_rng.bit_generator.state
    assert set(got) == set(want)
    for key in got:
      assert got[key].dtype == np.float32 and got[key].flags.c_contiguous
      if key in ("label", "depth"):
        np.testing.assert_array_equal(got[key], want[key].astype(np.float32), err_msg=key)
      else:
        np.testing.assert_allclose(got[key], want[key], atol=1e-6, err_msg=f"{key} {drawn}")
  assert {scale for scale, _ in seen} == set(layout.SCALES) and len(seen) >= 4, seen


def test_mtan_training_batches_equal_the_old_pipeline(tmp_path, seed):
  root = str(tmp_path)
  layout.write_example_files(root, "train", 4, 12, 16, 13, "label", normals=True, seed=seed)
  tasks = ("segmentation", "depth", "normal")
  split = layout.make_split(root, "train", "label", tasks, augmented=True, how="")
  indices = np.asarray([2, 0, 3])
  batch = split.take(indices, np.random.default_rng(seed))
  rng = np.random.default_rng(seed)
  for b, index in enumerate(indices):
    example = {
      k: np.load(os.path.join(root, "train", k, f"{index}.npy")).astype(np.float32)
      for k in ("image", "label", "depth", "normal")
    }
    want, _ = old_augment(example, rng)
    np.testing.assert_array_equal(batch["label"][b], np.rint(want["label"]).astype(np.int32))
    np.testing.assert_array_equal(batch["depth"][b], want["depth"].astype(np.float32))
    np.testing.assert_allclose(batch["image"][b], want["image"], atol=1e-6)
    np.testing.assert_allclose(batch["normal"][b], want["normal"], atol=1e-6)
  assert batch["label"].dtype == np.int32 and batch["image"].dtype == np.float32


# prefetch


def noisy_split(seed, size=23):
  rng = np.random.default_rng(seed)
  arrays = {"x": rng.normal(size=(size, 3)).astype(np.float32), "i": np.arange(size)}
  return Split.from_arrays(
    arrays, lambda batch, r: {**batch, "noise": r.normal(size=len(batch["i"]))}
  )


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_prefetch_yields_the_plain_iterators_batches_in_order(depth, seed):
  split = noisy_split(seed)
  want = list(epoch_batches(split, 4, seed=seed, epoch=1))
  got = list(prefetch(epoch_batches(split, 4, seed=seed, epoch=1), depth=depth))
  assert len(got) == len(want) == 5
  for g, w in zip(got, want):
    assert set(g) == set(w)
    for key in w:
      np.testing.assert_array_equal(g[key], w[key])
  assert list(prefetch(iter([]), depth)) == []
  assert list(prefetch(range(7), depth)) == list(range(7))


@pytest.mark.parametrize("depth", [1, 3])
def test_prefetch_loads_at_most_depth_items_ahead(depth):
  taken, ahead = [0], []

  def source():
    for i in range(12):
      ahead.append(i - taken[0])  # items started beyond the ones the consumer has counted
      yield i

  for item in prefetch(source(), depth):
    assert item == taken[0]
    taken[0] += 1
  assert taken[0] == 12 and len(ahead) == 12 and max(ahead) <= depth, ahead


def test_prefetch_runs_the_iterator_on_a_thread_that_ends_with_it():
  threads = []

  def source():
    threads.append(threading.current_thread())
    yield from range(3)

  assert list(prefetch(source())) == [0, 1, 2]
  assert threads[0] is not threading.current_thread()
  assert not threads[0].is_alive()


def broken_source(fail_at, error):
  for i in range(10):
    if i == fail_at:
      raise error
    yield i


def test_prefetch_reraises_the_producers_exception_with_its_traceback():
  got = []
  with pytest.raises(ValueError, match="batch 3 is broken") as info:
    for item in prefetch(broken_source(3, ValueError("batch 3 is broken")), depth=2):
      got.append(item)
  assert got == [0, 1, 2]  # the items before it, then the error where item 3 would come
  frames = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
  assert "broken_source" in frames, frames
  # A KeyboardInterrupt in the producer reaches the consumer too.
  with pytest.raises(KeyboardInterrupt):
    list(prefetch(broken_source(0, KeyboardInterrupt()), depth=1))


def endless(record):
  record["thread"] = threading.current_thread()
  try:
    i = 0
    while True:
      yield i
      i += 1
  finally:
    record["closed"] = True


@pytest.mark.parametrize("depth", [1, 2])
def test_prefetch_stops_its_thread_when_the_consumer_closes_early(depth):
  record = {}
  batches = prefetch(endless(record), depth)
  assert [next(batches) for _ in range(3)] == [0, 1, 2]
  batches.close()
  assert not record["thread"].is_alive()
  assert record["closed"]  # the source iterator was closed on its thread
  with pytest.raises(StopIteration):
    next(batches)


def test_prefetch_stops_its_thread_on_break_and_on_keyboard_interrupt():
  record = {}
  with contextlib.closing(prefetch(endless(record))) as batches:
    for item in batches:
      if item == 4:
        break
  assert not record["thread"].is_alive() and record["closed"]
  record = {}
  with pytest.raises(KeyboardInterrupt):
    with contextlib.closing(prefetch(endless(record), depth=1)) as batches:
      for item in batches:
        if item == 2:
          raise KeyboardInterrupt  # as Ctrl-C in the consumer's step
  assert not record["thread"].is_alive() and record["closed"]
  # Dropping the last reference closes it too (CPython closes an unreferenced generator).
  record = {}
  batches = prefetch(endless(record))
  next(batches)
  del batches
  assert not record["thread"].is_alive() and record["closed"]


def test_prefetch_starts_nothing_before_the_first_item_and_refuses_depth_0():
  record = {}
  batches = prefetch(endless(record))
  assert record == {}
  batches.close()
  assert record == {}
  with pytest.raises(ValueError, match="depth"):
    prefetch(range(3), depth=0)
