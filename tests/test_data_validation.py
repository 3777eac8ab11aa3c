"""Bad data files: every MTAN `.npy` file checked where it is read (a `DataFileError` naming
the file, the problem and the fix), `bad_examples="skip"` (replaced, counted, warned about),
non-finite predictions refused by `DenseMetrics`, and QM9's arrays checked before training."""

from __future__ import annotations

import os
import re
import warnings

import numpy as np
import pytest

from ntkmtl_jax import benchmarks, loop
from ntkmtl_jax.benchmarks import qm9
from ntkmtl_jax.benchmarks.mtan import DenseMetrics
from ntkmtl_jax.data import DataFileError
from ntkmtl_jax.data import mtan as layout
from ntkmtl_jax.data.splits import epoch_batches
from ntkmtl_jax.data.validation import BadExampleWarning

H, W = 8, 16
TASKS = ("segmentation", "depth", "normal")
FIX = "Re-export this file"


def write_nyuv2(root, train=8, val=4):
  for split, num in (("train", train), ("val", val)):
    layout.write_example_files(root, split, num, H, W, 13, "label", normals=True, seed=len(split))
  return root


@pytest.fixture
def root(tmp_path):
  return write_nyuv2(str(tmp_path))


def path(root, key, index, split="train"):
  return os.path.join(root, split, key, f"{index}.npy")


def edit(file, change):
  """Loads `file`, applies `change` to the array in place, saves it back."""
  array = np.load(file)
  change(array)
  np.save(file, array)


def split_of(root, split="train", augmented=False, **options):
  options.setdefault("num_classes", 13)
  return layout.make_split(root, split, "label", TASKS, augmented, "", **options)


def error_text(error) -> str:
  text = str(error.value)
  assert "\n" not in text and FIX in text and "bad_examples='skip'" in text, text
  return text


def tiny_nyuv2(root, **options):
  config = benchmarks.get_config("nyuv2", "tiny", data_dir=root, **options)
  return config, benchmarks.from_config(config)


# What used to go through silently or as a traceback naming no file.


def test_a_nan_pixel_in_a_test_image_stops_the_run_naming_the_file(root):
  bad = path(root, "image", 2, "val")
  edit(bad, lambda a: a.__setitem__((3, 5, 1), np.nan))
  config, bench = tiny_nyuv2(root)
  with pytest.raises(DataFileError) as error:
    loop.fit(bench, config.replace(method="ls", max_steps=1), progress=False)
  text = error_text(error)
  assert text.startswith(
    f"{bad}: NaN or infinite values: 1 of 384 values (the first, nan, at (3, 5, 1))"
  )


def test_inf_in_one_train_depth_fails_at_the_batch_that_reads_it(root):
  bad = path(root, "depth", 5)
  edit(bad, lambda a: a.__setitem__((0, 0, 0), np.inf))
  split = split_of(root, augmented=True)
  rng = np.random.default_rng(0)
  batch = split.take([0, 1, 2, 3], rng)  # the other examples read as before
  assert np.isfinite(batch["depth"]).all()
  with pytest.raises(DataFileError, match=re.escape(f"{bad}: NaN or infinite values")) as error:
    split.take([4, 5], rng)
  assert "example 5" in error_text(error)


def test_nan_in_every_train_image_names_the_first_file_read(root):
  for i in range(8):
    edit(path(root, "image", i), lambda a: a.fill(np.nan))
  _, bench = tiny_nyuv2(root)
  with pytest.raises(DataFileError, match=r"/train/image/\d\.npy: NaN or infinite values: 384 of"):
    next(epoch_batches(bench.train, 4, seed=0))
  skipping = tiny_nyuv2(root, bad_examples="skip")[1].train
  with (
    pytest.warns(BadExampleWarning),
    pytest.raises(DataFileError, match="every example of the split is bad"),
  ):
    next(epoch_batches(skipping, 4, seed=0))


def _truncate(file):
  data = open(file, "rb").read()
  open(file, "wb").write(data[:-100])


