"""MultiMNIST built from tfds `mnist`: two digits overlaid on one 28x28 image.

Construction (Sener & Koltun's, made deterministic): example i of a split pairs MNIST image
i with image `partner[i]` of the same split, where `partner` is a permutation drawn from
`data_seed`. On a 36x36 canvas the first digit is placed at the top left (rows and columns
0-27) and the second at the bottom right (rows and columns 8-35); overlapping pixels take
the maximum; the canvas is resized to 28x28 (bilinear). Labels are (left digit, right
digit). Splits: train = the first 50,000 MNIST training images, val = the last 10,000
(`val_size`), test = the MNIST test set. Pixels are float32 in [0, 1].

Data: `tfds.data_source("mnist")` (array_record) from `data_dir`; see `HOW_TO_GET`.
"""

from __future__ import annotations

import numpy as np

from ntkmtl_jax.benchmarks import Benchmark, Scoring, smoke_preset
from ntkmtl_jax.data.splits import Split, open_tfds, read_examples
from ntkmtl_jax.models.lenet import lenet_functions
from ntkmtl_jax.config import Config

HOW_TO_GET = (
  "on a machine with TensorFlow installed, `pip install tensorflow "
  "tensorflow-datasets && tfds build mnist --file_format=array_record "
  "--data_dir DIR` (or copy an existing DIR/mnist/3.0.1 prepared in array_record "
  "format)"
)
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
  image = _RESIZE @ canvas @ _RESIZE.T  # two matmuls (a three-operand np.einsum is a naive loop)
  return np.clip(image, 0.0, 1.0)[..., None].astype(np.float32)


def make_split(images: np.ndarray, labels: np.ndarray, data_seed: int) -> Split:
  """A MultiMNIST split over MNIST `images` (N, 28, 28) uint8 and `labels` (N,)."""
  images = images.reshape(images.shape[0], 28, 28)
  partner = np.random.default_rng(data_seed).permutation(len(images))

  def take(indices, rng):
    del rng  # no augmentation
    other = partner[indices]
    return {
      "image": overlay(images[indices], images[other]),
      "labels": np.stack([labels[indices], labels[other]], axis=1).astype(np.int32),
    }

  return Split(len(images), take)


def load_splits(
  data_dir: str | None, *, val_size: int = 10_000, data_seed: int = 0
) -> tuple[Split, Split, Split]:
  """(train, val, test) MultiMNIST splits (see the module docstring)."""
  train_source = open_tfds("mnist", "train", data_dir, HOW_TO_GET)
  test_source = open_tfds("mnist", "test", data_dir, HOW_TO_GET)
  train = read_examples(train_source, ("image", "label"))
  test = read_examples(test_source, ("image", "label"))
  n = len(train["label"])
  if not 0 < val_size < n:
    raise ValueError(f"val_size must be in (0, {n}), got {val_size}.")
  cut = n - val_size
  return (
    make_split(train["image"][:cut], train["label"][:cut], data_seed),
    make_split(train["image"][cut:], train["label"][cut:], data_seed + 1),
    make_split(test["image"], test["label"], data_seed + 2),
  )


TASK_NAMES = ("left", "right")


class Accuracy:
  """Accumulates per-digit accuracy over evaluation batches."""

  def __init__(self):
    self.correct = np.zeros(len(TASK_NAMES))
    self.count = 0

  def update(self, logits, batch):
    self.correct += np.sum(np.argmax(logits, axis=-1) == batch["labels"], axis=0)
    self.count += len(batch["labels"])

  def result(self) -> dict:
    return {f"{t} acc": float(c / self.count * 100.0) for t, c in zip(TASK_NAMES, self.correct)}


SCORING = Scoring(
  metric_names=("left acc", "right acc"), higher_is_better=(True, True), metric_tasks=(0, 1)
)


def default_config(*, val_size: int = 10_000, data_seed: int = 0) -> Config:
  """Not in the NTKMTL paper: the field's usual LeNet setting with Adam 1e-3, batch 256, 10
  epochs. No published STL row: Delta m % uses the STL runs of the same report."""
  return Config(
    benchmark="multimnist",
    data=dict(val_size=val_size, data_seed=data_seed),
    learning_rate=1e-3,
    batch_size=256,
    num_epochs=10,
    eval_batch_size=1000,
    init_prng="rbg",
  )


# tiny: 8 validation images, 3 batches of 8.
PRESETS = {"tiny": smoke_preset(8, 16, data=dict(val_size=8))}


def benchmark(*, data_dir: str | None = None, **options) -> Benchmark:
  """MultiMNIST (tfds `mnist`): left and right digit of two overlaid MNIST digits, LeNet.

  Options: `data_dir`, `val_size`, `data_seed`; per-digit accuracy (%), model selection on
  the mean validation accuracy.
  """
  config = default_config(**options).replace(data_dir=data_dir)
  train, val, test = load_splits(data_dir, **config.data)
  return Benchmark(
    name="multimnist",
    description="MultiMNIST: left and right digit of two overlaid MNIST digits, LeNet",
    task_names=TASK_NAMES,
    scoring=SCORING,
    functions=lenet_functions(len(TASK_NAMES)),
    train=train,
    val=val,
    test=test,
    new_accumulator=Accuracy,
    config=config,
  )
