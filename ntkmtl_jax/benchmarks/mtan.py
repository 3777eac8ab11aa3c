"""What NYUv2 and Cityscapes share: the MTAN `.npy` layout (`ntkmtl_jax.data.mtan`),
SegNet-MTAN, and the dense metrics (segmentation, depth, surface normals).

The MTAN layout has no validation split: its `val/` folder is the test set on which the
papers report results, so it is `Benchmark.test`; our protocol selects the model on a
validation split held out from `train/` (`Benchmark.val`), the official one selects nothing
and reports the mean of the last epochs (`MTANDataset.default_config`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from ntkmtl_jax import metrics
from ntkmtl_jax.benchmarks import Benchmark, Scoring, smoke_preset
from ntkmtl_jax.data import mtan as layout
from ntkmtl_jax.data.splits import missing_dataset
from ntkmtl_jax.data.validation import check_bad_examples
from ntkmtl_jax.models.mtan import FILTERS, mtan_functions
from ntkmtl_jax.config import Config


POOLINGS = ("pixels", "batches")


class DenseMetrics:
  """Accumulates the MTAN benchmarks' metrics over evaluation batches: segmentation
  (mIoU %, pixel accuracy %), depth (abs, rel error) and, for NYUv2, normals (mean and
  median angle, % within 11.25 / 22.5 / 30 degrees).

  Segmentation is scored from the confusion matrix of the whole split. Depth and normals
  are pooled as `pooling` says:

  - "pixels" (ours): over every valid pixel of the split, so a metric does not depend on
    the evaluation batch size; the median angle from a 0.01-degree histogram.
  - "batches" (the authors' trainers, `experiments/nyuv2/trainer.py` lines 239-271 of
    jianke0604/NTKMTL): each batch's value over its valid pixels (the median the batch's
    own), then the plain mean over batches, a short last batch weighing as much as a full
    one. A batch without a valid pixel, where their code divides by zero, is left out.

  The two agree for abs err, rel err, mean angle and the % within thresholds when every
  batch holds as many valid pixels (tests/test_benchmarks_nyuv2.py), and differ otherwise
  (an uneven last batch, pixels without depth); medians differ in general.

  Non-finite predictions are refused (a ValueError naming the task and its metrics), not
  scored: a NaN would make abs err, rel err and the mean angle NaN, and NumPy's histogram
  and comparisons count a NaN angle as 0 degrees (within every threshold).
  """

  def __init__(self, tasks: Sequence[str], num_classes: int, pooling: str = "pixels"):
    if pooling not in POOLINGS:
      raise ValueError(f"metric_pooling={pooling!r}; choose one of {', '.join(POOLINGS)}.")
    self.metrics = metrics
    self.tasks = tuple(tasks)
    self.num_classes = num_classes
    self.pooling = pooling
    self.confusion = np.zeros((num_classes, num_classes), np.int64)
    self.depth = np.zeros(3)
    self.histogram = 0
    self.angle_sum = 0.0
    self.per_batch = {"depth": [], "normal": []}
    self.batches = 0

  def update(self, outputs, batch):
    self.batches += 1
    for task, out in zip(self.tasks, outputs):
      _refuse_non_finite(task, out, self.batches)
      if task == "segmentation":
        self.confusion += self.metrics.confusion_matrix(np.argmax(out, -1), batch["label"],
                                                        self.num_classes)
      elif task == "depth":
        sums = np.asarray(self.metrics.depth_error_sums(out, batch["depth"]))
        self.depth += sums
        if sums[2] > 0:
          self.per_batch["depth"].append(sums[:2] / sums[2])
      else:
        angles = self.metrics.normal_angle_errors(out, batch["normal"])
        if self.pooling == "batches":
          if angles.size:
            self.per_batch["normal"].append(self.metrics.surface_normal_scores(angles))
        else:
          self.histogram = self.histogram + self.metrics.angle_histogram(angles)
          self.angle_sum += float(angles.sum())

  def result(self) -> dict:
    out = {}
    by_batch = self.pooling == "batches"
    for task in self.tasks:
      if task == "segmentation":
        out["mIoU"], out["pix acc"] = self.metrics.segmentation_scores(self.confusion)
      elif task == "depth":
        if by_batch:
          out["abs err"], out["rel err"] = (float(v) for v in _mean(self.per_batch["depth"], 2))
        else:
          count = max(self.depth[2], 1.0)
          out["abs err"], out["rel err"] = self.depth[0] / count, self.depth[1] / count
      else:
        names = ("mean angle", "median angle", "<11.25", "<22.5", "<30")
        scores = (_mean(self.per_batch["normal"], 5) if by_batch else
                  self.metrics.surface_normal_scores_from_histogram(self.histogram,
                                                                    self.angle_sum))
        out.update(zip(names, (float(v) for v in scores)))
    return out


PREDICTIONS = {"segmentation": ("segmentation logits", "mIoU and pix acc"),
               "depth": ("depth predictions", "abs err and rel err"),
               "normal": ("surface normal predictions", "angle errors")}


def _refuse_non_finite(task: str, out, batch: int):
  finite = np.isfinite(out)
  if not finite.all():
    what, scores = PREDICTIONS[task]
    bad = int(finite.size - finite.sum())
    raise ValueError(
        f"The model's {what} are not finite on the split being evaluated ({bad:,} of "
        f"{finite.size:,} values NaN or infinite in evaluation batch {batch}), so its "
        f"{scores} cannot be scored: the model has diverged (lower the learning rate, or "
        "look at the run's skipped steps).")


def _mean(rows: list, width: int) -> np.ndarray:
  return np.mean(rows, axis=0) if rows else np.full(width, np.nan)


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
    val_size: our protocol's validation split, carved from the training images (the
      layout's `val/` folder is the test set).
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
  val_size: int

  def default_config(self, *, protocol: str = "ours", augment: bool = True,
                     filters: tuple[int, ...] = FILTERS, val_size: int | None = None,
                     split_seed: int = 0, metric_pooling: str | None = None,
                     unbiased_running_var: bool | None = None,
                     bad_examples: str = "error") -> Config:
    """The run of the MTAN trainers: Adam 1e-4, StepLR(100, 0.5), 200 epochs, batch
    `batch_size`, augmentation; under the protocol `protocol`:

    - "ours": the model is selected on the validation Delta m over `val_size` training
      images held out (drawn with `split_seed`; never trained on) and scored on the test
      set (the layout's `val/`); depth and normal errors pooled over pixels; full batches.
    - "official" (the authors' trainers): no validation split and no selection: the result
      is the mean of the test metrics of the last 10 epochs (the MTAN code family's report);
      metrics averaged per batch; every epoch's last partial batch trained on; BatchNorm
      keeps PyTorch's unbiased running variance.

    Options: `augment` (random scale-crop and flip of training images), `filters`
    (SegNet-MTAN's widths), `val_size`, `split_seed`, `metric_pooling` ("pixels" or
    "batches"), `unbiased_running_var` (None: the protocol's) and `bad_examples`: "error"
    (a file that fails its checks stops the run with a `DataFileError` naming it) or "skip"
    (its example is replaced by the next good one of its split, so batches keep their
    shape, and warned about; see `ntkmtl_jax.data.mtan.LayoutSplit`). `bad_examples` is in
    `data` only when it is "skip", so the configs, and the resumes, of earlier runs are
    unchanged.
    """
    official = protocol == "official"
    if protocol not in ("ours", "official"):
      raise ValueError(f"Unknown protocol {protocol!r} for {self.name}.")
    if val_size is None:
      val_size = 0 if official else self.val_size
    if metric_pooling is None:
      metric_pooling = "batches" if official else "pixels"
    if unbiased_running_var is None:
      unbiased_running_var = official
    skip = {"bad_examples": "skip"} if check_bad_examples(bad_examples) == "skip" else {}
    return Config(benchmark=self.name, protocol=protocol,
                  data=dict(augment=augment, val_size=int(val_size), split_seed=split_seed,
                            metric_pooling=metric_pooling, **skip),
                  model=dict(filters=tuple(filters),
                             unbiased_running_var=bool(unbiased_running_var)),
                  learning_rate=1e-4, batch_size=self.batch_size, num_epochs=200,
                  lr_schedule="step", lr_step_size=100, lr_gamma=0.5,
                  eval_batch_size=self.batch_size,
                  method_hparams={"ntkmtl": {"exponent": self.ntkmtl_exponent},
                                  "ntkmtl_sr": {"num_chunks": self.sr_chunks}},
                  init_prng="rbg", selection="last_epochs" if official else "best",
                  report_epochs=10, drop_last=not official)

  @property
  def presets(self) -> dict:
    """`tiny`: a smoke run, a one-stage SegNet-MTAN of width 8, 3 steps of batch 4 over as
    many epochs as they take, a validation split of 2 images (under our protocol)."""

    def tiny(config: Config) -> Config:
      data = {"val_size": min(config.data["val_size"], 2)}
      shrink = smoke_preset(4, 4, data=data, model=dict(filters=(8,)))
      return shrink(config).replace(num_epochs=None)

    return {"tiny": tiny}

  def benchmark(self, *, data_dir: str | None = None, **options) -> Benchmark:
    """The `Benchmark` over the MTAN layout under `data_dir` (the folder holding `train/`
    and `val/`); `options` as `default_config`'s. Its test split is the layout's `val/`
    folder; its validation split (our protocol) `val_size` images of `train/`."""
    config = self.default_config(**options).replace(data_dir=data_dir)
    if not data_dir:
      raise missing_dataset(f"The {self.description.split(':')[0]} data (MTAN layout)",
                            "no data_dir", self.how_to_get)
    data = config.data
    make = lambda split, augment: layout.make_split(
        data_dir, split, self.label_dir, self.tasks, augment, self.how_to_get,
        num_classes=self.num_classes, bad_examples=data.get("bad_examples", "error"))
    train, val = make("train", bool(data["augment"])), None
    if data["val_size"]:
      if not 0 < data["val_size"] < len(train):
        raise ValueError(f"{self.name}: val_size={data['val_size']} must be between 0 and the "
                         f"{len(train)} training images.")
      order = np.random.default_rng(int(data["split_seed"])).permutation(len(train))
      held_out = np.sort(order[:data["val_size"]])
      # Subsets of one reading of train/: a bad example is replaced from its own subset (no
      # held-out image in training) and warned about once.
      val = train.subset(held_out, augmented=False)
      train = train.subset(np.sort(order[data["val_size"]:]))
    pooling = data["metric_pooling"]
    DenseMetrics(self.tasks, self.num_classes, pooling)  # refuses an unknown pooling now
    functions = mtan_functions(self.num_classes, self.tasks, config.model["filters"],
                               unbiased_running_var=config.model["unbiased_running_var"])
    return Benchmark(
        name=self.name, description=self.description, task_names=self.tasks,
        scoring=self.scoring, functions=functions, train=train, val=val,
        test=make("val", False),
        new_accumulator=lambda: DenseMetrics(self.tasks, self.num_classes, pooling),
        config=config, paper_rows=self.paper_rows)
