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
import textwrap
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


def _mean_pm_std(mean: float, std: float, seeds: int) -> str:
  """ "mean ± std" over two or more seeds; the value alone for one (no spread to show)."""
  return f"{mean:.2f} ± {std:.2f}" if seeds >= 2 else f"{mean:.2f}"


def format_table(
  summary: dict,
  metric_names: Sequence[str],
  higher_is_better: Sequence[bool],
  *,
  title: str | None = None,
) -> str:
  """A plain-text table laid out like the paper's: metrics (arrow = better), MR, Delta m %.

  Metrics are seed means; time is the mean wall time of one seed's run in seconds (STL: its
  k runs together). Delta m % is a column only when some row has one (there are STL runs or a
  published STL row to score against); it is mean ± std over seeds, the value alone for a
  method with one seed.

  Args:
    summary: the rows of `summarize`.
    metric_names: the benchmark's metrics.
    higher_is_better: per metric, whether larger is better.
    title: a line above the table.
  """
  with_delta = any(r["delta_m_mean"] is not None for k, r in summary.items() if k != STL)
  headers = (
    ["Method"]
    + [f"{m} {'↑' if h else '↓'}" for m, h in zip(metric_names, higher_is_better)]
    + ["MR ↓"]
    + (["Δm% ↓"] if with_delta else [])
    + ["time s"]
  )
  body = []
  for name, row in summary.items():
    is_stl = name == STL
    dm = (
      "-"
      if is_stl or row["delta_m_mean"] is None
      else _mean_pm_std(row["delta_m_mean"], row["delta_m_std"], len(row["seeds"]))
    )
    body.append(
      [name.upper() if is_stl else name]
      + [_number(v) for v in row["metrics_mean"]]
      + ["-" if row["mean_rank"] is None else f"{row['mean_rank']:.2f}"]
      + ([dm] if with_delta else [])
      + [f"{row['wall_time_mean']:.1f}"]
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


def delta_m_baseline(summary: dict, stl_row: Sequence[float] | None) -> str | None:
  """What the table's Delta m % is scored against, in words: "the paper's STL row", "the STL
  runs", or None when there is neither (and the table has no Delta m % column)."""
  if stl_row is not None:
    return "the paper's STL row"
  return "the STL runs" if STL in summary else None


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


def _seed_stack(arrays: list[np.ndarray]) -> np.ndarray | None:
  """(seeds, T, ...) of the seeds' arrays cut to the shortest, or None without any."""
  arrays = [np.asarray(a, np.float64) for a in arrays if len(a)]
  if not arrays:
    return None
  length = min(len(a) for a in arrays)
  return np.stack([a[:length] for a in arrays])


def _runs_by_label(runs):
  out: dict[str, list[RunResult]] = {}
  for run in runs:
    out.setdefault(run_label(run), []).append(run)
  return out


def _seed_count(runs: Sequence[RunResult]) -> int:
  return len({r.seed for r in runs})


def _band_note(seeds: int) -> str:
  """The figure's word on what the lines are: a mean with its min-max band, or one seed."""
  if seeds < 2:
    return "1 seed"
  return f"mean over {seeds} seeds, band: min to max over seeds"


def _line_with_band(ax, x, stack: np.ndarray, window: int, **style):
  """The seed mean of `stack` (seeds, T) and, with two or more seeds, its min-max band."""
  (line,) = ax.plot(x, _smooth(stack.mean(axis=0), window), **style)
  if len(stack) > 1:
    lo = _smooth(stack.min(axis=0), window)
    hi = _smooth(stack.max(axis=0), window)
    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.18, linewidth=0)
  return line


def _suptitle(fig, title: str, notes: Sequence[str]):
  """The figure's title, and under it what the lines are, wrapped to the figure's width."""
  width = max(40, int(fig.get_figwidth() * 12))
  lines = textwrap.wrap("; ".join(notes), width) if notes else []
  fig.suptitle("\n".join([title, *lines]), fontsize=10)
  return len(lines)


def _shared_legend(fig, handles, labels, ncol: int):
  """One legend for the whole figure, below the panels."""
  fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)


