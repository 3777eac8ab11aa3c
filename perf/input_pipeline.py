"""Examples per second of each paper benchmark's input pipeline beside its train step (CPU).

    python perf/input_pipeline.py                 # the five benchmarks (~4 min on 2 cores)
    python perf/input_pipeline.py --quick         # fewer repetitions, smaller step batches
    python perf/input_pipeline.py --old           # also the old einsum resize, once
    python perf/input_pipeline.py --benchmarks nyuv2,cityscapes

For each benchmark the training split's batches at the official batch size (`epoch_batches`
epoch after epoch, as the loop takes them, augmentation included) are read for --seconds: on
this thread ("loader"), and through `ntkmtl_jax.data.splits.prefetch` (made on its thread,
taken here and dropped: "prefetched"; on 2 cores it can beat the plain loader, as freeing
the dropped batches' memory then runs beside the making of the next). Beside them: the LS
train step of the benchmark's real model (`loop.build_step`; the median of a few steps
after the first, which compiles) at the batch of the "step batch" column: the official one,
or a smaller one where the CPU step takes too long for this script (CASES; --quick: smaller
still). The target is a loader at least 5x the CPU step: the loader then costs the loop a
small share of its time on this machine.

Data (nothing is downloaded): NYUv2 (288 x 384: image, label, depth, normal) and Cityscapes
(128 x 256: image, label_7, depth) are random files at the real size written with
`ntkmtl_jax.data.mtan.write_example_files` into a temporary folder (read back from the page
cache, as a dataset that fits in memory is after its first epoch); CelebA, QM9 and
MultiMNIST are tfds' mock data (`tfds.testing.mock_data`) through `tfds.data_source`. CelebA
reads its source on every batch, so its loader includes the mock's random examples (full
218 x 178 photos) where the real one decodes JPEGs; QM9 and MultiMNIST hold their arrays in
memory, as with the real data.

--old times the resize that the MTAN augmentation used before (a three-operand
`np.einsum` without `optimize`) on one Cityscapes-size crop, against the current
`resize_bilinear` on the same crop.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

from ntkmtl_jax import benchmarks, loop
from ntkmtl_jax.data import mtan as layout
from ntkmtl_jax.data.splits import endless_batches, prefetch

# name: (official batch, step batch, step batch with --quick, train examples). The MTAN
# models' CPU steps take seconds per example (and over a minute to compile), so they run at
# a smaller batch; a CPU step's examples per second hardly depend on the batch.
CASES = {
  "nyuv2": (2, 1, 1, 16),
  "cityscapes": (8, 2, 1, 24),
  "celeba": (256, 64, 16, 300),
  "qm9": (60, 60, 60, 300),
  "multimnist": (256, 256, 64, 600),
}
MTAN = {  # height, width, classes, label folder, normals
  "nyuv2": (288, 384, 13, "label", True),
  "cityscapes": (128, 256, 7, "label_7", False),
}
TARGET = 5.0  # loader examples per second over train-step examples per second


def old_resize_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
  """The resize the MTAN augmentation used before: a dense einsum NumPy runs as a naive loop."""

  def matrix(size_in, size_out):
    if size_in == 1:
      return np.ones((size_out, 1), np.float32)
    pos = np.arange(size_out) * (size_in - 1) / max(size_out - 1, 1)
    lo = np.clip(np.floor(pos).astype(int), 0, size_in - 2)
    frac = (pos - lo).astype(np.float32)
    m = np.zeros((size_out, size_in), np.float32)
    m[np.arange(size_out), lo] = 1.0 - frac
    m[np.arange(size_out), lo + 1] += frac
    return m

  rows, cols = matrix(x.shape[0], height), matrix(x.shape[1], width)
  return np.einsum("Hh,hwc,Ww->HWc", rows, x, cols).astype(np.float32)


def build(name: str, root: str, stack: contextlib.ExitStack):
  """The benchmark `name` on data made here (see the module docstring)."""
  examples = CASES[name][3]
  options = {}
  defaults = benchmarks.get_config(name).data
  if name in MTAN:
    height, width, classes, label_dir, normals = MTAN[name]
    folder = os.path.join(root, name)
    for split, num in (("train", examples), ("val", 2)):
      layout.write_example_files(
        folder, split, num, height, width, classes, label_dir, normals, seed=int(split == "val")
      )
    options["data_dir"] = folder
    if "val_size" in defaults:  # a validation split held out from train/: none here
      options["val_size"] = 0
  else:
    import tensorflow_datasets as tfds

    stack.enter_context(tfds.testing.mock_data(num_examples=examples))
    if name == "qm9":
      options.update(test_size=20, val_size=20)
    if name == "multimnist":
      options.update(val_size=64)
  return benchmarks.get_benchmark(name, **options)


def loader_rate(split, batch_size: int, seconds: float, prefetched: bool) -> float:
  """Examples per second of the training batches, for at least `seconds` and 3 batches."""
  batches = endless_batches(split, batch_size, seed=0)
  if prefetched:
    batches = prefetch(batches)
  with contextlib.closing(batches):
    next(batches)  # warm: first file reads, the thread's start
    count, started = 0, time.perf_counter()
    while count < 3 or time.perf_counter() - started < seconds:
      next(batches)
      count += 1
    return count * batch_size / (time.perf_counter() - started)


def step_rate(bench, batch_size: int, repeats: int, seconds: float) -> tuple[float, float, int]:
  """(examples per second of the LS train step at `batch_size`: the median of at least
  `repeats` steps after the first, and more while they take under `seconds`, up to 10;
  seconds of the first step (the compile); steps timed)."""
  config = bench.config.replace(method="ls", batch_size=batch_size)
  step, _ = loop.build_step(bench, config)
  state = loop.initial_state(bench, config, step)
  batch = bench.train.take(np.arange(batch_size), np.random.default_rng(0))
  started = time.perf_counter()
  state, out = jax.block_until_ready(step(state, batch))
  compiled = time.perf_counter() - started
  times = []
  while len(times) < repeats or (sum(times) < seconds and len(times) < 10):
    started = time.perf_counter()
    state, out = jax.block_until_ready(step(state, batch))
    times.append(time.perf_counter() - started)
  return batch_size / statistics.median(times), compiled, len(times)


def time_old_resize(seconds: float) -> str:
  """One call of the old resize on a Cityscapes crop (scale 1.2), against the current one."""
  rng = np.random.default_rng(0)
  height, width = MTAN["cityscapes"][:2]
  crop = rng.random((int(height / 1.2), int(width / 1.2), 3)).astype(np.float32)
  started = time.perf_counter()
  old = old_resize_bilinear(crop, height, width)
  old_s = time.perf_counter() - started
  count, started = 0, time.perf_counter()
  while count < 3 or time.perf_counter() - started < seconds:
    new = layout.resize_bilinear(crop, height, width)
    count += 1
  new_s = (time.perf_counter() - started) / count
  diff = float(np.abs(new.astype(np.float64) - old).max())
  # The naive einsum's time grows with (pixels in) x (pixels out); NYUv2 resizes its image
  # and its normals.
  pixels = lambda h, w: (int(h / 1.2) * int(w / 1.2)) * (h * w)
  nyuv2 = 2 * pixels(*MTAN["nyuv2"][:2]) / pixels(height, width)
  return (
    f"Resize of one Cityscapes crop {crop.shape[0]} x {crop.shape[1]} x 3 -> {height} x "
    f"{width}: the old einsum {old_s:.2f} s, now {new_s * 1e3:.2f} ms ({old_s / new_s:,.0f}x "
    f"faster; largest difference {diff:.1e}). A NYUv2 example (288 x 384 image and normals) "
    f"costs the old einsum about {nyuv2:.0f}x as much: ~{nyuv2 * old_s:.0f} s."
  )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
  parser.add_argument("--benchmarks", default=",".join(CASES))
  parser.add_argument("--quick", action="store_true", help="fewer repetitions, smaller steps")
  parser.add_argument("--old", action="store_true", help="also time the old einsum resize")
  parser.add_argument("--seconds", type=float, default=None, help="loader time per column")
  args = parser.parse_args(argv)
  names = [n.strip() for n in args.benchmarks.split(",") if n.strip()]
  unknown = sorted(set(names) - set(CASES))
  if unknown:
    parser.error(f"unknown benchmarks {', '.join(unknown)}; choose from {', '.join(CASES)}")
  seconds = args.seconds if args.seconds is not None else (0.5 if args.quick else 2.0)
  repeats, step_seconds = (1, 1.0) if args.quick else (2, 5.0)

  header = (
    f"{'benchmark':<11} {'batch':>5} {'loader ex/s':>12} {'prefetched ex/s':>16} "
    f"{'step batch':>10} {'train-step ex/s (CPU)':>22} {'loader/step':>12}"
  )
  print(header, "-" * len(header), sep="\n", flush=True)
  notes, below = [], []
  with tempfile.TemporaryDirectory() as root:
    for name in names:
      official, step_batch, quick_batch, _ = CASES[name]
      step_batch = quick_batch if args.quick else step_batch
      with contextlib.ExitStack() as stack:
        bench = build(name, root, stack)
        plain = loader_rate(bench.train, official, seconds, prefetched=False)
        fetched = loader_rate(bench.train, official, seconds, prefetched=True)
        stepped, compiled, timed = step_rate(bench, step_batch, repeats, step_seconds)
      ratio = plain / stepped
      if ratio < TARGET:
        below.append(name)
      print(
        f"{name:<11} {official:>5} {plain:>12,.1f} {fetched:>16,.1f} {step_batch:>10} "
        f"{stepped:>22,.2f} {ratio:>11,.1f}x{'' if ratio >= TARGET else '  below target'}",
        flush=True,
      )
      notes.append(f"{name} {compiled:.0f} s, {timed} timed")
  print(
    f"\nMachine: {os.cpu_count()} CPUs, jax {jax.__version__} ({jax.default_backend()}). batch: "
    "the official training batch, at which the loader runs (with the training augmentation "
    "where the benchmark has one); step "
    "batch: the LS train step's on the benchmark's real model (where it is smaller than "
    "batch: for this script's time; see CASES). Step: the median after the first step "
    f"(first step, with its compile, and steps timed: {'; '.join(notes)})."
  )
  print(
    f"Target: loader >= {TARGET:g}x the CPU train step"
    + (f"; below it: {', '.join(below)}." if below else ": met by every benchmark above.")
  )
  if args.old:
    print(time_old_resize(seconds))


if __name__ == "__main__":
  sys.exit(main())
