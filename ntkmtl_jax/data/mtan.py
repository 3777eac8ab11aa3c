"""The MTAN preprocessed layout of NYUv2 and Cityscapes: one `.npy` file per image and task.

Layout (as distributed with the MTAN code, and read by the CAGrad/Nash-MTL/FAMO/NTKMTL
trainers):

    ROOT/train/image/0.npy ... (H, W, 3) float, RGB in [0, 1]
    ROOT/train/<label>/0.npy   (H, W) float class index, -1 = unlabelled pixel
                               (<label> is `label` for NYUv2's 13 classes, `label_7` for
                               Cityscapes' 7 classes)
    ROOT/train/depth/0.npy     (H, W, 1) float, 0 = no depth
    ROOT/train/normal/0.npy    (H, W, 3) float unit normals, (0, 0, 0) = none (NYUv2 only)
    ROOT/val/...               the same for the evaluation set (the papers' "test")

Files are numbered 0..N-1. NYUv2: 795 train / 654 val images of 288 x 384; Cityscapes:
2,975 train / 500 val images of 128 x 256. Get them from the links in the README of the
MTAN repository (github.com/lorenmt/mtan: "NYUv2 (3 tasks)" and "CityScapes" preprocessed
downloads), unpack, and pass the folder that holds `train/` and `val/` as `--data-dir`.

Training augmentation (the trainers' default): a random scale in {1.0, 1.2, 1.5} (crop of
1/scale of the image, resized back: bilinear for image and normals, nearest for labels and
depth, depth divided by the scale) and a horizontal flip with probability 1/2 (the normals'
x component negated).

Checks: every file is checked where it is read, at the batch that reads it (a readable `.npy`
of real numbers, the shapes above with one image size per split, finite values, labels whole
numbers in [-1, classes)); a bad one is a `DataFileError` naming the file, the problem and the
fix. With `bad_examples="skip"` its example is replaced by the next good one of the split
instead, which keeps every batch's shape (`LayoutSplit`).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Sequence

import numpy as np

from ntkmtl_jax.data.splits import Split, missing_dataset
from ntkmtl_jax.data.validation import (
  BadExampleWarning,
  DataFileError,
  check_bad_examples,
  check_finite,
  check_labels,
  file_error,
  read_npy,
  read_npy_header,
)

SCALES = (1.0, 1.2, 1.5)


def _align_corners_taps(size_in: int, size_out: int):
  """The two source indices and float32 weights of each output index (align_corners=True)."""
  if size_in == 1:
    zero = np.zeros(size_out, np.intp)
    return zero, zero, np.ones(size_out, np.float32), np.zeros(size_out, np.float32)
  pos = np.arange(size_out) * (size_in - 1) / max(size_out - 1, 1)
  lo = np.clip(np.floor(pos).astype(np.intp), 0, size_in - 2)
  frac = (pos - lo).astype(np.float32)
  return lo, lo + 1, 1.0 - frac, frac


def _interpolate(x: np.ndarray, size: int, axis: int, flip: bool = False) -> np.ndarray:
  """Linear interpolation of float32 `x` along `axis` (0 or 1) to `size`, align_corners=True;
  `flip` reverses the output along that axis (by reversing the taps: the same numbers)."""
  lo, hi, w_lo, w_hi = _align_corners_taps(x.shape[axis], size)
  if flip:
    lo, hi, w_lo, w_hi = lo[::-1], hi[::-1], w_lo[::-1], w_hi[::-1]
  shape = (-1,) + (1,) * (x.ndim - 1) if axis == 0 else (1, -1) + (1,) * (x.ndim - 2)
  out = np.take(x, lo, axis=axis)
  out *= w_lo.reshape(shape)
  upper = np.take(x, hi, axis=axis)
  upper *= w_hi.reshape(shape)
  out += upper
  return out


def resize_bilinear(x: np.ndarray, height: int, width: int, *, flip: bool = False) -> np.ndarray:
  """(h, w, c) -> (height, width, c) float32, bilinear with align_corners=True.

  Separable: each output pixel is the weighted sum of its two neighbours along the width,
  then of two such rows along the height (a few milliseconds for a 288 x 384 image; the
  dense (height, h) x (h, w, c) x (w, width) contraction this replaces, a three-operand
  `np.einsum` that NumPy runs as a naive loop, took seconds for a 128 x 256 image and over a
  minute for a 288 x 384 one). A same-size resize is the identity (its weights are exactly 0
  and 1): a copy. `flip` mirrors the result left-right, as `out[:, ::-1]` of the unflipped
  one, without the extra copy.
  """
  x = np.asarray(x, np.float32)
  if x.shape[:2] == (height, width):
    return np.array(x[:, ::-1] if flip else x, order="C")
  return _interpolate(_interpolate(x, width, axis=1, flip=flip), height, axis=0)


def resize_nearest(x: np.ndarray, height: int, width: int, *, flip: bool = False) -> np.ndarray:
  """(h, w, ...) -> (height, width, ...), nearest as PyTorch's mode="nearest"; `flip` mirrors
  the result left-right."""
  rows = np.minimum((np.arange(height) * x.shape[0] / height).astype(int), x.shape[0] - 1)
  cols = np.minimum((np.arange(width) * x.shape[1] / width).astype(int), x.shape[1] - 1)
  return x[rows[:, None], cols[::-1] if flip else cols]


def augment(example: dict, rng: np.random.Generator) -> dict:
  """Random scale-crop and horizontal flip of one example (see the module docstring).

  Draws, in this order: the scale, the crop's row and column, the flip (what resumed runs
  rely on: batch b's generator gives the same augmentation every time). The flip is done by
  the resizes (reversed column indices), which gives the numbers of flipping their output.
  """
  height, width = example["image"].shape[:2]
  scale = SCALES[rng.integers(len(SCALES))]
  h, w = int(height / scale), int(width / scale)
  i, j = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
  flip = bool(rng.random() < 0.5)
  crop = {k: v[i : i + h, j : j + w] for k, v in example.items()}
  out = {
    "image": resize_bilinear(crop["image"], height, width, flip=flip),
    "label": resize_nearest(crop["label"], height, width, flip=flip),
    "depth": resize_nearest(crop["depth"], height, width, flip=flip) / scale,
  }
  if "normal" in crop:
    out["normal"] = resize_bilinear(crop["normal"], height, width, flip=flip)
    if flip:
      out["normal"][..., 0] *= -1.0  # the x component of a mirrored normal
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def count_files(folder: str) -> int:
  return len([f for f in os.listdir(folder) if f.endswith(".npy")])


REMOVE = (
  "Re-export this file from the original data, or remove example {index} (its file in every "
  "task folder, renumbering the later ones so that each folder holds 0.npy .. N-1.npy)"
)
FIX = REMOVE + (
  ", or pass the data option bad_examples='skip' (--option bad_examples=skip) to replace it by "
  "the next good example."
)


class _Files:
  """The files of one folder of the layout (`ROOT/train` or `ROOT/val`), read and checked
  example by example; under `bad_examples="skip"`, which examples were found bad.

  Checks of each file as it is read (`DataFileError` naming the file, in `load`): a readable
  `.npy` of real numbers, of the expected shape (image (H, W, 3) with the H x W of the
  folder's first image, label (H, W), depth (H, W) or (H, W, 1), normal (H, W, 3)), finite
  values, and labels that are whole numbers in [-1, num_classes) (-1 = unlabelled; no range
  check without `num_classes`).
  """

  def __init__(self, folder, subdirs, size, num_classes, bad_examples):
    self.folder, self.subdirs, self.size = folder, dict(subdirs), int(size)
    self.num_classes = None if num_classes is None else int(num_classes)
    self.skip = check_bad_examples(bad_examples) == "skip"
    self.bad: dict[int, str] = {}  # example -> "PATH: PROBLEM" (skip mode)
    self.lock = threading.Lock()
    self.reference = None  # (index, (H, W)) of the first image that can set the size
    for index in range(self.size):
      try:
        shape = self._image_header(index)
      except DataFileError as error:
        if not self.skip:
          raise
        self._mark_bad(index, error)
        continue
      self.reference = index, shape[:2]
      break
    if self.reference is None:
      raise self.none_good()

  def path(self, key: str, index: int) -> str:
    return os.path.join(self.folder, self.subdirs[key], f"{index}.npy")

  def _image_header(self, index: int) -> tuple[int, ...]:
    path = self.path("image", index)
    shape = read_npy_header(path, FIX.format(index=index))[0]
    if len(shape) != 3 or shape[2] != 3:
      raise file_error(path, f"an image of shape {shape}, not (H, W, 3)", FIX.format(index=index))
    return shape

  def load(self, index: int) -> dict:
    """Example `index`, every file checked (float32 arrays; depth (H, W, 1))."""
    fix = FIX.format(index=index)
    ref_index, (height, width) = self.reference
    shapes = {
      "image": ((height, width, 3),),
      "label": ((height, width),),
      "depth": ((height, width), (height, width, 1)),
      "normal": ((height, width, 3),),
    }
    example = {}
    for key in self.subdirs:
      path = self.path(key, index)
      array = read_npy(path, fix)
      want = shapes[key]
      if array.shape not in want:
        shapes = " or ".join(str(s) for s in want)
        whose = (
          f"every image of a split has the size of its first, {self.path('image', ref_index)}"
          if key == "image"
          else f"the size of its image {self.path('image', index)}"
        )
        raise file_error(path, f"shape {array.shape}; it must be {shapes} ({whose})", fix)
      array = array.astype(np.float32, copy=False)
      check_finite(array, path, fix)
      if key == "label":
        array = check_labels(array, path, fix, self.num_classes)
      example[key] = array
    if example["depth"].ndim == 2:
      example["depth"] = example["depth"][..., None]
    return example

  def example(self, index: int) -> dict | None:
    """`load(index)`; under skip mode None for a bad example (warned about the first time)."""
    if index in self.bad:
      return None
    try:
      return self.load(index)
    except DataFileError as error:
      if not self.skip:
        raise
      self._mark_bad(index, error)
      return None

  def _mark_bad(self, index: int, error: DataFileError):
    with self.lock:
      if index in self.bad:
        return
      self.bad[index] = f"{error.path}: {error.problem}"
    warnings.warn(
      f"bad_examples='skip': example {index} of {self.folder} is replaced by the next good "
      f"example in its batches ({error.path}: {error.problem}).",
      BadExampleWarning,
      stacklevel=2,
    )

  def none_good(self) -> DataFileError:
    first = min(self.bad)
    return DataFileError(
      f"{self.folder}: every example of the split is bad (bad_examples='skip' has none to "
      f"replace them with); the first: {self.bad[first]}. {REMOVE.format(index=first)}."
    )


class LayoutSplit(Split):
  """A split of the MTAN layout: the examples `indices` (file numbers) of one folder.

  Under `bad_examples="skip"` an example whose files fail a check is replaced by the next
  good example of this split (cyclically, in the split's order): every batch keeps its
  shape, and the replacement depends only on the files, so a resumed run reads the same
  batches. In an evaluation split the replacement is scored in its place (twice). Each bad
  example is warned about once (`BadExampleWarning`); `bad_examples_skipped` counts those
  of this split found so far (in the batches read up to now) and `skipped_examples` says
  which and why.
  """

  def __init__(self, files: _Files, indices, augmented: bool):
    self.files = files
    self.indices = np.asarray(indices, np.int64)
    self.augmented = bool(augmented)
    super().__init__(len(self.indices), self._take)

  def subset(self, positions, *, augmented: bool | None = None) -> LayoutSplit:
    """The examples at `positions` of this split, as a split of their own (replacements
    drawn from them only); `augmented` None keeps this split's."""
    augmented = self.augmented if augmented is None else augmented
    return LayoutSplit(self.files, self.indices[np.asarray(positions, np.int64)], augmented)

  @property
  def skipped_examples(self) -> dict[int, str]:
    """{file number: "PATH: PROBLEM"} of this split's examples found bad so far."""
    with self.files.lock:  # the loading thread of `prefetch` may be adding one
      bad = dict(self.files.bad)
    mine = set(self.indices.tolist())
    return {i: why for i, why in sorted(bad.items()) if i in mine}

  @property
  def bad_examples_skipped(self) -> int:
    return len(self.skipped_examples)

  def _example(self, position: int) -> dict:
    for step in range(len(self.indices)):
      example = self.files.example(int(self.indices[(position + step) % len(self.indices)]))
      if example is not None:
        return example
    raise self.files.none_good()

  def _take(self, positions, rng):
    examples = [self._example(int(p)) for p in positions]
    if self.augmented and rng is not None:
      examples = [augment(e, rng) for e in examples]
    batch = {k: np.stack([e[k] for e in examples]) for k in self.files.subdirs}
    batch["label"] = np.rint(batch["label"]).astype(np.int32)
    return batch


def make_split(
  root: str,
  split: str,
  label_dir: str,
  tasks: Sequence[str],
  augmented: bool,
  how: str,
  *,
  num_classes: int | None = None,
  bad_examples: str = "error",
) -> LayoutSplit:
  """A split of the MTAN layout under `root/split`, read file by file.

  Batches hold `image` (B, H, W, 3), `label` (B, H, W) int32 (-1 = ignore), `depth`
  (B, H, W, 1) and, when "normal" is a task, `normal` (B, H, W, 3), all float32 but the
  labels. Every file is checked where it is read (see `_Files`): a bad one is a
  `DataFileError` naming it, at the batch that reads it, or under `bad_examples="skip"`
  the example is replaced (see `LayoutSplit`). The first image's header is read here, so
  the split's image size is known before training.
  """
  folder = os.path.join(os.path.expanduser(root), split)
  subdirs = {"image": "image", "label": label_dir, "depth": "depth"}
  if "normal" in tasks:
    subdirs["normal"] = "normal"
  for sub in subdirs.values():
    if not os.path.isdir(os.path.join(folder, sub)):
      raise missing_dataset(f"The MTAN-preprocessed folder {split}/{sub}", root, how)
  size = count_files(os.path.join(folder, "image"))
  if size == 0:
    raise missing_dataset(f"Images (.npy) in {split}/image", root, how)
  files = _Files(folder, subdirs, size, num_classes, bad_examples)
  return LayoutSplit(files, np.arange(size), augmented)


def write_example_files(
  root: str,
  split: str,
  num: int,
  height: int,
  width: int,
  num_classes: int,
  label_dir: str,
  normals: bool,
  seed: int = 0,
):
  """Writes `num` random examples in the MTAN layout (for tests and smoke runs)."""
  rng = np.random.default_rng(seed)
  dirs = ["image", label_dir, "depth"] + (["normal"] if normals else [])
  for d in dirs:
    os.makedirs(os.path.join(root, split, d), exist_ok=True)
  for i in range(num):
    label = rng.integers(-1, num_classes, (height, width)).astype(np.float32)
    depth = rng.uniform(0.5, 10.0, (height, width, 1)).astype(np.float32)
    depth[rng.random((height, width)) < 0.1] = 0.0
    np.save(
      os.path.join(root, split, "image", f"{i}.npy"),
      rng.random((height, width, 3)).astype(np.float32),
    )
    np.save(os.path.join(root, split, label_dir, f"{i}.npy"), label)
    np.save(os.path.join(root, split, "depth", f"{i}.npy"), depth)
    if normals:
      n = rng.normal(size=(height, width, 3)).astype(np.float32)
      n /= np.linalg.norm(n, axis=-1, keepdims=True)
      n[rng.random((height, width)) < 0.1] = 0.0
      np.save(os.path.join(root, split, "normal", f"{i}.npy"), n)
