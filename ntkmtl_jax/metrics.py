"""How multi-task results are reported: Delta m % against single-task learning, mean rank.

Delta m % = (1/S) sum_s (-1)^{h_s} (M_m,s - M_b,s) / M_b,s * 100 over all S metrics, where
M_b is the single-task (STL) baseline and h_s = 1 when higher is better; lower is better.
MR is the mean over metrics of a method's rank among the compared methods (1 = best).

References:
  Maninis et al., "Attentive Single-Tasking of Multiple Tasks", CVPR 2019 (Delta m);
  Qin et al., NTKMTL, NeurIPS 2025 (the tables this library reports in).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def delta_m(
  values: Sequence[float], baseline: Sequence[float], higher_is_better: Sequence[bool]
) -> float:
  """Delta m % of one method's metrics against the STL baseline (lower is better)."""
  values = np.asarray(values, np.float64)
  baseline = np.asarray(baseline, np.float64)
  higher = np.asarray(higher_is_better, bool)
  if not values.shape == baseline.shape == higher.shape or values.ndim != 1:
    raise ValueError(
      f"delta_m needs three vectors of equal length, got {values.shape}, "
      f"{baseline.shape} and {higher.shape}."
    )
  if np.any(baseline == 0):
    raise ValueError("delta_m: a baseline metric is zero, so the relative change is undefined.")
  sign = np.where(higher, -1.0, 1.0)
  return float(np.mean(sign * (values - baseline) / np.abs(baseline)) * 100.0)


def mean_rank(
  table: Mapping[str, Sequence[float]], higher_is_better: Sequence[bool]
) -> dict[str, float]:
  """Mean rank of each method across the metrics (1 = best; ties share the mean rank)."""
  names = list(table)
  values = np.asarray([table[n] for n in names], np.float64)  # (methods, metrics)
  higher = np.asarray(higher_is_better, bool)
  if values.ndim != 2 or values.shape[1] != higher.shape[0]:
    raise ValueError(f"mean_rank: every method needs {higher.shape[0]} metrics.")
  oriented = np.where(higher, -values, values)
  ranks = np.zeros_like(oriented)
  for s in range(oriented.shape[1]):
    col = oriented[:, s]
    for m in range(len(names)):
      less = np.sum(col < col[m])
      ties = np.sum(col == col[m])
      ranks[m, s] = less + (ties + 1) / 2.0
  return {n: float(r) for n, r in zip(names, ranks.mean(axis=1))}


# Per-task metrics (NumPy, on a whole evaluation split).


def accuracy(logits, labels) -> float:
  """Share of rows whose arg-max class equals the integer label (higher is better)."""
  logits, labels = np.asarray(logits), np.asarray(labels)
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(
      f"accuracy needs logits (N, classes) and labels (N,), got {logits.shape} and {labels.shape}."
    )
  return float(np.mean(np.argmax(logits, axis=1) == labels))


def mean_absolute_error(predictions, targets) -> float:
  """Mean of |prediction - target| over every entry (lower is better)."""
  predictions, targets = np.asarray(predictions, np.float64), np.asarray(targets, np.float64)
  if predictions.shape != targets.shape:
    raise ValueError(f"mean_absolute_error: shapes {predictions.shape} and {targets.shape} differ.")
  return float(np.mean(np.abs(predictions - targets)))


def mean_squared_error(predictions, targets) -> float:
  """Mean of (prediction - target)^2 over every entry (lower is better)."""
  predictions, targets = np.asarray(predictions, np.float64), np.asarray(targets, np.float64)
  if predictions.shape != targets.shape:
    raise ValueError(f"mean_squared_error: shapes {predictions.shape} and {targets.shape} differ.")
  return float(np.mean((predictions - targets) ** 2))


def f1_score(predicted, targets) -> float:
  """F1 of binary predictions (booleans or 0/1) against binary targets (higher is better).

  2 TP / (2 TP + FP + FN); 0 when there is no positive in either (as scikit-learn's
  `zero_division=0`).
  """
  predicted, targets = np.asarray(predicted).astype(bool), np.asarray(targets).astype(bool)
  if predicted.shape != targets.shape:
    raise ValueError(f"f1_score: shapes {predicted.shape} and {targets.shape} differ.")
  tp = np.sum(predicted & targets)
  denominator = 2 * tp + np.sum(predicted & ~targets) + np.sum(~predicted & targets)
  return float(2 * tp / denominator) if denominator else 0.0


# Dense-prediction and per-attribute metrics of the paper's benchmarks, in the units of its
# tables, built to accumulate over evaluation batches (counts and sums, never all pixels).


