"""Plans of runs (methods x seeds, STL one run per task), checked before any training, then
run through `loop.fit` and reported as the paper's table."""

from __future__ import annotations

import os
import sys
import time

from ntkmtl_jax.cli.flags import UsageError
from ntkmtl_jax.config import Config

PREFERRED_BASELINES = (
  "famo",
  "fairgrad",
  "mgda",
  "nash_mtl",
  "pcgrad",
  "cagrad",
  "imtl_g",
  "imgrad",
  "dwa",
  "uw",
  "rlw",
  "si",
)
CORE_METHODS = ("stl", "ls", "ntkmtl", "ntkmtl_sr")
MAX_DEFAULT_BASELINES = 4  # Keeps the default comparison within minutes on 2 CPU cores.


def default_methods() -> list[str]:
  """The default `compare` list: the core methods and a few registered baselines."""
  from ntkmtl_jax import methods

  known = set(methods.names())
  baselines = [m for m in PREFERRED_BASELINES if m in known][:MAX_DEFAULT_BASELINES]
  return [m for m in CORE_METHODS if m in known] + baselines


def plan_runs(
  base: Config, methods: list[str], seeds: list[int], hparams: dict[str, dict], num_tasks: int
) -> list[Config]:
  """The run configs: each method for each seed, with `hparams[method]` on top of
  `base.hparams`; "stl" without a task is one run per task."""
  plan = []
  for seed in seeds:
    for method in methods:
      hp = {**base.hparams, **hparams.get(method, {})}
      runs = (
        [dict(hp, task=i) for i in range(num_tasks)]
        if method == "stl" and "task" not in hp
        else [hp]
      )
      plan += [base.replace(method=method, seed=seed, hparams=h) for h in runs]
  return plan


def run_label(config: Config) -> str:
  """A run's folder name: method (and STL task) and seed."""
  task = f"-task{config.hparams['task']}" if config.method_key == "stl" else ""
  return f"{config.method_key}{task}-seed{config.seed}"


def _format_hparams(hparams: dict) -> str:
  return "(" + ", ".join(f"{k}={v!r}" for k, v in hparams.items()) + ")" if hparams else ""


def validate_plan(bench, plan: list[Config]) -> None:
  """Builds every run's method and optimiser before any training, so that a bad
  hyper-parameter, seed or chunking is one `UsageError` and not a traceback after the
  earlier runs trained."""
  from ntkmtl_jax.optimizer import build_optimizer

  for config in plan:
    if config.seed < 0:
      raise UsageError(f"seeds must be >= 0, got {config.seed}")
    try:
      method, _ = build_optimizer(config, bench.num_tasks, bench.functions.shared)
    except (TypeError, ValueError) as e:
      raise UsageError(f"{config.method_key} {_format_hparams(config.hparams)}: {e}") from e
    chunks = method.needs.num_chunks
    if config.batch_size % chunks:
      raise UsageError(
        f"{config.method_key} splits each batch into num_chunks={chunks}, "
        f"which does not divide the batch size {config.batch_size}: choose a "
        f"--batch-size that is a multiple of {chunks} or another num_chunks"
      )


def skip_status(runs) -> int:
  """The exit status of finished runs: 3 when any run skipped more than half of its steps
  (`results.MAX_SKIPPED_FRACTION`; one error line per such run), else 0. A run that skipped
  fewer steps gets one warning line (how many, and why) and does not change the status."""
  from ntkmtl_jax.results import skip_report

  reports = [r for r in map(skip_report, runs) if r]
  for line in reports:
    sys.stderr.write(f"ntkmtl: error: {line}\n")
  for run in runs:
    if run.skipped and not skip_report(run):
      causes = ", ".join(f"non-finite {k}: {n}" for k, n in run.skipped_by_cause.items() if n)
      sys.stderr.write(
        f"ntkmtl: warning: {run.method} seed {run.seed} skipped {run.skipped} of its "
        f"{run.steps} steps ({causes}); the others trained as configured.\n"
      )
  return 3 if reports else 0


