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
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ntkmtl_jax.data.splits import Split, missing_dataset

SCALES = (1.0, 1.2, 1.5)


def _align_corners_matrix(size_in: int, size_out: int) -> np.ndarray:
  if size_in == 1:
    return np.ones((size_out, 1), np.float32)
  pos = np.arange(size_out) * (size_in - 1) / max(size_out - 1, 1)
  lo = np.clip(np.floor(pos).astype(int), 0, size_in - 2)
  frac = (pos - lo).astype(np.float32)
  m = np.zeros((size_out, size_in), np.float32)
  m[np.arange(size_out), lo] = 1.0 - frac
  m[np.arange(size_out), lo + 1] += frac
  return m


def resize_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
  """(h, w, c) -> (height, width, c), bilinear with align_corners=True."""
  rows = _align_corners_matrix(x.shape[0], height)
  cols = _align_corners_matrix(x.shape[1], width)
  return np.einsum("Hh,hwc,Ww->HWc", rows, x, cols).astype(np.float32)


def resize_nearest(x: np.ndarray, height: int, width: int) -> np.ndarray:
  """(h, w, ...) -> (height, width, ...), nearest as PyTorch's mode="nearest"."""
  rows = np.minimum((np.arange(height) * x.shape[0] / height).astype(int), x.shape[0] - 1)
  cols = np.minimum((np.arange(width) * x.shape[1] / width).astype(int), x.shape[1] - 1)
  return x[rows][:, cols]


def augment(example: dict, rng: np.random.Generator) -> dict:
  """Random scale-crop and horizontal flip of one example (see the module docstring)."""
  height, width = example["image"].shape[:2]
  scale = SCALES[rng.integers(len(SCALES))]
  h, w = int(height / scale), int(width / scale)
  i, j = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
  crop = {k: v[i : i + h, j : j + w] for k, v in example.items()}
  out = {
    "image": resize_bilinear(crop["image"], height, width),
    "label": resize_nearest(crop["label"], height, width),
    "depth": resize_nearest(crop["depth"], height, width) / scale,
  }
  if "normal" in crop:
    out["normal"] = resize_bilinear(crop["normal"], height, width)
  if rng.random() < 0.5:
    out = {k: v[:, ::-1] for k, v in out.items()}
    if "normal" in out:
      out["normal"] = out["normal"] * np.asarray([-1.0, 1.0, 1.0], np.float32)
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def count_files(folder: str) -> int:
  return len([f for f in os.listdir(folder) if f.endswith(".npy")])


def make_split(
  root: str, split: str, label_dir: str, tasks: Sequence[str], augmented: bool, how: str
) -> Split:
  """A split of the MTAN layout under `root/split`, read file by file.

  Batches hold `image` (B, H, W, 3), `label` (B, H, W) int32 (-1 = ignore), `depth`
  (B, H, W, 1) and, when "normal" is a task, `normal` (B, H, W, 3), all float32 but the
  labels.
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

  def load(index: int) -> dict:
    example = {
      k: np.load(os.path.join(folder, sub, f"{index}.npy")).astype(np.float32)
      for k, sub in subdirs.items()
    }
    if example["depth"].ndim == 2:
      example["depth"] = example["depth"][..., None]
    return example

  def take(indices, rng):
    examples = [load(int(i)) for i in indices]
    if augmented and rng is not None:
      examples = [augment(e, rng) for e in examples]
    batch = {k: np.stack([e[k] for e in examples]) for k in subdirs}
    batch["label"] = np.rint(batch["label"]).astype(np.int32)
    return batch

  return Split(size, take)


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
