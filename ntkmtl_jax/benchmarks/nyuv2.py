"""NYUv2 in the MTAN preprocessed `.npy` layout (see `ntkmtl_jax.data.mtan` for the layout
and where to get it): 795 train / 654 test images of 288 x 384, 13 classes, depth and
surface normals. The layout's `val/` folder is the test set on which
the papers report results; our protocol selects on 95 training images held out."""

from __future__ import annotations

from ntkmtl_jax.benchmarks import Scoring
from ntkmtl_jax.benchmarks.mtan import MTANDataset

TASKS = ("segmentation", "depth", "normal")
NUM_CLASSES = 13
LABEL_DIR = "label"
HOW_TO_GET = ("download the preprocessed NYUv2 (3 tasks) linked from the MTAN repository's "
              "README (github.com/lorenmt/mtan) and unpack it so that DIR/train/image/0.npy "
              "exists")

METRICS = ("mIoU", "pix acc", "abs err", "rel err", "mean angle", "median angle", "<11.25",
           "<22.5", "<30")
HIGHER_IS_BETTER = (True, True, False, False, False, False, True, True, True)
STL = (38.30, 63.76, 0.6754, 0.2780, 25.01, 19.21, 30.14, 57.20, 69.15)
PAPER_ROWS = {
    "ls": (39.29, 65.33, 0.5493, 0.2263, 28.15, 23.96, 22.09, 47.50, 61.08),
    "famo": (38.88, 64.90, 0.5474, 0.2194, 25.06, 19.57, 29.21, 56.61, 68.98),
    "fairgrad": (39.74, 66.01, 0.5377, 0.2236, 24.84, 19.60, 29.26, 56.58, 69.16),
    "nash_mtl": (40.13, 65.93, 0.5261, 0.2171, 25.26, 20.08, 28.40, 55.47, 68.15),
    "ntkmtl": (39.68, 65.43, 0.5296, 0.2168, 24.24, 18.63, 30.74, 58.72, 70.78),
    "ntkmtl_sr": (40.23, 65.28, 0.5261, 0.2136, 24.88, 19.58, 29.53, 56.67, 69.08),
}
PAPER_DELTA_M = {"ls": 5.59, "famo": -4.10, "fairgrad": -4.66, "nash_mtl": -4.04,
                 "ntkmtl": -6.99, "ntkmtl_sr": -5.35}
DESCRIPTION = "NYUv2: segmentation, depth, surface normals, SegNet-MTAN (MTAN .npy layout)"
SCORING = Scoring(METRICS, HIGHER_IS_BETTER, metric_tasks=(0, 0, 1, 1, 2, 2, 2, 2, 2),
                  stl_row=STL)
DATASET = MTANDataset("nyuv2", DESCRIPTION, TASKS, NUM_CLASSES, LABEL_DIR, HOW_TO_GET,
                      SCORING, PAPER_ROWS, batch_size=2, ntkmtl_exponent=0.75, sr_chunks=2,
                      val_size=95)
default_config, benchmark, PRESETS = DATASET.default_config, DATASET.benchmark, DATASET.presets