def _truncate_header(file):
  data = open(file, "rb").read()
  open(file, "wb").write(data[:20])


CORRUPTIONS = {
  "truncated": (_truncate, r"truncated: its header announces a \(8, 16, 3\) float32 array "
                r"\(1,536 bytes of data\), the file holds 1,436"),
  "truncated header": (_truncate_header, r"unreadable \.npy header"),
  "empty": (lambda f: open(f, "wb").close(), r"the file is empty \(0 bytes\)"),
  "text": (lambda f: open(f, "w").write("0.5 0.5 0.5\n"),
           r"not a \.npy file \(it starts with b'0\.5 0\.', not the \.npy signature"),
  "half size": (lambda f: np.save(f, np.zeros((H // 2, W // 2, 3), np.float32)),
                r"shape \(4, 8, 3\); it must be \(8, 16, 3\) \(every image of a split has the "
                r"size of its first, .*/train/image/0\.npy\)"),
  "strings": (lambda f: np.save(f, np.full((H, W, 3), "0.5")),
              r"it holds <U3 values \(strings\), not real numbers"),
  "objects": (lambda f: np.save(f, np.full((H, W, 3), None, object), allow_pickle=True),
              r"it holds Python objects \(a pickled object array\), not numbers"),
  "missing": (os.remove, r"the file is missing"),
}  # fmt: skip


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_bad_image_file_is_one_error_naming_it(root, corruption):
  damage, message = CORRUPTIONS[corruption]
  bad = path(root, "image", 3)
  damage(bad)
  split = split_of(root)
  split.take([0, 1, 2])
  with pytest.raises(DataFileError, match=re.escape(bad) + ": " + message) as error:
    split.take([2, 3])
  assert error.value.path == bad
  error_text(error)


def test_a_bad_first_image_is_refused_when_the_split_is_made(root):
  _truncate_header(path(root, "image", 0))
  with pytest.raises(DataFileError, match=r"/train/image/0\.npy: unreadable \.npy header"):
    tiny_nyuv2(root)


def test_a_half_size_train_label_is_refused_before_augmentation(root):
  bad = path(root, "label", 1)
  np.save(bad, np.zeros((H // 2, W // 2), np.float32))
  split = split_of(root, augmented=True)
  with pytest.raises(DataFileError) as error:
    split.take([1], np.random.default_rng(0))
  assert error_text(error).startswith(
    f"{bad}: shape (4, 8); it must be (8, 16) (the size of its image {path(root, 'image', 1)})"
  )


@pytest.mark.parametrize(
  "value, message",
  [
    (13, r"labels outside -1 \(unlabelled\) \.\. 12 \(13 classes\): 1 of 128 values \(the "
     r"first, 13, at \(2, 7\)\)"),
    (200, r"labels outside -1 \(unlabelled\) \.\. 12 \(13 classes\): 1 of 128 values \(the "
     r"first, 200, at \(2, 7\)\)"),
    (-2, r"labels outside -1 \(unlabelled\)"),
    (np.nan, r"NaN or infinite values: 1 of 128 values \(the first, nan, at \(2, 7\)\)"),
    (2.6, r"labels that are not whole class numbers: 1 of 128 values \(the first, 2\.6, at "
     r"\(2, 7\)\)"),
  ],
  ids=["13", "200", "-2", "nan", "2.6"],
)  # fmt: skip
@pytest.mark.parametrize("split", ["train", "val"])
def test_a_bad_label_is_refused_naming_its_file(root, value, message, split):
  bad = path(root, "label", 2, split)
  edit(bad, lambda a: a.__setitem__((2, 7), value))
  _, bench = tiny_nyuv2(root, val_size=0)
  data = bench.train if split == "train" else bench.test
  with pytest.raises(DataFileError, match=re.escape(bad) + ": " + message):
    data.take([2], np.random.default_rng(0))


def test_labels_within_1e_6_of_a_class_are_rounded_and_minus_one_is_kept(root):
  edit(path(root, "label", 0), lambda a: a.__setitem__((0, slice(0, 3)), [3 + 5e-7, -1, 12]))
  batch = split_of(root).take([0])
  np.testing.assert_array_equal(batch["label"][0, 0, :3], [3, -1, 12])


def test_without_num_classes_any_whole_label_is_kept(root):
  edit(path(root, "label", 0), lambda a: a.__setitem__((0, 0), 200))
  split = layout.make_split(root, "train", "label", TASKS, False, "")  # the old call
  assert split.take([0])["label"][0, 0, 0] == 200
  edit(path(root, "label", 0), lambda a: a.__setitem__((0, 0), 2.5))
  with pytest.raises(DataFileError, match="not whole class numbers"):
    split.take([0])


def test_a_depth_without_its_channel_axis_is_read(root):
  np.save(path(root, "depth", 0), np.ones((H, W), np.float32))
  assert split_of(root).take([0])["depth"].shape == (1, H, W, 1)


# bad_examples="skip"


def test_skip_replaces_a_bad_example_by_the_next_good_one_and_counts_it(root):
  np.save(path(root, "depth", 3), np.zeros((H, W // 2, 1), np.float32))
  edit(path(root, "image", 4), lambda a: a.fill(np.inf))
  clean = split_of(root)
  split = split_of(root, bad_examples="skip")
  assert split.bad_examples_skipped == 0  # found as they are read
  with pytest.warns(BadExampleWarning) as warned:
    batch = split.take([2, 3, 4, 7])
  assert [str(w.message) for w in warned] == [
    f"bad_examples='skip': example {i} of {os.path.join(root, 'train')} is replaced by the "
    f"next good example in its batches ({path(root, key, i)}: {problem})."
    for i, key, problem in (
      (3, "depth", "shape (8, 8, 1); it must be (8, 16) or (8, 16, 1) (the size of its image "
       f"{path(root, 'image', 3)})"),
      (4, "image", "NaN or infinite values: 384 of 384 values (the first, inf, at (0, 0, 0))"),
    )
  ]  # fmt: skip
  want = clean.take([2, 5, 5, 7])  # 3 and 4 are both replaced by 5: the batch keeps its shape
  for key in want:
    np.testing.assert_array_equal(batch[key], want[key], err_msg=key)
  assert split.bad_examples_skipped == 2 and sorted(split.skipped_examples) == [3, 4]
  with warnings.catch_warnings():
    warnings.simplefilter("error", BadExampleWarning)  # warned about once per example
    again = split.take([2, 3, 4, 7])
  for key in want:
    np.testing.assert_array_equal(again[key], want[key], err_msg=key)


def test_skip_wraps_around_and_keeps_augmented_batches_deterministic(root):
  edit(path(root, "normal", 7), lambda a: a.__setitem__((0, 0, 0), np.nan))
  split = split_of(root, augmented=True, bad_examples="skip")
  with pytest.warns(BadExampleWarning, match="example 7 of"):
    batch = split.take([7, 1], np.random.default_rng(3))
  want = split_of(root, augmented=True).take([0, 1], np.random.default_rng(3))
  for key in want:
    np.testing.assert_array_equal(batch[key], want[key], err_msg=key)


def test_skip_replaces_from_the_same_subset_so_no_held_out_image_is_trained_on(root):
  config, bench = tiny_nyuv2(root, val_size=3, augment=False, bad_examples="skip")
  assert config.data["bad_examples"] == "skip"
  train_files = bench.train.indices.tolist()
  bad = train_files[-1]  # the last training example: the next in the whole folder is held out
  edit(path(root, "image", bad), lambda a: a.fill(np.nan))
  with pytest.warns(BadExampleWarning):
    batch = bench.train.take(np.arange(len(bench.train)))
  want = split_of(root).take([train_files[0]])  # wrapped round to the subset's first
  np.testing.assert_array_equal(batch["image"][-1], want["image"][0])
  assert (bench.train.bad_examples_skipped, bench.val.bad_examples_skipped) == (1, 0)
  assert not set(bench.val.indices.tolist()) & set(train_files)


def test_the_option_is_in_the_config_only_when_it_changes_something():
  for name in ("nyuv2", "cityscapes"):
    config = benchmarks.get_config(name)
    assert "bad_examples" not in config.data  # earlier runs' configs and resumes unchanged
    skip = benchmarks.get_config(name, bad_examples="skip")
    assert skip.data == {**config.data, "bad_examples": "skip"}
    assert skip.replace(data=config.data) == config  # nothing else changes
  with pytest.raises(ValueError, match="bad_examples='drop'; choose one of error, skip"):
    benchmarks.from_config(benchmarks.get_config("nyuv2", bad_examples="drop"))


# DenseMetrics


@pytest.mark.parametrize("pooling", ["pixels", "batches"])
@pytest.mark.parametrize(
  "task, what",
  [
    (0, "segmentation logits are not finite .* so its mIoU and pix acc cannot be scored"),
    (1, "depth predictions are not finite .* so its abs err and rel err cannot be scored"),
    (2, "surface normal predictions are not finite .* so its angle errors cannot be scored"),
  ],
)
def test_dense_metrics_refuse_non_finite_predictions(task, what, pooling):
  rng = np.random.default_rng(0)
  outputs = [rng.normal(size=(2, 4, 4, c)) for c in (3, 1, 3)]
  batch = {
    "label": rng.integers(0, 3, (2, 4, 4)),
    "depth": rng.uniform(1, 2, (2, 4, 4, 1)),
    "normal": np.tile([1.0, 0.0, 0.0], (2, 4, 4, 1)),
  }
  metrics = DenseMetrics(TASKS, 3, pooling)
  metrics.update(outputs, batch)
  outputs[task][1, 2, 3, 0] = np.nan
  with pytest.raises(ValueError, match=f"The model's {what}") as error:
    metrics.update(outputs, batch)
  assert "(1 of " in str(error.value) and "evaluation batch 2" in str(error.value)


# QM9


def qm9_arrays(num=6):
  rng = np.random.default_rng(0)
  charges = np.zeros((num, qm9.MAX_ATOMS), np.int64)
  charges[:, :5] = rng.choice(qm9.ELEMENTS, (num, 5))
  return {
    "charges": charges,
    "positions": rng.normal(size=(num, qm9.MAX_ATOMS, 3)).astype(np.float32),
    "targets": rng.normal(size=(num, len(qm9.TARGETS))),
  }


@pytest.mark.parametrize(
  "field, change, message",
  [
    ("targets", lambda a: a["targets"].__setitem__((4, 6), np.nan),
     "field 'U0_atomization' of molecule 4 (tfds order; 1 of 6 molecules) has NaN or infinite"),
    ("positions", lambda a: a["positions"].__setitem__((2, 20, 1), np.inf),
     "field 'positions' of molecule 2 (tfds order; 1 of 6 molecules) has NaN or infinite"),
    ("charges", lambda a: a["charges"].__setitem__((3, 7), 5),
     "field 'charges' of molecule 3 (tfds order; 1 of 6 molecules) has atomic numbers [5] (QM9 "
     "has only 0 = padding and 1, 6, 7, 8, 9)"),
  ],
  ids=["target", "position", "charge"],
)  # fmt: skip
def test_qm9_arrays_are_checked_before_training(field, change, message):
  arrays = qm9_arrays()
  qm9.check_arrays(arrays, "DIR")  # good arrays pass
  change(arrays)
  with pytest.raises(DataFileError) as error:
    qm9.check_arrays(arrays, "DIR")
  text = str(error.value)
  assert text.startswith("The tfds dataset 'qm9' (split 'train' in DIR): " + message), text
  assert "tfds build qm9" in text and "\n" not in text
  if field == "charges":
    qm9.check_arrays(arrays, "DIR", charges=False)
