"""CelebA from tfds `celeb_a`: images resized to 64x64, 40 binary attributes.

Each example: `x` (S, S, 3) float32 in [0, 1] (the 218x178 photo resized, aspect not
kept, bilinear with antialiasing, as torchvision's `Resize((64, 64))` in the official
code), `y` (40,) int32 in {0, 1} in the order of `ATTRIBUTES` (CelebA's own order). Splits
are tfds' train / validation / test (162,770 / 19,867 / 19,962 images).

Data: `tfds.data_source("celeb_a")` (array_record) from `--data-dir`; see `HOW_TO_GET`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from experiments import common

HOW_TO_GET = ("download CelebA (img_align_celeba.zip, list_attr_celeba.txt, "
              "list_eval_partition.txt, list_landmarks_align_celeba.txt, identity_CelebA.txt) "
              "from the CelebA site into DIR/downloads/manual if the automatic download fails, "
              "then on a machine with TensorFlow: `tfds build celeb_a "
              "--file_format=array_record --data_dir DIR`")

ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair",
    "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair",
    "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings",
    "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young")


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """(H, W, 3) uint8 -> (size, size, 3) float32 in [0, 1]."""
  resized = Image.fromarray(np.asarray(image, np.uint8)).resize((size, size), Image.BILINEAR)
  return np.asarray(resized, np.float32) / 255.0


def make_split(source, image_size: int, attributes=ATTRIBUTES) -> common.Split:
  """A split reading (and resizing) examples of a `celeb_a` data source on demand."""

  def take(indices, rng):
    del rng  # no augmentation, as the official code
    examples = [source[int(i)] for i in indices]
    return {"x": np.stack([resize(e["image"], image_size) for e in examples]),
            "y": np.asarray([[bool(e["attributes"][a]) for a in attributes]
                             for e in examples], np.int32).reshape(len(examples), -1)}

  return common.Split(len(source), take)


def load_splits(config) -> tuple[common.Split, common.Split, common.Split]:
  """(train, val, test) CelebA splits at `config.data["image_size"]` (64)."""
  size = int(config.data.get("image_size", 64))
  attributes = ATTRIBUTES[:int(config.data.get("num_attributes", len(ATTRIBUTES)))]
  return tuple(make_split(common.open_tfds("celeb_a", split, config.data_dir, HOW_TO_GET),
                          size, attributes) for split in ("train", "validation", "test"))
