"""How multi-task results are reported: Delta m % against single-task learning, mean rank.

Delta m % = (1/S) sum_s (-1)^{h_s} (M_m,s - M_b,s) / M_b,s * 100 over all S metrics, where
M_b is the single-task (STL) baseline and h_s = 1 when higher is better; lower is better.
MR is the mean over metrics of a method's rank among the compared methods (1 = best).

References:
  Maninis et al., "Attentive Single-Tasking of Multiple Tasks", CVPR 2019 (Delta m);
  Qin et al., NTKMTL, NeurIPS 2025 (the tables this library reports in).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def delta_m(values: Sequence[float], baseline: Sequence[float],
            higher_is_better: Sequence[bool]) -> float:
  """Delta m % of one method's metrics against the STL baseline (lower is better)."""
  values = np.asarray(values, np.float64)
  baseline = np.asarray(baseline, np.float64)
  higher = np.asarray(higher_is_better, bool)
  if not values.shape == baseline.shape == higher.shape or values.ndim != 1:
    raise ValueError(f"delta_m needs three vectors of equal length, got {values.shape}, "
                     f"{baseline.shape} and {higher.shape}.")
  if np.any(baseline == 0):
    raise ValueError("delta_m: a baseline metric is zero, so the relative change is undefined.")
  sign = np.where(higher, -1.0, 1.0)
  return float(np.mean(sign * (values - baseline) / np.abs(baseline)) * 100.0)


def mean_rank(table: Mapping[str, Sequence[float]],
              higher_is_better: Sequence[bool]) -> dict[str, float]:
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
    raise ValueError(f"accuracy needs logits (N, classes) and labels (N,), got {logits.shape} "
                     f"and {labels.shape}.")
  return float(np.mean(np.argmax(logits, axis=1) == labels))


def mean_absolute_error(predictions, targets) -> float:
  """Mean of |prediction - target| over every entry (lower is better)."""
  predictions, targets = np.asarray(predictions, np.float64), np.asarray(targets, np.float64)
  if predictions.shape != targets.shape:
    raise ValueError(f"mean_absolute_error: shapes {predictions.shape} and {targets.shape} "
                     "differ.")
  return float(np.mean(np.abs(predictions - targets)))


def mean_squared_error(predictions, targets) -> float:
  """Mean of (prediction - target)^2 over every entry (lower is better)."""
  predictions, targets = np.asarray(predictions, np.float64), np.asarray(targets, np.float64)
  if predictions.shape != targets.shape:
    raise ValueError(f"mean_squared_error: shapes {predictions.shape} and {targets.shape} "
                     "differ.")
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
