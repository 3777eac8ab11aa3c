"""Report numbers (Delta m %, MR, mean +- std, CSV/JSON) against independent computations."""

import csv
import json
import types

import numpy as np
import pytest
from scipy import stats

from ntkmtl_jax import metrics, report
from ntkmtl_jax.results import History, RunResult

TASKS = ("a", "b", "c")
METRICS = ("a acc", "b acc", "c MAE")
HIGHER = (True, True, False)
BENCH = types.SimpleNamespace(
  name="toy",
  description="toy benchmark",
  task_names=TASKS,
  metric_names=METRICS,
  higher_is_better=HIGHER,
  metric_tasks=(0, 1, 2),
  stl_row=None,
)


def _history(rng, steps, with_eigen):
  k = len(TASKS)
  return History(
    steps=np.arange(1, steps + 1, dtype=float),
    losses=rng.uniform(0.1, 2.0, (steps, k)),
    weights=rng.uniform(0.5, 2.0, (steps, k)),
    grad_norm=rng.uniform(size=steps),
    eigen_steps=np.arange(1, steps + 1, 5, dtype=float) if with_eigen else np.zeros(0),
    eigenvalues=(
      rng.uniform(0.1, 1e3, (len(range(1, steps + 1, 5)), k)) if with_eigen else np.zeros((0, k))
    ),
    eigen_source="probe" if with_eigen else "",
  )


def _runs(rng, seeds=3, methods=("ls", "ntkmtl", "famo"), steps=30):
  runs = []
  for seed in range(seeds):
    for task in range(len(TASKS)):
      values = dict(zip(METRICS, rng.uniform(0.5, 1.0, 3)))
      runs.append(
        RunResult(
          "stl",
          seed,
          {"task": task},
          values,
          float(rng.uniform(1, 2)),
          steps,
          0,
          False,
          _history(rng, steps, True),
        )
      )
    for m in methods:
      values = dict(zip(METRICS, rng.uniform(0.5, 1.0, 3)))
      runs.append(
        RunResult(
          m,
          seed,
          {},
          values,
          float(rng.uniform(1, 2)),
          steps,
          0,
          False,
          _history(rng, steps, m in ("ls", "ntkmtl")),
        )
      )
  return runs