def binary_counts(predicted, targets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-column true positives, false positives and false negatives of (N, k) binary arrays."""
  predicted, targets = np.asarray(predicted).astype(bool), np.asarray(targets).astype(bool)
  if predicted.shape != targets.shape or predicted.ndim != 2:
    raise ValueError(
      f"binary_counts needs two (N, k) arrays, got {predicted.shape} and {targets.shape}."
    )
  return (
    np.sum(predicted & targets, axis=0),
    np.sum(predicted & ~targets, axis=0),
    np.sum(~predicted & targets, axis=0),
  )


def f1_from_counts(true_positives, false_positives, false_negatives) -> np.ndarray:
  """F1 = 2 TP / (2 TP + FP + FN) per column; 0 where the denominator is 0 (higher is better)."""
  tp = np.asarray(true_positives, np.float64)
  denominator = 2 * tp + np.asarray(false_positives) + np.asarray(false_negatives)
  return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)


def confusion_matrix(predicted, labels, num_classes: int) -> np.ndarray:
  """(C, C) counts, rows = true class, columns = predicted; labels outside [0, C) ignored."""
  predicted = np.asarray(predicted).reshape(-1).astype(np.int64)
  labels = np.asarray(labels).reshape(-1).astype(np.int64)
  if predicted.shape != labels.shape:
    raise ValueError(f"confusion_matrix: {predicted.size} predictions for {labels.size} labels.")
  keep = (labels >= 0) & (labels < num_classes)
  index = num_classes * labels[keep] + predicted[keep]
  return np.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def segmentation_scores(confusion) -> tuple[float, float]:
  """(mIoU %, pixel accuracy %) from a confusion matrix (higher is better).

  IoU_c = TP_c / (TP_c + FP_c + FN_c), averaged over the classes that occur in the labels or
  the predictions (the MTAN code averages over all classes, the same on a full test set).
  """
  confusion = np.asarray(confusion, np.float64)
  tp = np.diag(confusion)
  union = confusion.sum(0) + confusion.sum(1) - tp
  if confusion.sum() == 0:
    raise ValueError("segmentation_scores: the confusion matrix is empty (no labelled pixel).")
  miou = np.mean(tp[union > 0] / union[union > 0])
  return float(miou * 100.0), float(tp.sum() / confusion.sum() * 100.0)


def depth_error_sums(prediction, target) -> tuple[float, float, int]:
  """Sums of |d - d*| and |d - d*| / d* over pixels with a depth (d* != 0), and their count.

  Divide by the count (after summing over batches) for the tables' abs and rel errors
  (lower is better). prediction, target: (..., 1) or (...) arrays of the same shape.
  """
  prediction = np.asarray(prediction, np.float64)
  target = np.asarray(target, np.float64)
  if prediction.shape != target.shape:
    raise ValueError(f"depth_error_sums: shapes {prediction.shape} and {target.shape} differ.")
  valid = target != 0
  error = np.abs(prediction[valid] - target[valid])
  return float(error.sum()), float((error / np.abs(target[valid])).sum()), int(valid.sum())


def normal_angle_errors(prediction, target) -> np.ndarray:
  """Angles in degrees between predicted and true unit normals (..., 3), at pixels whose
  true normal is not all zero; returns a 1-D array."""
  prediction = np.asarray(prediction, np.float64)
  target = np.asarray(target, np.float64)
  if prediction.shape != target.shape or prediction.shape[-1] != 3:
    raise ValueError(
      f"normal_angle_errors needs two (..., 3) arrays, got {prediction.shape} and {target.shape}."
    )
  valid = np.sum(target, axis=-1) != 0
  cosine = np.clip(np.sum(prediction * target, axis=-1)[valid], -1.0, 1.0)
  return np.degrees(np.arccos(cosine))


NORMAL_THRESHOLDS = (11.25, 22.5, 30.0)


def angle_histogram(angles, bin_width: float = 0.01) -> np.ndarray:
  """Counts of angles (degrees) in bins of `bin_width` over [0, 180]: accumulate over batches,
  then `surface_normal_scores_from_histogram`."""
  bins = int(round(180.0 / bin_width))
  index = np.clip(
    np.floor(np.asarray(angles, np.float64) / bin_width).astype(np.int64), 0, bins - 1
  )
  return np.bincount(index, minlength=bins)


def surface_normal_scores(angles) -> tuple[float, ...]:
  """(mean, median, % < 11.25, % < 22.5, % < 30) of angle errors in degrees.

  The first two are lower-is-better, the last three higher-is-better.
  """
  angles = np.asarray(angles, np.float64).reshape(-1)
  if angles.size == 0:
    raise ValueError("surface_normal_scores: no valid pixel.")
  return (
    float(angles.mean()),
    float(np.median(angles)),
    *(float(np.mean(angles < t) * 100.0) for t in NORMAL_THRESHOLDS),
  )


def surface_normal_scores_from_histogram(
  histogram, angle_sum: float, bin_width: float = 0.01
) -> tuple[float, ...]:
  """`surface_normal_scores` from an `angle_histogram` and the exact sum of the angles.

  The mean is exact; the median is exact to `bin_width` (the midpoint of its bin); the
  thresholds are exact when they are multiples of `bin_width`.
  """
  histogram = np.asarray(histogram, np.float64)
  total = histogram.sum()
  if total == 0:
    raise ValueError("surface_normal_scores_from_histogram: no valid pixel.")
  cumulative = np.cumsum(histogram)
  median_bin = int(np.searchsorted(cumulative, total / 2.0))
  within = [cumulative[int(round(t / bin_width)) - 1] / total * 100.0 for t in NORMAL_THRESHOLDS]
  return (
    float(angle_sum / total),
    float((median_bin + 0.5) * bin_width),
    *(float(w) for w in within),
  )
