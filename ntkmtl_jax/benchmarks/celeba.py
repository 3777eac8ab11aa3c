"""CelebA from tfds `celeb_a`: images resized to 64x64, 40 binary attributes.

Each example: `x` (S, S, 3) float32 in [0, 1] (the 218x178 photo resized, aspect not
kept, bilinear with antialiasing, as torchvision's `Resize((64, 64))` in the official
code), `y` (40,) int32 in {0, 1} in the order of `ATTRIBUTES` (CelebA's own order). Splits
are tfds' train / validation / test (162,770 / 19,867 / 19,962 images).

Data: `tfds.data_source("celeb_a")` (array_record) from `data_dir`; see `HOW_TO_GET`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ntkmtl_jax import metrics
from ntkmtl_jax.benchmarks import Benchmark, Scoring, smoke_preset
from ntkmtl_jax.data.splits import Split, open_tfds
from ntkmtl_jax.models.celeba import celeba_functions
from ntkmtl_jax.config import Config

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


def make_split(source, image_size: int, attributes=ATTRIBUTES) -> Split:
  """A split reading (and resizing) examples of a `celeb_a` data source on demand."""

  def take(indices, rng):
    del rng  # no augmentation, as the official code
    examples = [source[int(i)] for i in indices]
    return {"x": np.stack([resize(e["image"], image_size) for e in examples]),
            "y": np.asarray([[bool(e["attributes"][a]) for a in attributes]
                             for e in examples], np.int32).reshape(len(examples), -1)}

  return Split(len(source), take)


def load_splits(data_dir: str | None, *, image_size: int = 64,
                num_attributes: int = len(ATTRIBUTES)) -> tuple[Split, Split, Split]:
  """(train, val, test) CelebA splits at `image_size`, with the first `num_attributes`."""
  attributes = ATTRIBUTES[:int(num_attributes)]
  return tuple(make_split(open_tfds("celeb_a", split, data_dir, HOW_TO_GET), int(image_size),
                          attributes) for split in ("train", "validation", "test"))


class F1:
  """Accumulates per-attribute TP/FP/FN of sigmoid(logit) >= 0.5 (i.e. logit >= 0)."""

  def __init__(self, attributes):
    self.attributes = attributes
    self.counts = np.zeros((3, len(attributes)), np.int64)

  def update(self, logits, batch):
    self.counts += np.stack(metrics.binary_counts(logits >= 0.0, batch["y"]))

  def result(self) -> dict:
    f1 = metrics.f1_from_counts(*self.counts) * 100.0
    return {f"{a} F1": float(v) for a, v in zip(self.attributes, f1)}


# Table 2 of the paper: (MR, Delta m %) per method.
PAPER_MR_DELTA_M = {
    "ls": (7.85, 4.15), "si": (9.75, 7.20), "rlw": (6.90, 1.46), "dwa": (8.72, 3.20),
    "uw": (7.38, 3.23), "mgda": (12.97, 14.85), "pcgrad": (8.53, 3.17), "cagrad": (8.10, 2.48),
    "imtl_g": (6.25, 0.84), "nash_mtl": (6.50, 2.84), "famo": (6.45, 1.21),
    "fairgrad": (6.92, 0.37), "ntkmtl": (4.35, -0.77), "ntkmtl_sr": (4.33, 0.23)}


def scoring(num_attributes: int = len(ATTRIBUTES)) -> Scoring:
  """F1 (%) per attribute; no published STL row (Delta m needs STL runs)."""
  return Scoring(metric_names=tuple(f"{a} F1" for a in ATTRIBUTES[:num_attributes]),
                 higher_is_better=(True,) * num_attributes,
                 metric_tasks=tuple(range(num_attributes)))


def default_config(*, protocol: str = "ours", image_size: int = 64,
                   num_attributes: int = len(ATTRIBUTES),
                   unbiased_running_var: bool | None = None) -> Config:
  """The authors' run: Adam 3e-4, cosine, batch 256, 15 epochs, 64x64 images, the model of the
  best mean validation F1 (experiments/celeba/trainer.py of jianke0604/NTKMTL, lines 136-138:
  a strictly better epoch replaces the selected one); under the protocol `protocol`:

  - "ours": full batches; flax's BatchNorm statistics.
  - "official": every epoch's last partial batch trained on (torch's DataLoader, line 63);
    BatchNorm keeps PyTorch's unbiased running variance (`unbiased_running_var`, None: the
    protocol's).

  Both score logits with the exact binary cross-entropy where the authors' `BCELoss(sigmoid(z))`
  saturates (|z| > ~17 in float32); experiments/README.md says what that changes.
  """
  official = protocol == "official"
  if protocol not in ("ours", "official"):
    raise ValueError(f"Unknown protocol {protocol!r} for celeba.")
  if unbiased_running_var is None:
    unbiased_running_var = official
  return Config(benchmark="celeba", protocol=protocol,
                data=dict(image_size=image_size, num_attributes=num_attributes),
                model=dict(unbiased_running_var=bool(unbiased_running_var)),
                method_hparams={"ntkmtl": {"exponent": 0.5}, "ntkmtl_sr": {"num_chunks": 4}},
                learning_rate=3e-4, batch_size=256, num_epochs=15, lr_schedule="cosine",
                eval_batch_size=512, init_prng="rbg", drop_last=not official)


# tiny: 16x16 images, the first 4 attributes, 3 batches of 8.
PRESETS = {"tiny": smoke_preset(8, 16, data=dict(image_size=16, num_attributes=4))}


def benchmark(*, data_dir: str | None = None, **options) -> Benchmark:
  """CelebA (tfds `celeb_a`): 40 binary face attributes (F1), the paper's 7-conv network.

  Options: `data_dir`, `protocol`, `image_size` (64), `num_attributes` (the first n of
  `ATTRIBUTES`), `unbiased_running_var`; see `default_config`. Model selection on the mean
  validation F1.
  """
  config = default_config(**options).replace(data_dir=data_dir)
  train, val, test = load_splits(data_dir, **config.data)
  attributes = ATTRIBUTES[:config.data["num_attributes"]]
  return Benchmark(
      name="celeba", description="CelebA: 40 binary face attributes (F1), the paper's 7-conv "
      "network", task_names=attributes, scoring=scoring(len(attributes)),
      functions=celeba_functions(len(attributes),
                                 unbiased_running_var=config.model["unbiased_running_var"]),
      train=train, val=val, test=test,
      new_accumulator=lambda: F1(attributes), config=config,
      paper_rows={"mr_delta_m": PAPER_MR_DELTA_M})