def test_summary_matches_independent_computation(seed):
  rng = np.random.default_rng(seed)
  runs = _runs(rng)
  summary = report.summarize(runs, METRICS, HIGHER, (0, 1, 2))
  assert list(summary) == ["stl", "ls", "ntkmtl", "famo"]
  # STL: metric j of seed s comes from the STL run of seed s trained on task j.
  stl = np.array(
    [
      [
        next(
          r.metrics[METRICS[j]]
          for r in runs
          if r.method == "stl" and r.seed == s and r.hparams["task"] == j
        )
        for j in range(3)
      ]
      for s in range(3)
    ]
  )
  baseline = stl.mean(axis=0)
  np.testing.assert_allclose(summary["stl"]["metrics_mean"], baseline, rtol=1e-12)
  stl_time = [sum(r.wall_time for r in runs if r.method == "stl" and r.seed == s) for s in range(3)]
  assert summary["stl"]["wall_time_mean"] == pytest.approx(np.mean(stl_time)), f"seed {seed}"
  sign = np.array([-1.0, -1.0, 1.0])
  means = {}
  for m in ("ls", "ntkmtl", "famo"):
    values = np.array(
      [[r.metrics[k] for k in METRICS] for r in runs if r.method == m]
    )  # seeds in order
    deltas = [100 * np.mean(sign * (v - baseline) / baseline) for v in values]
    row = summary[m]
    assert row["delta_m_mean"] == pytest.approx(np.mean(deltas), rel=1e-10), f"seed {seed}"
    assert row["delta_m_std"] == pytest.approx(np.std(deltas, ddof=1), rel=1e-10)
    np.testing.assert_allclose(row["metrics_mean"], values.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(row["metrics_std"], values.std(axis=0, ddof=1), rtol=1e-10)
    means[m] = values.mean(axis=0)
  names = list(means)
  oriented = np.array([means[n] for n in names]) * sign  # smaller is better everywhere
  ranks = np.mean([stats.rankdata(oriented[:, j]) for j in range(3)], axis=0)
  for n, r in zip(names, ranks):
    assert summary[n]["mean_rank"] == pytest.approx(r), f"seed {seed}"
  assert summary["stl"]["mean_rank"] is None


def test_interrupted_and_incomplete_runs_are_left_out(seed):
  rng = np.random.default_rng(seed)
  runs = _runs(rng, seeds=2, methods=("ls",))
  runs[-1].interrupted = True  # ls, seed 1
  summary = report.summarize(runs, METRICS, HIGHER, (0, 1, 2))
  assert summary["ls"]["seeds"] == [0]
  no_stl = report.summarize([r for r in runs if r.method != "stl"], METRICS, HIGHER, (0, 1, 2))
  assert "stl" not in no_stl and no_stl["ls"]["delta_m_mean"] is None


def test_a_published_stl_row_is_the_baseline(seed):
  rng = np.random.default_rng(seed)
  runs = _runs(rng, seeds=2, methods=("ls",))
  published = rng.uniform(0.5, 2.0, 3)
  summary = report.summarize(runs, METRICS, HIGHER, (0, 1, 2), stl_row=published)
  ls = [r for r in runs if r.method == "ls"]
  want = [metrics.delta_m([r.metrics[m] for m in METRICS], published, HIGHER) for r in ls]
  np.testing.assert_allclose(summary["ls"]["delta_m_per_seed"], want, rtol=1e-12)
  # The STL runs are scored against the published row too (no longer 0 by definition).
  stl = report.stl_metrics_by_seed(runs, METRICS, (0, 1, 2))
  np.testing.assert_allclose(
    summary["stl"]["delta_m_per_seed"],
    [metrics.delta_m(v["metrics"], published, HIGHER) for v in stl.values()],
    rtol=1e-12,
  )
  # Without STL runs the table shows the published row, at Delta m 0.
  no_stl = report.summarize(ls, METRICS, HIGHER, (0, 1, 2), stl_row=published)
  np.testing.assert_allclose(no_stl["stl"]["metrics_mean"], published)
  assert no_stl["stl"]["delta_m_mean"] == 0.0 and no_stl["stl"]["mean_rank"] is None


def test_csv_json_and_table(tmp_path, seed):
  rng = np.random.default_rng(seed)
  runs = _runs(rng)
  summary, paths = report.write_reports(
    str(tmp_path), runs=runs, config={"x": 1}, benchmark=BENCH, plots=False
  )
  with open(tmp_path / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["method"] for r in rows] == list(summary)
  for r in rows:
    s = summary[r["method"]]
    assert float(r["delta_m_mean"]) == pytest.approx(s["delta_m_mean"], rel=1e-9)
    assert float(r["c MAE mean"]) == pytest.approx(s["metrics_mean"][2], rel=1e-9)
    assert int(r["seeds"]) == 3
  document = json.loads((tmp_path / "results.json").read_text())
  assert len(document["runs"]) == len(runs) and document["config"] == {"x": 1}
  back = RunResult.from_dict(document["runs"][4])
  np.testing.assert_allclose(back.history.losses, runs[4].history.losses)
  assert back.metrics == runs[4].metrics
  table = report.format_table(summary, METRICS, HIGHER)
  lines = table.splitlines()
  assert "Δm% ↓" in lines[1] and "a acc ↑" in lines[1] and "c MAE ↓" in lines[1]
  ls_line = next(line for line in lines if line.startswith("ls "))
  assert f"{summary['ls']['delta_m_mean']:.2f} ± {summary['ls']['delta_m_std']:.2f}" in ls_line
  assert next(line for line in lines if line.startswith("STL"))


def test_plots_are_written_and_readable(tmp_path, seed):
  image_lib = pytest.importorskip("matplotlib.image")
  rng = np.random.default_rng(seed)
  runs = _runs(rng, seeds=2, steps=25)
  _, paths = report.write_reports(str(tmp_path), runs=runs, config={}, benchmark=BENCH)
  pngs = [p for p in paths if p.endswith(".png")]
  assert sorted(p.split("/")[-1] for p in pngs) == [
    "eigenvalues.png",
    "task_weights.png",
    "training_curves.png",
  ]
  for p in pngs:
    image = image_lib.imread(p)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.01  # not a blank canvas


# The table's rules and the figures' structure.


def _table_lines(summary):
  return report.format_table(summary, METRICS, HIGHER).splitlines()


def test_delta_m_column_only_with_a_baseline(seed):
  rng = np.random.default_rng(seed)
  runs = _runs(rng, seeds=2, methods=("ls", "ntkmtl"))
  with_stl = report.summarize(runs, METRICS, HIGHER, (0, 1, 2))
  assert "Δm% ↓" in _table_lines(with_stl)[1]
  assert report.delta_m_baseline(with_stl, None) == "the STL runs"
  no_stl = report.summarize([r for r in runs if r.method != "stl"], METRICS, HIGHER, (0, 1, 2))
  lines = _table_lines(no_stl)
  assert "Δm" not in "\n".join(lines) and "±" not in "\n".join(lines)
  assert lines[1].split()[-1] == "s" and "MR ↓" in lines[1]  # the other columns stay
  assert report.delta_m_baseline(no_stl, None) is None
  # A published STL row is a baseline without STL runs.
  published = report.summarize(
    [r for r in runs if r.method != "stl"], METRICS, HIGHER, (0, 1, 2), stl_row=[0.9, 0.9, 0.5]
  )
  assert "Δm% ↓" in _table_lines(published)[1]
  assert report.delta_m_baseline(published, [0.9, 0.9, 0.5]) == "the paper's STL row"


def test_plus_minus_only_with_two_or_more_seeds(seed):
  rng = np.random.default_rng(seed)
  runs = _runs(rng, seeds=2, methods=("ls", "ntkmtl"))
  runs = [r for r in runs if not (r.method == "ntkmtl" and r.seed == 1)]  # ntkmtl: one seed
  summary = report.summarize(runs, METRICS, HIGHER, (0, 1, 2))
  lines = _table_lines(summary)
  ls_line = next(line for line in lines if line.startswith("ls "))
  ntk_line = next(line for line in lines if line.startswith("ntkmtl "))
  assert f"{summary['ls']['delta_m_mean']:.2f} ± {summary['ls']['delta_m_std']:.2f}" in ls_line
  assert "±" not in ntk_line and f"{summary['ntkmtl']['delta_m_mean']:.2f}" in ntk_line


@pytest.fixture
def figures(monkeypatch):
  """The figures the plot functions make, kept open instead of written."""
  pytest.importorskip("matplotlib")
  made = []
  monkeypatch.setattr(report, "_save", lambda fig, plt, path, rows: made.append(fig))
  yield made
  import matplotlib.pyplot as plt

  for fig in made:
    plt.close(fig)


def _visible_axes(fig):
  return [ax for ax in fig.axes if ax.get_visible()]


def _plotted_labels(ax):
  return [line.get_label() for line in ax.get_lines()]


def test_training_curves_one_legend_and_seed_bands(figures, seed):
  rng = np.random.default_rng(seed)
  runs = _runs(rng, seeds=3, steps=40)
  report.plot_training_curves("unused.png", runs, TASKS)
  (fig,) = figures
  axes = _visible_axes(fig)
  assert [ax.get_title() for ax in axes] == [f"task {t}: training loss" for t in TASKS]
  assert len(fig.legends) == 1 and not any(ax.get_legend() for ax in axes)
  legend = [t.get_text() for t in fig.legends[0].get_texts()]
  assert legend == ["stl", "ls", "ntkmtl", "famo"]
  assert "3 seeds" in fig._suptitle.get_text()
  for ax in axes:  # a band (PolyCollection) per method and task
    assert _plotted_labels(ax) == legend and len(ax.collections) == len(legend)
  # One seed: no band, and the title says so.
  figures.clear()
  report.plot_training_curves("unused.png", [r for r in runs if r.seed == 0], TASKS)
  assert "1 seed" in figures[0]._suptitle.get_text()
  assert all(not ax.collections for ax in _visible_axes(figures[0]))


def _runs_ls_unweighted(rng, steps):
  """Two seeds of runs in which LS's weights are all 1, as LS's are."""
  runs = _runs(rng, seeds=2, steps=steps)
  for run in runs:
    if run.method == "ls":
      run.history.weights[:] = 1.0
  return runs


def test_task_weights_leave_out_constant_weights(figures, seed):
  runs = _runs_ls_unweighted(np.random.default_rng(seed), steps=30)
  report.plot_task_weights("unused.png", runs, TASKS)
  (fig,) = figures
  titles = [ax.get_title() for ax in _visible_axes(fig)]
  assert titles == ["ntkmtl: task weights w_i", "famo: task weights w_i"]
  assert "constant weights, not drawn: ls (1, 1, 1)" in fig._suptitle.get_text()
  assert len(fig.legends) == 1 and [t.get_text() for t in fig.legends[0].get_texts()] == list(TASKS)


def test_eigenvalues_every_method_same_steps(figures, seed):
  rng = np.random.default_rng(seed)
  runs = _runs_ls_unweighted(rng, steps=41)
  for run in runs:
    if run.method == "ntkmtl":  # recorded in the step, every step
      run.history.eigen_steps = np.arange(1, 42, dtype=float)
      run.history.eigenvalues = rng.uniform(0.1, 1e3, (41, len(TASKS)))
  assert report.plot_eigenvalues("unused.png", runs, TASKS)
  (fig,) = figures
  titles = [ax.get_title() for ax in _visible_axes(fig)]
  # LS's weights are 1: one panel (the bottom one would repeat it); famo has no eigenvalues.
  assert titles == [
    "ls: λ_i = w_i² λ_i (w_i = 1)",
    "ntkmtl: λ_i (largest eigenvalue of K_ii)",
    "ntkmtl: w_i² λ_i (what the update follows)",
  ]
  text = fig._suptitle.get_text().replace("\n", " ")
  assert "no eigenvalues recorded: famo" in text and "2 seeds" in text and "every 5" in text
  assert len(fig.legends) == 1
  steps = [tuple(line.get_xdata()) for ax in _visible_axes(fig) for line in ax.get_lines()]
  assert len(set(steps)) == 1 and steps[0] == tuple(np.arange(1, 42, 5, dtype=float))
