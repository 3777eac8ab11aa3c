"""NYUv2 in the MTAN preprocessed `.npy` layout (see `experiments.mtan_data` for the layout
and where to get it): 795 train / 654 test images of 288 x 384, 13 classes, depth and
surface normals. The MTAN layout has no validation split: its `val/` folder is the test set
on which the papers report (and select) results."""

from __future__ import annotations

from experiments import mtan_data

TASKS = ("segmentation", "depth", "normal")
NUM_CLASSES = 13
LABEL_DIR = "label"
HOW_TO_GET = ("download the preprocessed NYUv2 (3 tasks) linked from the MTAN repository's "
              "README (github.com/lorenmt/mtan) and unpack it so that DIR/train/image/0.npy "
              "exists")


def load_splits(config):
  """(train, test) splits; train is augmented when `config.data["augment"]`."""
  if not config.data_dir:
    raise mtan_data.common.missing_dataset("The NYUv2 data (MTAN layout)", "no --data-dir",
                                           HOW_TO_GET)
  make = lambda split, aug: mtan_data.make_split(config.data_dir, split, LABEL_DIR, TASKS, aug,
                                                 HOW_TO_GET)
  return make("train", bool(config.data.get("augment", True))), make("val", False)