def _save(fig, plt, path: str, legend_rows: int):
  bottom = 0.3 * (legend_rows + 0.5) / fig.get_figheight()  # room for the legend, in inches
  fig.tight_layout(rect=(0, bottom, 1, 1))
  with replaced_file(path, "wb") as f:
    fig.savefig(f, format="png", dpi=110)
  plt.close(fig)


def plot_training_curves(path: str, runs: Sequence[RunResult], task_names: Sequence[str]):
  """One panel per task: its training loss over steps for every method, one legend.

  Lines are seed means with a min-max band over seeds (the seed count is in the title); the
  STL curve of task i comes from the runs trained on task i alone.
  """
  plt = _pyplot()
  k = len(task_names)
  fig, axes = plt.subplots(1, k, figsize=(4.2 * k, 3.9), squeeze=False)
  legend: dict[str, object] = {}
  for label, group in _runs_by_label(runs).items():
    for i in range(k):
      members = [r for r in group if label != STL or int(r.hparams.get("task", 0)) == i]
      stack = _seed_stack([r.history.losses[:, i] for r in members if r.history.losses.size])
      if stack is None:
        continue
      length = stack.shape[1]
      legend[label] = _line_with_band(
        axes[0, i],
        np.arange(1, length + 1),
        stack,
        max(1, length // 40),
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
  _suptitle(fig, "Training loss per task", [_band_note(_seed_count(runs))])
  ncol = min(len(legend), 8) or 1
  if legend:
    _shared_legend(fig, list(legend.values()), list(legend), ncol)
  _save(fig, plt, path, math.ceil(len(legend) / ncol))


def _constant_weights(weights: np.ndarray) -> bool:
  return bool(np.all(np.isclose(weights, weights[:1], rtol=1e-6, atol=0)))


def plot_task_weights(path: str, runs: Sequence[RunResult], task_names: Sequence[str]):
  """One panel per multi-task method whose weights move: each task's weight over training.

  Methods with constant weights (LS) get no panel: the figure names them and their weights
  instead. Seed means with a min-max band; one legend (the tasks).
  """
  plt = _pyplot()
  groups = {k: v for k, v in _runs_by_label(runs).items() if k != STL}
  stacks = {}
  for label, group in groups.items():
    stack = _seed_stack([r.history.weights for r in group if r.history.weights.size])
    if stack is not None:
      stacks[label] = stack
  constant = {m: w for m, w in stacks.items() if _constant_weights(w)}
  moving = {m: w for m, w in stacks.items() if m not in constant}
  cols = max(1, min(4, len(moving)))
  rows = max(1, math.ceil(len(moving) / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows + 0.6), squeeze=False)
  for ax in axes.flat[len(moving) :]:
    ax.set_visible(False)
  handles = {}
  for ax, (label, stack) in zip(axes.flat, moving.items()):
    length = stack.shape[1]
    for i, name in enumerate(task_names):
      handles[name] = _line_with_band(
        ax, np.arange(1, length + 1), stack[:, :, i], max(1, length // 40), label=name
      )
    if np.all(stack > 0):
      ax.set_yscale("log")
    ax.set_title(f"{label}: task weights w_i")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  if not moving:
    axes[0, 0].set_visible(True)
    axes[0, 0].axis("off")
  notes = [_band_note(_seed_count(runs))]
  if constant:
    notes.append(
      "constant weights, not drawn: "
      + "; ".join(
        f"{m} ({', '.join(f'{float(v):g}' for v in w[0, 0])})" for m, w in constant.items()
      )
    )
  _suptitle(fig, "Task weights over training", notes)
  if handles:
    _shared_legend(fig, list(handles.values()), list(handles), len(handles))
  _save(fig, plt, path, 1)


def _common_grid(members_by_label: dict[str, list[RunResult]]) -> np.ndarray:
  """The eigenvalue steps every method has: the sparsest method's steps (a probe every
  `probe_every` steps) where another method has them at every step."""
  grids = [
    np.asarray(members[0].history.eigen_steps[: min(len(r.history.eigen_steps) for r in members)])
    for members in members_by_label.values()
  ]
  grid = min(grids, key=len)
  for other in grids:
    grid = grid[np.isin(grid, other)]
  return grid


def plot_eigenvalues(
  path: str,
  runs: Sequence[RunResult],
  task_names: Sequence[str],
  methods: Sequence[str] | None = None,
):
  """lambda_i over training for every method that recorded eigenvalues (or `methods`).

  Top panel of each method: lambda_i, the largest eigenvalue of task i's NTK block over the
  shared parameters (||g_i||^2 for n = 1; NTKMTL records it in its step, the others by a
  probe every `probe_every` steps). Bottom panel: w_i^2 lambda_i, the eigenvalue of the kernel
  the weighted update actually follows: equal across tasks for NTKMTL (the imbalance it
  closes). A method whose weights are all 1 (LS) has no bottom panel: it would repeat the top
  one. Every method is drawn at the same steps (those of the sparsest record); seed means with
  a min-max band. Methods without eigenvalues are named in the figure. Returns False when no
  run has eigenvalues.
  """
  plt = _pyplot()
  groups = {k: v for k, v in _runs_by_label(runs).items() if k != STL}
  wanted = list(groups) if methods is None else [m for m in methods if m in groups]
  members = {
    m: [r for r in groups[m] if r.history.eigenvalues.size]
    for m in wanted
    if any(r.history.eigenvalues.size for r in groups[m])
  }
  if not members:
    return False
  missing = [m for m in wanted if m not in members]
  grid = _common_grid(members)
  if not len(grid):
    return False
  panels = []
  for label, group in members.items():
    index = [
      np.minimum(np.searchsorted(r.history.eigen_steps, grid), len(r.history.eigen_steps) - 1)
      for r in group
    ]
    lam = np.stack([r.history.eigenvalues[i] for r, i in zip(group, index)])  # (seeds, E, k)
    step_index = np.clip(grid.astype(int) - 1, 0, None)
    weights = np.stack(
      [r.history.weights[np.minimum(step_index, len(r.history.weights) - 1)] for r in group]
    )
    unit = bool(np.all(weights == 1.0))
    # A task weighted 0 (MGDA may drop one) has w_i^2 lambda_i = 0: a gap on the log axis.
    weighted = weights**2 * lam
    panels.append((label, lam, None if unit else np.where(weighted > 0, weighted, np.nan)))
  cols = min(4, len(panels))
  blocks = math.ceil(len(panels) / cols)
  fig, axes = plt.subplots(
    2 * blocks, cols, figsize=(4.3 * cols, 5.6 * blocks + 0.8), squeeze=False, sharex=True
  )
  handles = {}
  for n, (label, lam, weighted) in enumerate(panels):
    top, bottom = axes[2 * (n // cols), n % cols], axes[2 * (n // cols) + 1, n % cols]
    for i, name in enumerate(task_names):
      # Distinct dashes keep equal curves (NTKMTL's bottom row) visible on top of each other.
      style = dict(label=name, linestyle=("-", "--", ":", "-.")[i % 4], linewidth=1.4)
      handles[name] = _line_with_band(top, grid, lam[:, :, i], 1, **style)
      if weighted is not None:
        _line_with_band(bottom, grid, weighted[:, :, i], 1, **style)
    top.set_title(f"{label}: λ_i (largest eigenvalue of K_ii)", fontsize=9)
    if weighted is None:
      bottom.set_visible(False)
      top.set_title(f"{label}: λ_i = w_i² λ_i (w_i = 1)", fontsize=9)
    else:
      zeros = " (gaps: w_i = 0)" if np.isnan(weighted).any() else ""
      bottom.set_title(f"{label}: w_i² λ_i (what the update follows){zeros}", fontsize=9)
    for ax in (top, bottom):
      ax.set_yscale("log")
      ax.set_xlabel("step")
      ax.tick_params(labelbottom=True)
      ax.grid(alpha=0.3)
  for n in range(len(panels), blocks * cols):
    axes[2 * (n // cols), n % cols].set_visible(False)
    axes[2 * (n // cols) + 1, n % cols].set_visible(False)
  every = int(np.median(np.diff(grid))) if len(grid) > 2 else 1
  notes = [_band_note(_seed_count([r for g in members.values() for r in g]))]
  notes.append(f"every method at the same steps, every {every}")
  if missing:
    notes.append(f"no eigenvalues recorded: {', '.join(missing)}")
  _suptitle(fig, "Largest eigenvalue λ_i of each task's NTK block", notes)
  _shared_legend(fig, list(handles.values()), list(handles), len(handles))
  _save(fig, plt, path, 1)
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