def run_all(
  bench,
  plan: list[Config],
  *,
  out: str | None,
  report_config: dict,
  title: str,
  progress: bool = True,
  plots: bool = True,
  resume: bool = False,
  overwrite: bool = False,
) -> tuple[int, list]:
  """Runs `plan` on `bench`, then prints and writes the report.

  With `out`, each run checkpoints in `out/<run_label>` and results.json is rewritten after
  each run, so Ctrl-C keeps the finished runs and a second call with `resume` continues.

  Args:
    bench: the `Benchmark`.
    plan: the runs' configs.
    out: where results.json, results.csv, the plots and the runs' checkpoints go (None:
      nowhere).
    report_config: the settings recorded in results.json.
    title: the table's title (the seeds and total time are added).
    progress: show progress bars.
    plots: write the PNG plots.
    resume, overwrite: what to do with a run a workdir already holds (`loop.fit`'s).

  Returns:
    (exit status: 0; 130 when interrupted by SIGINT, 143 by SIGTERM; 3 when a run skipped
    most of its steps (see `results.skip_report`); the `RunResult`s).
  """
  from ntkmtl_jax import loop, report
  from ntkmtl_jax.interrupt import Terminated, exit_status

  runs, interrupted, stop_signal = [], False, None
  start = time.perf_counter()
  try:
    for index, config in enumerate(plan):
      label = config.method_key
      if label == "stl":
        label += f"[task {bench.task_names[config.hparams.get('task', 0)]}]"
      result = loop.fit(
        bench,
        config,
        out and os.path.join(out, run_label(config)),
        progress=progress,
        resume=resume,
        overwrite=overwrite,
        description=f"[{index + 1}/{len(plan)}] {label} seed {config.seed}",
      )
      runs.append(result)
      if result.interrupted:
        interrupted, stop_signal = True, result.stop_signal
        break
      if out:
        report.write_results(
          os.path.join(out, "results.json"),
          config=report_config,
          benchmark=dict(name=bench.name),
          runs=runs,
          summary={},
          interrupted=True,
        )
  except KeyboardInterrupt as error:
    interrupted, stop_signal = True, "SIGTERM" if isinstance(error, Terminated) else "SIGINT"
  total = time.perf_counter() - start
  finished = sum(not r.interrupted for r in runs)
  if interrupted:  # marks the runs that did not finish, in results.json
    report_config["unfinished_runs"] = [run_label(c) for c in plan[finished:]]
  report_config["wall_time_total"] = total
  summary = report.summarize(
    runs, bench.metric_names, bench.higher_is_better, bench.metric_tasks, bench.stl_row
  )
  paths = []
  if out:
    try:
      summary, paths = report.write_reports(
        out, runs=runs, config=report_config, benchmark=bench, plots=plots, interrupted=interrupted
      )
    except KeyboardInterrupt:
      print(
        f"\nInterrupted while writing the reports; results.json in {out} holds the finished runs.",
        file=sys.stderr,
      )
      return exit_status(stop_signal), runs
  baseline = report.delta_m_baseline(summary, bench.stl_row)
  against = f", Delta m % against {baseline}" if baseline else ""
  print()
  print(
    report.format_table(
      summary,
      bench.metric_names,
      bench.higher_is_better,
      title=f"{title}; seeds {sorted({r.seed for r in runs})}{against}, total {total:.0f} s",
    )
  )
  if paths:
    print(f"\nWrote {', '.join(os.path.basename(p) for p in paths)} to {out}")
  if interrupted:
    print(
      f"Interrupted ({stop_signal or 'SIGINT'}): kept the {finished} finished run(s)"
      + (f" in {out}" if out else "")
      + f"; {len(plan) - finished} not finished"
      + (" (rerun with --resume to continue)." if out else "."),
      file=sys.stderr,
    )
    return exit_status(stop_signal), runs
  return skip_status(runs), runs
