"""Reports of multi-task runs: a summary table, results.json / results.csv, PNG plots.

The summary follows the paper's tables: one row per method with each metric's mean over
seeds, the mean rank (MR) among the multi-task methods and Delta m % against single-task
learning (STL), both from `ntkmtl_jax.metrics`. The STL row is assembled from k runs per
seed, run i trained on task i alone; each metric comes from the run trained on its task.

Delta m % of a method is computed per seed against the STL baseline: the paper's STL row
where the benchmark has one (`stl_row`), otherwise the STL runs averaged over seeds; it is
reported as mean +- std (sample standard deviation, ddof=1) over seeds. MR ranks the
methods' seed-mean metrics.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence

import numpy as np

from ntkmtl_jax import metrics as metrics_lib
from ntkmtl_jax._optional import require
from ntkmtl_jax.io import replaced_file, write_json
from ntkmtl_jax.results import RunResult

STL = "stl"


def run_label(run: RunResult) -> str:
  """The row a run belongs to: its method name (all STL runs share the "stl" row)."""
  return run.method


def _std(values) -> float:
  values = np.asarray(values, np.float64)
  return float(np.std(values, ddof=1)) if values.size > 1 else 0.0


def stl_metrics_by_seed(
  runs: Sequence[RunResult], metric_names: Sequence[str], metric_tasks: Sequence[int]
) -> dict[int, dict]:
  """Per seed, the STL metrics (each from the run trained on its task) and total wall time.

  Seeds where some task's STL run is missing (or was interrupted) are left out.
  """
  by_seed: dict[int, dict[int, RunResult]] = {}
  for run in runs:
    if run.method == STL and not run.interrupted:
      by_seed.setdefault(run.seed, {})[int(run.hparams.get("task", 0))] = run
  out = {}
  for seed, per_task in sorted(by_seed.items()):
    if not all(t in per_task for t in metric_tasks):
      continue
    out[seed] = dict(
      metrics=[per_task[t].metrics[m] for m, t in zip(metric_names, metric_tasks)],
      wall_time=sum(r.wall_time for r in per_task.values()),
    )
  return out


def summarize(
  runs: Sequence[RunResult],
  metric_names: Sequence[str],
  higher_is_better: Sequence[bool],
  metric_tasks: Sequence[int],
  stl_row: Sequence[float] | None = None,
) -> dict:
  """The table: {method: row} in order of first appearance, STL first.

  Each row has `metrics_mean`, `metrics_std` (per metric), `delta_m_mean`, `delta_m_std`,
  `delta_m_per_seed` (None without a baseline), `mean_rank` (None for STL),
  `wall_time_mean`, `wall_time_std` and `seeds` (the seeds it averages). Interrupted runs
  are left out.

  Args:
    runs: the `RunResult`s (STL runs carry their task in `hparams["task"]`).
    metric_names: the benchmark's metrics.
    higher_is_better: per metric, whether larger is better.
    metric_tasks: per metric, the task it scores (the STL run it is read from).
    stl_row: the published STL metrics, the baseline of Delta m % (None: the STL runs'
      seed mean, and the STL row's own Delta m is 0 by definition). Without STL runs the
      STL row shows this one.

  Returns:
    The rows.
  """
  metric_names = list(metric_names)
  rows: dict[str, dict] = {}
  stl = stl_metrics_by_seed(runs, metric_names, metric_tasks)
  per_method: dict[str, dict[int, RunResult]] = {}
  for run in runs:
    if run.method != STL and not run.interrupted:
      per_method.setdefault(run_label(run), {})[run.seed] = run
  if stl_row is not None:
    baseline = np.asarray(stl_row, np.float64)
  else:
    baseline = np.mean([v["metrics"] for v in stl.values()], axis=0) if stl else None
  if stl:
    values = np.asarray([v["metrics"] for v in stl.values()])
    deltas = [metrics_lib.delta_m(v, baseline, higher_is_better) for v in values]
    rows[STL] = _row(values, deltas, [v["wall_time"] for v in stl.values()], list(stl))
  elif stl_row is not None:
    rows[STL] = _row(np.asarray([stl_row]), [0.0], [], [])
  for label, by_seed in per_method.items():
    seeds = sorted(by_seed)
    values = np.asarray([[by_seed[s].metrics[m] for m in metric_names] for s in seeds])
    deltas = (
      [metrics_lib.delta_m(v, baseline, higher_is_better) for v in values]
      if baseline is not None
      else None
    )
    rows[label] = _row(values, deltas, [by_seed[s].wall_time for s in seeds], seeds)
  multi = {k: r["metrics_mean"] for k, r in rows.items() if k != STL}
  ranks = metrics_lib.mean_rank(multi, higher_is_better) if multi else {}
  for k, r in rows.items():
    r["mean_rank"] = ranks.get(k)
  if STL in rows and stl_row is None:
    rows[STL]["delta_m_mean"], rows[STL]["delta_m_std"] = 0.0, 0.0
  return rows


def _row(values, deltas, walls, seeds) -> dict:
  values = np.asarray(values, np.float64)
  return dict(
    metrics_mean=values.mean(axis=0).tolist(),
    metrics_std=[_std(values[:, j]) for j in range(values.shape[1])],
    delta_m_mean=None if deltas is None else float(np.mean(deltas)),
    delta_m_std=None if deltas is None else _std(deltas),
    delta_m_per_seed=None if deltas is None else [float(d) for d in deltas],
    wall_time_mean=float(np.mean(walls)) if len(walls) else float("nan"),
    wall_time_std=_std(walls),
    seeds=[int(s) for s in seeds],
  )


def _number(value: float, width: int = 0) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  magnitude = abs(value)
  if magnitude != 0 and (magnitude < 1e-3 or magnitude >= 1e5):
    return f"{value:.3e}"
  return f"{value:.4f}" if magnitude < 10 else f"{value:.2f}"


def format_table(
  summary: dict,
  metric_names: Sequence[str],
  higher_is_better: Sequence[bool],
  *,
  title: str | None = None,
) -> str:
  """A plain-text table laid out like the paper's: metrics (arrow = better), MR, Delta m %.

  Metrics are seed means; Delta m % is mean +- std over seeds; time is the mean wall time
  of one seed's run in seconds (STL: its k runs together).
  """
  headers = (
    ["Method"]
    + [f"{m} {'↑' if h else '↓'}" for m, h in zip(metric_names, higher_is_better)]
    + ["MR ↓", "Δm% ↓", "time s"]
  )
  body = []
  for name, row in summary.items():
    is_stl = name == STL
    dm = (
      "-"
      if is_stl or row["delta_m_mean"] is None
      else f"{row['delta_m_mean']:.2f} ± {row['delta_m_std']:.2f}"
    )
    body.append(
      [name.upper() if is_stl else name]
      + [_number(v) for v in row["metrics_mean"]]
      + [
        "-" if row["mean_rank"] is None else f"{row['mean_rank']:.2f}",
        dm,
        f"{row['wall_time_mean']:.1f}",
      ]
    )
  widths = [max(len(str(r[j])) for r in [headers] + body) for j in range(len(headers))]
  line = lambda cells: "  ".join(
    str(c).ljust(w) if j == 0 else str(c).rjust(w) for j, (c, w) in enumerate(zip(cells, widths))
  )
  rule = "-" * len(line(headers))
  out = ([title] if title else []) + [rule, line(headers), rule]
  for name, cells in zip(summary, body):
    out.append(line(cells))
    if name == STL:
      out.append(rule)
  out.append(rule)
  return "\n".join(out)


def write_results(
  path: str,
  *,
  config: dict,
  benchmark: dict,
  runs: Sequence[RunResult],
  summary: dict,
  interrupted: bool = False,
) -> None:
  """results.json: the configuration, benchmark description, summary and every run (written
  whole or not at all: `io.write_json`)."""
  write_json(
    path,
    dict(
      config=config,
      benchmark=benchmark,
      interrupted=interrupted,
      summary=summary,
      runs=[r.to_dict() for r in runs],
    ),
  )


def write_csv(path: str, summary: dict, metric_names: Sequence[str]) -> None:
  """results.csv: one row per method; per metric mean and std, MR, Delta m %, wall time."""
  header = (
    ["method", "seeds"]
    + [c for m in metric_names for c in (f"{m} mean", f"{m} std")]
    + ["mean_rank", "delta_m_mean", "delta_m_std", "wall_time_mean", "wall_time_std"]
  )
  with replaced_file(path, newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    for name, row in summary.items():
      writer.writerow(
        [name, len(row["seeds"])]
        + [v for pair in zip(row["metrics_mean"], row["metrics_std"]) for v in pair]
        + [
          row["mean_rank"],
          row["delta_m_mean"],
          row["delta_m_std"],
          row["wall_time_mean"],
          row["wall_time_std"],
        ]
      )


# Plots.


def _pyplot():
  matplotlib = require("matplotlib", "plots", "the PNG plots")
  matplotlib.use("Agg")  # Files only: works without a display.
  return require("matplotlib.pyplot", "plots")


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
  if window <= 1 or len(values) < window:
    return values
  kernel = np.ones(window) / window
  padded = np.concatenate([np.full(window - 1, values[0]), values])
  return np.convolve(padded, kernel, mode="valid")


def _seed_mean(arrays: list[np.ndarray]) -> np.ndarray | None:
  arrays = [a for a in arrays if len(a)]
  if not arrays:
    return None
  length = min(len(a) for a in arrays)
  return np.mean([a[:length] for a in arrays], axis=0)


def _runs_by_label(runs):
  out: dict[str, list[RunResult]] = {}
  for run in runs:
    out.setdefault(run_label(run), []).append(run)
  return out


def plot_training_curves(path: str, runs: Sequence[RunResult], task_names: Sequence[str]):
  """One panel per task: its training loss over steps for every method (seed mean).

  The STL curve of task i comes from the run trained on task i alone.
  """
  plt = _pyplot()
  k = len(task_names)
  fig, axes = plt.subplots(1, k, figsize=(4.2 * k, 3.6), squeeze=False)
  for label, group in _runs_by_label(runs).items():
    for i in range(k):
      members = [r for r in group if label != STL or int(r.hparams.get("task", 0)) == i]
      curve = _seed_mean([r.history.losses[:, i] for r in members if r.history.losses.size])
      if curve is None:
        continue
      window = max(1, len(curve) // 40)
      axes[0, i].plot(
        np.arange(1, len(curve) + 1),
        _smooth(curve, window),
        label=label,
        linestyle="--" if label == STL else "-",
        linewidth=1.3,
      )
  for i, name in enumerate(task_names):
    ax = axes[0, i]
    ax.set_title(f"task {name}: training loss")
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
  if axes[0, -1].get_legend_handles_labels()[0]:
    axes[0, -1].legend(fontsize=7, ncol=2)
  fig.tight_layout()
  with replaced_file(path, "wb") as f:
    fig.savefig(f, format="png", dpi=110)
  plt.close(fig)


def plot_task_weights(path: str, runs: Sequence[RunResult], task_names: Sequence[str]):
  """One panel per multi-task method: each task's weight over training (seed mean)."""
  plt = _pyplot()
  groups = {k: v for k, v in _runs_by_label(runs).items() if k != STL}
  if not groups:
    groups = _runs_by_label(runs)
  cols = min(4, len(groups))
  rows = math.ceil(len(groups) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
  for ax in axes.flat[len(groups) :]:
    ax.set_visible(False)
  for ax, (label, group) in zip(axes.flat, groups.items()):
    weights = _seed_mean([r.history.weights for r in group if r.history.weights.size])
    if weights is None:
      continue
    window = max(1, len(weights) // 40)
    for i, name in enumerate(task_names):
      ax.plot(np.arange(1, len(weights) + 1), _smooth(weights[:, i], window), label=name)
    if np.all(weights > 0):
      ax.set_yscale("log")
    ax.set_title(f"{label}: task weights w_i")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  if axes.flat[0].get_legend_handles_labels()[0]:
    axes.flat[0].legend(fontsize=8)
  fig.tight_layout()
  with replaced_file(path, "wb") as f:
    fig.savefig(f, format="png", dpi=110)
  plt.close(fig)


def plot_eigenvalues(
  path: str,
  runs: Sequence[RunResult],
  task_names: Sequence[str],
  methods: Sequence[str] = ("ls", "ntkmtl"),
):
  """lambda_i over training for the given methods (LS vs NTKMTL by default).

  Top row: lambda_i, the largest eigenvalue of task i's NTK block over the shared
  parameters (||g_i||^2 for n = 1). Bottom row: w_i^2 lambda_i, the eigenvalue of the
  kernel the weighted update actually follows: equal across tasks for NTKMTL (the
  imbalance it closes), lambda_i itself for LS. Returns False when no run has eigenvalues.
  """
  plt = _pyplot()
  groups = _runs_by_label(runs)
  chosen = [
    m for m in methods if m in groups and any(r.history.eigenvalues.size for r in groups[m])
  ]
  if not chosen:
    chosen = [m for m, g in groups.items() if any(r.history.eigenvalues.size for r in g)][:2]
  if not chosen:
    return False
  fig, axes = plt.subplots(
    2, len(chosen), figsize=(5 * len(chosen), 6.4), squeeze=False, sharey="row"
  )
  for col, label in enumerate(chosen):
    members = [r for r in groups[label] if r.history.eigenvalues.size]
    length = min(len(r.history.eigen_steps) for r in members)
    steps = members[0].history.eigen_steps[:length]
    lam = np.mean([r.history.eigenvalues[:length] for r in members], axis=0)
    index = np.clip(steps.astype(int) - 1, 0, None)
    weights = np.mean(
      [r.history.weights[np.minimum(index, len(r.history.weights) - 1)] for r in members], axis=0
    )
    window = max(1, length // 40)
    for i, name in enumerate(task_names):
      # Distinct dashes keep equal curves (NTKMTL's bottom row) visible on top of each other.
      style = dict(label=name, linestyle=("-", "--", ":", "-.")[i % 4], linewidth=1.4)
      axes[0, col].plot(steps, _smooth(lam[:, i], window), **style)
      axes[1, col].plot(steps, _smooth(weights[:, i] ** 2 * lam[:, i], window), **style)
    axes[0, col].set_title(f"{label}: λ_i (largest eigenvalue of K_ii)")
    axes[1, col].set_title(f"{label}: w_i² λ_i (what the update follows)")
    for row in range(2):
      axes[row, col].set_yscale("log")
      axes[row, col].set_xlabel("step")
      axes[row, col].grid(alpha=0.3)
  axes[0, 0].legend(fontsize=8)
  fig.tight_layout()
  with replaced_file(path, "wb") as f:
    fig.savefig(f, format="png", dpi=110)
  plt.close(fig)
  return True


def write_reports(
  out_dir: str,
  *,
  runs: Sequence[RunResult],
  config: dict,
  benchmark,
  plots: bool = True,
  interrupted: bool = False,
) -> tuple[dict, list[str]]:
  """Writes results.json, results.csv and (when `plots`) the PNGs; returns (summary, paths).

  `benchmark` is a `benchmarks.Benchmark` (only its names, metrics and directions are read).
  """
  summary = summarize(
    runs,
    benchmark.metric_names,
    benchmark.higher_is_better,
    benchmark.metric_tasks,
    benchmark.stl_row,
  )
  meta = dict(
    name=benchmark.name,
    description=benchmark.description,
    task_names=list(benchmark.task_names),
    metric_names=list(benchmark.metric_names),
    higher_is_better=list(benchmark.higher_is_better),
    metric_tasks=list(benchmark.metric_tasks),
    stl_row=None if benchmark.stl_row is None else list(benchmark.stl_row),
  )
  paths = [os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.csv")]
  write_results(
    paths[0], config=config, benchmark=meta, runs=runs, summary=summary, interrupted=interrupted
  )
  write_csv(paths[1], summary, benchmark.metric_names)
  if plots and runs:
    names = list(benchmark.task_names)
    curves = os.path.join(out_dir, "training_curves.png")
    plot_training_curves(curves, runs, names)
    weights = os.path.join(out_dir, "task_weights.png")
    plot_task_weights(weights, runs, names)
    paths += [curves, weights]
    eigen = os.path.join(out_dir, "eigenvalues.png")
    if plot_eigenvalues(eigen, runs, names):
      paths.append(eigen)
  return summary, paths
