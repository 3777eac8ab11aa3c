"""Built-in benchmarks that need no download: MultiDigits and Sines.

MultiDigits is made of real handwritten digits (the 8 x 8 images that scikit-learn ships
with the package): two digits side by side form a 8 x 16 image, and the tasks are

  0. "left":   the left digit (10 classes, cross-entropy),
  1. "right":  the right digit (10 classes, cross-entropy),
  2. "number": the two-digit number they form, 10 * left + right, as a regression
               (squared error; values 0 to 99).

The regression target runs from 0 to 99, so its squared-error loss (about 3000 at
initialisation, against 2.3 for a 10-class cross-entropy), its gradient and its NTK
eigenvalue lambda_i = ||g_i||^2 (some 10^5 times the digit tasks' at initialisation with
the demo's model; see `ntkmtl spectrum`) dwarf the others. Under plain loss summation (LS)
the shared encoder serves the number task, which itself weighs the left digit ten times
more than the right one, so the digit tasks (the right one most) converge slowly. This is
the task imbalance NTKMTL is built to remove. `regression_scale` multiplies the regression
target and so sets the size of that imbalance (the eigenvalue ratio grows like
regression_scale^2).
`regression="ink"` swaps the number for the share of the image that is inked (100 * the
mean pixel), a target that needs no digit recognition at all.

Sines is generated: k regression tasks on one input x in [-1, 1]^d, task i being
`y_i = a_i * sin(pi * f_i * <u_i, x>)` with a fixed random unit direction u_i. The
amplitudes a_i grow geometrically from 1 to `imbalance` (the knob: the ratio of the largest
to the smallest amplitude; squared-error gradients scale like a_i^2, so the eigenvalue ratio
is about imbalance^2) and the frequencies f_i from `min_frequency` to `max_frequency`
(higher frequencies are learned more slowly by a network: a second, independent source of
imbalance). `imbalance=1` and equal frequencies give balanced tasks.

Both are deterministic given their seeds: the data (`data_seed`) never depends on the
training seed, which only shuffles the mini-batches.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ntkmtl_jax._optional import require

Batch = dict[str, np.ndarray]


class TaskArrays(NamedTuple):
  """The arrays of one split; `x` is (N, features) float32, targets are named per task.

  `splits.Split.from_arrays(arrays.as_batch())` is the split the training loop reads.
  """

  x: np.ndarray
  targets: dict[str, np.ndarray]

  def __len__(self):
    return self.x.shape[0]

  def as_batch(self) -> Batch:
    return {"x": self.x, **self.targets}


class OfflineDataset(NamedTuple):
  """A built-in dataset: train and test splits and what each task is.

  Attributes:
    train: the training split.
    test: the held-out split (built from different source images for MultiDigits).
    task_names: the k task names, in the order of the task losses.
    task_kinds: "classification" or "regression" per task.
    num_classes: classes per task (1 for regression).
    image_shape: (height, width) of the images, or None for non-image data.
  """

  train: TaskArrays
  test: TaskArrays
  task_names: tuple[str, ...]
  task_kinds: tuple[str, ...]
  num_classes: tuple[int, ...]
  image_shape: tuple[int, int] | None


def multidigits(
  num_train: int = 10_000,
  num_test: int = 2_000,
  *,
  regression: str = "number",
  regression_scale: float = 1.0,
  data_seed: int = 0,
  test_fraction: float = 0.3,
) -> OfflineDataset:
  """MultiDigits: two scikit-learn digits side by side; left, right and a regression task.

  The 1797 source images are split once (by `data_seed`) into disjoint train and test
  pools (`test_fraction` of them for test), so no test image was seen in training. Pixels
  are scaled to [0, 1].

  Args:
    num_train: number of training pairs.
    num_test: number of test pairs.
    regression: the third task: "number" (10 * left + right) or "ink" (100 * the mean
      pixel); it is also the task's name.
    regression_scale: multiplies the regression target; 1.0 gives the imbalance of the
      demo, smaller values reduce it.
    data_seed: seed of the image split and of the pairing.
    test_fraction: share of the source images reserved for the test pairs.

  Returns:
    An `OfflineDataset` with `x` of shape (N, 128) in [0, 1], int32 targets "left" and
    "right" in 0..9, and the float32 regression target named by `regression`.
  """
  # scikit-learn ships the images: no download, but it is the `data` extra.
  load_digits = require("sklearn.datasets", "data", "the MultiDigits benchmark").load_digits

  if num_train < 1 or num_test < 1:
    raise ValueError(f"num_train and num_test must be positive, got {num_train}, {num_test}.")
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
  if regression not in ("number", "ink"):
    raise ValueError(f"regression must be 'number' or 'ink', got {regression!r}.")
  digits = load_digits()
  images = digits.images.astype(np.float32)  # (1797, 8, 8), values 0..16
  labels = digits.target.astype(np.int32)
  rng = np.random.default_rng(data_seed)
  order = rng.permutation(len(images))
  num_test_images = int(round(test_fraction * len(images)))
  pools = order[num_test_images:], order[:num_test_images]

  def make(pool, n):
    left, right = rng.choice(pool, size=n), rng.choice(pool, size=n)
    raw = np.concatenate([images[left], images[right]], axis=2)  # (n, 8, 16)
    x = (raw / 16.0).reshape(n, -1).astype(np.float32)
    if regression == "number":
      target = 10.0 * labels[left] + labels[right]
    else:
      target = 100.0 * x.mean(axis=1)
    return TaskArrays(
      x,
      {
        "left": labels[left],
        "right": labels[right],
        regression: (target * regression_scale).astype(np.float32),
      },
    )

  train = make(pools[0], num_train)
  test = make(pools[1], num_test)
  return OfflineDataset(
    train,
    test,
    ("left", "right", regression),
    ("classification", "classification", "regression"),
    (10, 10, 1),
    (8, 16),
  )


def sines(
  num_tasks: int = 3,
  *,
  imbalance: float = 30.0,
  min_frequency: float = 0.5,
  max_frequency: float = 1.5,
  input_dim: int = 2,
  num_train: int = 8_192,
  num_test: int = 2_048,
  noise: float = 0.0,
  data_seed: int = 0,
) -> OfflineDataset:
  """Sines: generated regression tasks whose imbalance is set by one knob.

  Task i (i = 0..k-1) is `y_i = a_i * sin(pi * f_i * <u_i, x>) + noise * a_i * eps` with
  x uniform in [-1, 1]^input_dim, u_i a fixed random unit vector,
  `a_i = imbalance ** (i / (k - 1))` and f_i spaced linearly from `min_frequency` to
  `max_frequency`.

  Args:
    num_tasks: k >= 1.
    imbalance: ratio a_{k-1} / a_0 of the largest to the smallest amplitude (>= 1); the
      ratio of the tasks' gradient norms squared (their n = 1 NTK eigenvalues) is about
      imbalance ** 2. 1.0 makes every task the same scale.
    min_frequency: frequency of task 0.
    max_frequency: frequency of task k - 1.
    input_dim: d, the input dimension.
    num_train: training examples.
    num_test: test examples.
    noise: relative label noise (0 = noiseless).
    data_seed: seed of the directions, inputs and noise.

  Returns:
    An `OfflineDataset` with `x` (N, d) and float32 targets "sine0".."sine{k-1}".
  """
  if num_tasks < 1:
    raise ValueError(f"num_tasks must be at least 1, got {num_tasks}.")
  if imbalance < 1.0:
    raise ValueError(
      f"imbalance is the ratio of the largest to the smallest amplitude and "
      f"must be >= 1, got {imbalance}."
    )
  if min_frequency <= 0 or max_frequency <= 0:
    raise ValueError("Frequencies must be positive.")
  rng = np.random.default_rng(data_seed)
  positions = np.linspace(0.0, 1.0, num_tasks) if num_tasks > 1 else np.zeros(1)
  amplitudes = imbalance**positions
  frequencies = min_frequency + (max_frequency - min_frequency) * positions
  directions = rng.normal(size=(num_tasks, input_dim))
  directions /= np.linalg.norm(directions, axis=1, keepdims=True)
  names = tuple(f"sine{i}" for i in range(num_tasks))

  def make(n):
    x = rng.uniform(-1.0, 1.0, size=(n, input_dim))
    phase = np.pi * frequencies * (x @ directions.T)  # (n, k)
    y = amplitudes * (np.sin(phase) + noise * rng.normal(size=phase.shape))
    return TaskArrays(
      x.astype(np.float32), {name: y[:, i].astype(np.float32) for i, name in enumerate(names)}
    )

  train, test = make(num_train), make(num_test)
  return OfflineDataset(train, test, names, ("regression",) * num_tasks, (1,) * num_tasks, None)
