"""Cityscapes in the MTAN preprocessed `.npy` layout (see `ntkmtl_jax.data.mtan` for the layout
and where to get it): 2,975 train / 500 test images of 128 x 256, 7 classes (`label_7`) and
depth. The layout's `val/` folder is the test set on which
the papers report results; our protocol selects on 375 training images held out."""

from __future__ import annotations

from ntkmtl_jax.benchmarks import Scoring
from ntkmtl_jax.benchmarks.mtan import MTANDataset

TASKS = ("segmentation", "depth")
NUM_CLASSES = 7
LABEL_DIR = "label_7"
HOW_TO_GET = ("download the preprocessed Cityscapes (3 tasks) linked from the MTAN repository's "
              "README (github.com/lorenmt/mtan) and unpack it so that DIR/train/image/0.npy "
              "exists")

METRICS = ("mIoU", "pix acc", "abs err", "rel err")
HIGHER_IS_BETTER = (True, True, False, False)
STL = (74.01, 93.16, 0.0125, 27.77)
PAPER_ROWS = {
    "ls": (75.18, 93.49, 0.0155, 46.77),
    "famo": (74.54, 93.29, 0.0145, 32.59),
    "fairgrad": (75.72, 93.68, 0.0134, 32.25),
    "nash_mtl": (75.41, 93.66, 0.0129, 35.02),
    "ntkmtl": (73.71, 92.71, 0.0136, 27.21),
    "ntkmtl_sr": (72.58, 92.93, 0.0124, 31.65),
}
PAPER_DELTA_M = {"ls": 22.60, "famo": 8.13, "fairgrad": 5.18, "nash_mtl": 6.82,
                 "ntkmtl": 1.92, "ntkmtl_sr": 3.84}
DESCRIPTION = "Cityscapes: 7-class segmentation and depth, SegNet-MTAN (MTAN .npy layout)"
SCORING = Scoring(METRICS, HIGHER_IS_BETTER, metric_tasks=(0, 0, 1, 1), stl_row=STL)
DATASET = MTANDataset("cityscapes", DESCRIPTION, TASKS, NUM_CLASSES, LABEL_DIR, HOW_TO_GET,
                      SCORING, PAPER_ROWS, batch_size=8, ntkmtl_exponent=0.5, sr_chunks=4,
                      val_size=375)
default_config, benchmark, PRESETS = DATASET.default_config, DATASET.benchmark, DATASET.presets
