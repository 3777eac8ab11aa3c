"""What NYUv2 and Cityscapes share: the MTAN `.npy` layout (`ntkmtl_jax.data.mtan`),
SegNet-MTAN, and the dense metrics (segmentation, depth, surface normals).

The MTAN layout has no validation split: its `val/` folder is the test set on which the
papers report (and select) results, so `Benchmark.val` is that folder and `test` is None.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from ntkmtl_jax import metrics
from ntkmtl_jax.benchmarks import Benchmark, Scoring, smoke_preset
from ntkmtl_jax.data import mtan as layout
from ntkmtl_jax.data.splits import missing_dataset
from ntkmtl_jax.models.mtan import FILTERS, mtan_functions
from ntkmtl_jax.config import Config


class DenseMetrics:
  """Accumulates the MTAN benchmarks' metrics over evaluation batches: segmentation
  (mIoU %, pixel accuracy %), depth (abs, rel error) and, for NYUv2, normals (mean and
  median angle, % within 11.25 / 22.5 / 30 degrees).

  Pixels are pooled over the whole split (the official scripts average per-batch values
  over batches of 2; on a full test set the two agree to about the last digit shown).
  """

  def __init__(self, tasks: Sequence[str], num_classes: int):
    self.metrics = metrics
    self.tasks = tuple(tasks)
    self.num_classes = num_classes
    self.confusion = np.zeros((num_classes, num_classes), np.int64)
    self.depth = np.zeros(3)
    self.histogram = 0
    self.angle_sum = 0.0

  def update(self, outputs, batch):
    for task, out in zip(self.tasks, outputs):
      if task == "segmentation":
        self.confusion += self.metrics.confusion_matrix(np.argmax(out, -1), batch["label"],
                                                        self.num_classes)
      elif task == "depth":
        self.depth += np.asarray(self.metrics.depth_error_sums(out, batch["depth"]))
      else:
        angles = self.metrics.normal_angle_errors(out, batch["normal"])
        self.histogram = self.histogram + self.metrics.angle_histogram(angles)
        self.angle_sum += float(angles.sum())

  def result(self) -> dict:
    out = {}
    for task in self.tasks:
      if task == "segmentation":
        out["mIoU"], out["pix acc"] = self.metrics.segmentation_scores(self.confusion)
      elif task == "depth":
        count = max(self.depth[2], 1.0)
        out["abs err"], out["rel err"] = self.depth[0] / count, self.depth[1] / count
      else:
        names = ("mean angle", "median angle", "<11.25", "<22.5", "<30")
        out.update(zip(names, self.metrics.surface_normal_scores_from_histogram(
            self.histogram, self.angle_sum)))
    return out


@dataclasses.dataclass(frozen=True)
class MTANDataset:
  """One benchmark of the MTAN layout: its tasks, files, metrics and official protocol.

  Attributes:
    name: the registry name.
    description: one line for `ntkmtl list` and reports.
    tasks: the task names ("segmentation", "depth" and optionally "normal").
    num_classes: segmentation classes.
    label_dir: the folder of the segmentation labels ("label" or "label_7").
    how_to_get: what to do to get the data (in the missing-data message).
    scoring: the metrics, with the paper's STL row.
    paper_rows: the published rows.
    batch_size: the official training (and evaluation) batch.
    ntkmtl_exponent: NTKMTL's exponent in the official run script.
    sr_chunks: NTKMTL-SR's n (chunks of the batch).
  """
  name: str
  description: str
  tasks: tuple[str, ...]
  num_classes: int
  label_dir: str
  how_to_get: str
  scoring: Scoring
  paper_rows: dict
  batch_size: int
  ntkmtl_exponent: float
  sr_chunks: int

  def default_config(self, *, augment: bool = True,
                     filters: tuple[int, ...] = FILTERS) -> Config:
    """The official run of the MTAN trainers: Adam 1e-4, StepLR(100, 0.5), 200 epochs,
    augmentation. `augment` (random scale-crop and flip of training images) and `filters`
    (SegNet-MTAN's widths) are the benchmark's options."""
    return Config(benchmark=self.name, data=dict(augment=augment),
                  model=dict(filters=tuple(filters)), learning_rate=1e-4,
                  batch_size=self.batch_size, num_epochs=200, lr_schedule="step",
                  lr_step_size=100, lr_gamma=0.5, eval_batch_size=self.batch_size,
                  method_hparams={"ntkmtl": {"exponent": self.ntkmtl_exponent},
                                  "ntkmtl_sr": {"num_chunks": self.sr_chunks}},
                  init_prng="rbg")

  @property
  def presets(self) -> dict:
    """`tiny`: a smoke run, a one-stage SegNet-MTAN of width 8, 3 batches of 4."""
    return {"tiny": smoke_preset(4, 4, model=dict(filters=(8,)))}

  def benchmark(self, *, data_dir: str | None = None, **options) -> Benchmark:
    """The `Benchmark` over the MTAN layout under `data_dir` (the folder holding `train/`
    and `val/`); `options` as `default_config`'s."""
    config = self.default_config(**options).replace(data_dir=data_dir)
    if not data_dir:
      raise missing_dataset(f"The {self.description.split(':')[0]} data (MTAN layout)",
                            "no data_dir", self.how_to_get)
    make = lambda split, augment: layout.make_split(data_dir, split, self.label_dir,
                                                    self.tasks, augment, self.how_to_get)
    return Benchmark(
        name=self.name, description=self.description, task_names=self.tasks,
        scoring=self.scoring,
        functions=mtan_functions(self.num_classes, self.tasks, config.model["filters"]),
        train=make("train", bool(config.data["augment"])), val=make("val", False), test=None,
        new_accumulator=lambda: DenseMetrics(self.tasks, self.num_classes), config=config,
        paper_rows=self.paper_rows)
