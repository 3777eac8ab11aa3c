"""MultiMNIST built from tfds `mnist`: two digits overlaid on one 28x28 image.

Construction (Sener & Koltun's, made deterministic): example i of a split pairs MNIST image
i with image `partner[i]` of the same split, where `partner` is a permutation drawn from
`data_seed`. On a 36x36 canvas the first digit is placed at the top left (rows and columns
0-27) and the second at the bottom right (rows and columns 8-35); overlapping pixels take
the maximum; the canvas is resized to 28x28 (bilinear). Labels are (left digit, right
digit). Splits: train = the first 50,000 MNIST training images, val = the last 10,000
(`val_size`), test = the MNIST test set. Pixels are float32 in [0, 1].

Data: `tfds.data_source("mnist")` (array_record) from `--data-dir`; see `HOW_TO_GET`.
"""

from __future__ import annotations

import numpy as np

from experiments import common

HOW_TO_GET = ("on a machine with TensorFlow installed, `pip install tensorflow "
              "tensorflow-datasets && tfds build mnist --file_format=array_record "
              "--data_dir DIR` (or copy an existing DIR/mnist/3.0.1 prepared in array_record "
              "format)")
CANVAS = 36
OFFSET = 8


def _resize_matrix(size_in: int, size_out: int) -> np.ndarray:
  """(size_out, size_in) bilinear weights with half-pixel centres (PIL/tf 'bilinear')."""
  centres = (np.arange(size_out) + 0.5) * size_in / size_out - 0.5
  centres = np.clip(centres, 0, size_in - 1)
  lo = np.minimum(np.floor(centres).astype(int), size_in - 2)
  frac = centres - lo
  m = np.zeros((size_out, size_in), np.float32)
  m[np.arange(size_out), lo] = 1 - frac
  m[np.arange(size_out), lo + 1] += frac
  return m


_RESIZE = _resize_matrix(CANVAS, 28)


def overlay(left: np.ndarray, right: np.ndarray) -> np.ndarray:
  """(B, 28, 28) uint8 digits -> (B, 28, 28, 1) float32 MultiMNIST images in [0, 1]."""
  b = left.shape[0]
  canvas = np.zeros((b, CANVAS, CANVAS), np.float32)
  canvas[:, :28, :28] = left / 255.0
  canvas[:, OFFSET:, OFFSET:] = np.maximum(canvas[:, OFFSET:, OFFSET:], right / 255.0)
  image = np.einsum("Hh,bhw,Ww->bHW", _RESIZE, canvas, _RESIZE)
  return np.clip(image, 0.0, 1.0)[..., None].astype(np.float32)


def make_split(images: np.ndarray, labels: np.ndarray, data_seed: int) -> common.Split:
  """A MultiMNIST split over MNIST `images` (N, 28, 28) uint8 and `labels` (N,)."""
  images = images.reshape(images.shape[0], 28, 28)
  partner = np.random.default_rng(data_seed).permutation(len(images))

  def take(indices, rng):
    del rng  # no augmentation
    other = partner[indices]
    return {"image": overlay(images[indices], images[other]),
            "labels": np.stack([labels[indices], labels[other]], axis=1).astype(np.int32)}

  return common.Split(len(images), take)


def load_splits(config) -> tuple[common.Split, common.Split, common.Split]:
  """(train, val, test) MultiMNIST splits (see the module docstring)."""
  val_size = int(config.data.get("val_size", 10_000))
  seed = int(config.data.get("data_seed", 0))
  train_source = common.open_tfds("mnist", "train", config.data_dir, HOW_TO_GET)
  test_source = common.open_tfds("mnist", "test", config.data_dir, HOW_TO_GET)
  train = common.read_examples(train_source, ("image", "label"))
  test = common.read_examples(test_source, ("image", "label"))
  n = len(train["label"])
  if not 0 < val_size < n:
    raise ValueError(f"val_size must be in (0, {n}), got {val_size}.")
  cut = n - val_size
  return (make_split(train["image"][:cut], train["label"][:cut], seed),
          make_split(train["image"][cut:], train["label"][cut:], seed + 1),
          make_split(test["image"], test["label"], seed + 2))
