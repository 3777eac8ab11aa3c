"""The `ntkmtl` command: train, compare and inspect multi-task methods on a benchmark.

    ntkmtl compare                      # the demo: STL, LS, NTKMTL, NTKMTL-SR and baselines
    ntkmtl train --method ntkmtl        # one method, one seed
    ntkmtl spectrum                     # NTK eigenvalues of each task on one batch
    ntkmtl list                         # benchmarks and methods
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import textwrap
import time

DESCRIPTION = """\
Multi-task learning with NTKMTL in JAX.

When several tasks share one network, the task whose gradient is largest (the largest
eigenvalue lambda_i of its neural tangent kernel) is learned first and the others lag.
NTKMTL weights each task by (sum_j lambda_j / lambda_i) ** 0.5 so all tasks are learned at
the same pace. These commands run it, and the methods it is compared with, on built-in
benchmarks that need no download, and write tables and plots.

The default benchmark, multidigits, puts two handwritten digits (scikit-learn's own) side
by side: two classification tasks (left digit, right digit) and a regression of the
number they form (0 to 99), whose far larger squared-error gradient dominates a plain sum
of the losses.

Start with:
  ntkmtl compare          compare STL, LS, NTKMTL, NTKMTL-SR and baselines (3 seeds,
                          a few minutes on a laptop CPU), print the table, write plots
  ntkmtl list             the benchmarks and methods available
"""

EPILOG = """\
Glossary: STL = each task trained alone (the baseline); LS = plain sum of the task losses;
Delta m % = mean relative change of every metric against STL, signed so that lower is
better; MR = mean rank of a method over the metrics (lower is better).

Examples:
  ntkmtl compare --methods stl,ls,ntkmtl --seeds 1 --steps 200
  ntkmtl compare --benchmark sines --option imbalance=100
  ntkmtl train --method ntkmtl --hp exponent=0.75 --out runs/mine
  ntkmtl spectrum --chunks 4 --train-steps 100
"""

PREFERRED_BASELINES = ("famo", "fairgrad", "mgda", "nash_mtl", "pcgrad", "cagrad", "imtl_g",
                       "imgrad", "dwa", "uw", "rlw", "si")
CORE_METHODS = ("stl", "ls", "ntkmtl", "ntkmtl_sr")
MAX_DEFAULT_BASELINES = 4  # Keeps the default comparison within minutes on 2 CPU cores.
SCHEDULES = ("constant", "cosine", "step", "plateau")


class UsageError(Exception):
  """A bad command line: reported on one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
  """argparse with one-line errors (exit status 2)."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _formatter(prog):
  return argparse.RawDescriptionHelpFormatter(prog, max_help_position=30, width=92)


def _key_values(items: list[str] | None, what: str) -> dict:
  out = {}
  for item in items or []:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise UsageError(f"{what} must look like NAME=VALUE, got {item!r}")
    try:
      parsed = json.loads(value)
    except json.JSONDecodeError:
      try:
        parsed = float(value)  # nan, inf: refused later by name, not taken as text
      except ValueError:
        parsed = value
    out[key.strip().replace("-", "_")] = tuple(parsed) if isinstance(parsed, list) else parsed
  return out


def _add_common(p: argparse.ArgumentParser, *, out: bool = True):
  from ntkmtl_jax import benchmarks
  p.add_argument("--benchmark", "-b", default="multidigits", metavar="NAME",
                 help="benchmark to run (default: multidigits; choices: "
                      f"{', '.join(benchmarks.benchmark_names())})")
  p.add_argument("--option", "-O", action="append", metavar="NAME=VALUE",
                 help="benchmark option, repeatable (e.g. regression_scale=0.1 for multidigits, "
                      "imbalance=100 for sines)")
  p.add_argument("--steps", type=int, help="train steps per run (default: the benchmark's)")
  p.add_argument("--epochs", type=int, help="epochs per run (default: the benchmark's)")
  p.add_argument("--batch-size", type=int, help="mini-batch size (default: the benchmark's)")
  p.add_argument("--lr", type=float, help="learning rate (default: the benchmark's)")
  p.add_argument("--optimizer", choices=("adam", "adamw", "sgd"),
                 help="optimiser after the task aggregation (default: the benchmark's, adam)")
  p.add_argument("--schedule", choices=SCHEDULES,
                 help="per-epoch learning-rate schedule (default: the benchmark's)")
  p.add_argument("--strategy", help="how task backward passes run: auto, unroll, vmap, "
                 "chunked, streaming (default: auto)")
  p.add_argument("--max-grad-norm", type=float, default=None,
                 help="clip the shared update's global norm to this before the optimiser "
                      "(default: the benchmark's; 0 turns clipping off)")
  if out:
    p.add_argument("--out", "-o", metavar="DIR",
                   help="output directory (default: runs/<benchmark>-<command>-<time>)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
  p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
  p.add_argument("--no-compilation-cache", action="store_true",
                 help="do not keep compiled steps on disk for the next run ($NTKMTL_CACHE_DIR, "
                      "else ~/.cache/ntkmtl-jax/xla)")


def build_parser() -> argparse.ArgumentParser:
  """The `ntkmtl` argument parser."""
  parser = _Parser(prog="ntkmtl", description=DESCRIPTION, epilog=EPILOG,
                   formatter_class=_formatter)
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

  p = sub.add_parser(
      "compare", formatter_class=_formatter,
      help="compare several methods over several seeds; print the table, write reports",
      description=textwrap.dedent("""\
        Train every method on the benchmark for each seed, then print a table laid out like
        the NTKMTL paper's (per-metric seed means, mean rank MR, Delta m % against STL) and
        write results.json, results.csv and PNG plots (training curves per task, task
        weights, NTK eigenvalues lambda_i for LS vs NTKMTL) to the output directory.
        STL runs one model per task. Ctrl-C stops early and keeps the finished runs."""))
  _add_common(p)
  p.add_argument("--methods", "-m", metavar="LIST",
                 help="comma-separated method names (default: stl,ls,ntkmtl,ntkmtl_sr and up "
                      f"to {MAX_DEFAULT_BASELINES} registered baselines among "
                      f"{','.join(PREFERRED_BASELINES)}); see `ntkmtl list`")
  p.add_argument("--seeds", type=int, default=3, help="number of seeds, 0..N-1 (default: 3)")
  p.add_argument("--hp", action="append", metavar="METHOD.NAME=VALUE",
                 help="method hyper-parameter, repeatable (e.g. ntkmtl.exponent=0.75)")

  p = sub.add_parser(
      "train", formatter_class=_formatter, help="train one method on one benchmark",
      description=textwrap.dedent("""\
        Train one method for one seed, print its metrics and write results.json, results.csv
        and plots. `--method stl` trains one model per task."""))
  _add_common(p)
  p.add_argument("--method", "-m", default="ntkmtl",
                 help="method name (default: ntkmtl); see `ntkmtl list`")
  p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
  p.add_argument("--hp", action="append", metavar="NAME=VALUE",
                 help="method hyper-parameter, repeatable (e.g. exponent=0.75)")
  for flag, text in (("--resume", "continue the run that --out holds (its checkpoints are in "
                                   "OUT/<method>-seed<seed>)"),
                     ("--overwrite", "discard an unfinished run that --out holds (a finished "
                                      "one is kept)")):
    p.add_argument(flag, action="store_true", help=text)

  p = sub.add_parser(
      "spectrum", formatter_class=_formatter,
      help="NTK eigenvalues lambda_i of each task on one batch (the imbalance)",
      description=textwrap.dedent("""\
        Build the extended NTK of the benchmark's model on one batch split into --chunks
        chunks and print, per task, lambda_i (largest eigenvalue of its kernel block K_ii),
        the NTKMTL weight, and the cosine between task gradients. With --train-steps N the
        model is first trained N steps with --method (default ls)."""))
  _add_common(p, out=False)
  p.add_argument("--chunks", "-n", type=int, default=1,
                 help="n, chunks of the batch (rows of each task's Jacobian; default 1)")
  p.add_argument("--train-steps", type=int, default=0,
                 help="train this many steps before measuring (default: 0, at init)")
  p.add_argument("--method", "-m", default="ls", help="method for --train-steps (default: ls)")
  p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
  p.add_argument("--out", "-o", metavar="DIR", help="also write spectrum.json here")

  sub.add_parser("list", formatter_class=_formatter,
                 help="list the benchmarks and the methods",
                 description="List the registered benchmarks and methods.")
  return parser


# Helpers.


def _method_key(name: str) -> str:
  return name.strip().lower().replace("-", "_")


def _check_methods(names: list[str]) -> list[str]:
  from ntkmtl_jax import methods
  known = methods.names()
  keys = [_method_key(n) for n in names if n.strip()]
  unknown = [n for n in keys if n not in known]
  if unknown:
    raise UsageError(f"unknown method {unknown[0]!r} (known: {', '.join(known)})")
  if not keys:
    raise UsageError("no method given")
  return list(dict.fromkeys(keys))


def default_methods() -> list[str]:
  """The default `compare` list: the core methods and a few registered baselines."""
  from ntkmtl_jax import methods
  known = set(methods.names())
  baselines = [m for m in PREFERRED_BASELINES if m in known][:MAX_DEFAULT_BASELINES]
  return [m for m in CORE_METHODS if m in known] + baselines


def _benchmark(args):
  from ntkmtl_jax import benchmarks
  if args.benchmark.lower() == "mt10":
    raise UsageError("MT10 (multi-task SAC on Meta-World) runs one method at a time: "
                     "ntkmtl train --benchmark mt10 --method NAME, or python -m "
                     "experiments.mt10.main --methods a,b --seeds 0,1")
  if args.benchmark.lower().replace("-", "_") not in benchmarks.benchmark_names():
    raise UsageError(f"unknown benchmark {args.benchmark!r} (known: "
                     f"{', '.join(benchmarks.benchmark_names())})")
  options = _key_values(args.option, "--option")
  try:
    return benchmarks.get_benchmark(args.benchmark, **options)
  except (TypeError, ValueError) as e:
    raise UsageError(f"bad option for benchmark {args.benchmark!r}: {e}") from e
  except FileNotFoundError as e:  # a paper benchmark whose data is not there
    raise UsageError(f"{e}\n  (with the ntkmtl command, give the directory as "
                     "--option data_dir=DIR)") from e


def _base_config(args, bench):
  """The benchmark's default run with the command line's settings."""
  changes = {}
  for flag, field in (("batch_size", "batch_size"), ("lr", "learning_rate"),
                      ("optimizer", "optimizer"), ("schedule", "lr_schedule"),
                      ("strategy", "strategy"), ("epochs", "num_epochs")):
    if getattr(args, flag, None) is not None:
      changes[field] = getattr(args, flag)
  if args.steps is not None:
    changes.update(max_steps=args.steps, num_epochs=args.epochs)
  if args.max_grad_norm is not None:
    changes["max_grad_norm"] = args.max_grad_norm or None
  config = bench.config.replace(**changes)
  if any(v is not None and v <= 0 for v in (config.max_steps, config.num_epochs)) or \
      config.batch_size < 1 or not 0 < config.learning_rate < math.inf:
    raise UsageError("--steps, --epochs, --batch-size and --lr must be positive (and --lr "
                     "finite)")
  if args.max_grad_norm is not None and not 0 <= args.max_grad_norm < math.inf:
    raise UsageError(f"--max-grad-norm must be a finite norm >= 0 (0: no clipping), got "
                     f"{args.max_grad_norm}")
  if config.batch_size > len(bench.train):
    raise UsageError(f"--batch-size {config.batch_size} is larger than the training split "
                     f"({len(bench.train)} examples)")
  steps = config.run_length(len(bench.train) // config.batch_size)[1]
  if not config.probe_every:  # eigenvalue tracks for the plots, about 20 points per run
    config = config.replace(probe_every=max(1, steps // 20))
  return config, steps


def _output_dir(args, command: str) -> str:
  out = args.out or os.path.join(
      "runs", f"{args.benchmark}-{command}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
  try:
    os.makedirs(out, exist_ok=True)
    probe = os.path.join(out, ".ntkmtl-write-test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise UsageError(f"output directory {out!r} is not writable ({e.strerror or e})") from e
  return out


def _stl_runs(method, bench, hparams):
  if method == "stl" and "task" not in hparams:
    return [dict(hparams, task=i) for i in range(bench.num_tasks)]
  return [hparams]


def run_all(bench, plan, *, out: str | None, report_config: dict, title: str,
            progress: bool = True, plots: bool = True, workdirs=None, resume: bool = True,
            overwrite: bool = False) -> tuple[int, list]:
  """Runs `plan` (a list of `training.Config`) on `bench`, then prints and writes the report.

  results.json is rewritten after each run, so Ctrl-C keeps the finished runs.

  Args:
    bench: the `Benchmark`.
    plan: the runs' configs.
    out: where results.json, results.csv and the plots go (None: nowhere).
    report_config: the settings recorded in results.json.
    title: the table's title (the seeds and total time are added).
    progress: show progress bars.
    plots: write the PNG plots.
    workdirs: per run, its checkpoint directory (None: no checkpoints).
    resume, overwrite: what to do with a run a workdir already holds (`training.fit`'s).

  Returns:
    (exit status: 0; 130 when interrupted; 3 when a run skipped most of its steps (see
    `training.skip_report`); the `RunResult`s).
  """
  from ntkmtl_jax import report, training
  runs, interrupted = [], False
  start = time.perf_counter()
  try:
    for index, config in enumerate(plan):
      label = config.method_key
      if label == "stl":
        label += f"[task {bench.task_names[config.hparams.get('task', 0)]}]"
      result = training.fit(bench, config, None if workdirs is None else workdirs[index],
                            progress=progress, resume=resume, overwrite=overwrite,
                            description=f"[{index + 1}/{len(plan)}] {label} seed {config.seed}")
      runs.append(result)
      if result.interrupted:
        interrupted = True
        break
      if out:
        report.write_json(os.path.join(out, "results.json"), config=report_config,
                          benchmark=dict(name=bench.name), runs=runs, summary={},
                          interrupted=True)
  except KeyboardInterrupt:
    interrupted = True
  total = time.perf_counter() - start
  report_config["wall_time_total"] = total
  summary = report.summarize(runs, bench.metric_names, bench.higher_is_better,
                             bench.metric_tasks, bench.stl_row)
  paths = []
  if out:
    try:
      summary, paths = report.write_reports(out, runs=runs, config=report_config,
                                            benchmark=bench, plots=plots,
                                            interrupted=interrupted)
    except KeyboardInterrupt:
      print(f"\nInterrupted while writing the reports; results.json in {out} holds the "
            f"finished runs.", file=sys.stderr)
      return 130, runs
  baseline = "the paper's STL row" if bench.stl_row is not None else "the STL runs"
  print()
  print(report.format_table(summary, bench.metric_names, bench.higher_is_better,
                            title=f"{title}; seeds {sorted({r.seed for r in runs})}, Delta m % "
                                  f"against {baseline}, total {total:.0f} s"))
  if paths:
    print(f"\nWrote {', '.join(os.path.basename(p) for p in paths)} to {out}")
  if interrupted:
    print(f"Interrupted: kept the {sum(not r.interrupted for r in runs)} finished runs"
          + (f" in {out}." if out else "."), file=sys.stderr)
    return 130, runs
  return _skip_status(runs), runs


def _plan(base, methods, seeds, hparams_of) -> list:
  """The run configs: each method for each seed; "stl" without a task is one run per task."""
  plan = []
  for seed in seeds:
    for method in methods:
      for hp in hparams_of(method):
        plan.append(base.replace(method=method, seed=seed, hparams=hp))
  return plan


def validate_plan(bench, plan) -> None:
  """Builds every run's method and optimiser before any training, so that a bad
  hyper-parameter, seed or chunking is one `UsageError` and not a traceback after the
  earlier runs trained."""
  from ntkmtl_jax import training
  for config in plan:
    if config.seed < 0:
      raise UsageError(f"seeds must be >= 0, got {config.seed}")
    try:
      method, _ = training.build_optimizer(config, bench.num_tasks, bench.functions.shared)
    except (TypeError, ValueError) as e:
      raise UsageError(f"{config.method_key} {_format_hparams(config.hparams)}: {e}") from e
    chunks = method.needs.num_chunks
    if config.batch_size % chunks:
      raise UsageError(f"{config.method_key} splits each batch into num_chunks={chunks}, "
                       f"which does not divide the batch size {config.batch_size}: choose a "
                       f"--batch-size that is a multiple of {chunks} or another num_chunks")


def _format_hparams(hparams: dict) -> str:
  return "(" + ", ".join(f"{k}={v!r}" for k, v in hparams.items()) + ")" if hparams else ""


def _run_all(args, bench, methods, seeds, hparams, command) -> int:
  base, steps = _base_config(args, bench)
  plan = _plan(base, methods, seeds, lambda m: _stl_runs(m, bench, hparams.get(m, {})))
  validate_plan(bench, plan)
  if not args.no_plots:
    _require_plots()
  out = _output_dir(args, command)
  print(f"ntkmtl {command}: {bench.name} ({bench.description}); {len(plan)} run(s) of {steps} "
        f"steps; writing to {out}", flush=True)
  report_config = dict(command=command, benchmark=bench.name,
                       options=_key_values(args.option, ""), methods=methods, seeds=seeds,
                       steps=steps, batch_size=base.batch_size, hparams=hparams,
                       run=dataclasses.asdict(base))
  checkpointed = command == "train"
  from ntkmtl_jax.checkpoints import RunMismatchError
  try:
    code, _ = run_all(bench, plan, out=out, report_config=report_config,
                      title=f"{bench.name}: {bench.description}; {steps} steps",
                      progress=not args.quiet, plots=not args.no_plots,
                      workdirs=[os.path.join(out, _run_label(c)) for c in plan]
                      if checkpointed else None,
                      resume=checkpointed and args.resume,
                      overwrite=checkpointed and args.overwrite)
  except RunMismatchError as error:
    raise UsageError(str(error)) from None
  return code


def _require_plots():
  from ntkmtl_jax._optional import require
  require("matplotlib", "plots", "the PNG plots (or pass --no-plots)")


def _skip_status(runs) -> int:
  """3, after one line per run that skipped most of its steps; else 0."""
  from ntkmtl_jax import training
  reports = [r for r in map(training.skip_report, runs) if r]
  for line in reports:
    sys.stderr.write(f"ntkmtl: error: {line}\n")
  return 3 if reports else 0


# Commands.


def cmd_compare(args) -> int:
  bench = _benchmark(args)
  names = _check_methods(args.methods.split(",")) if args.methods else default_methods()
  if args.seeds < 1:
    raise UsageError("--seeds must be at least 1")
  hp = _key_values(args.hp, "--hp")
  per_method: dict[str, dict] = {}
  for key, value in hp.items():
    method, dot, name = key.partition(".")
    if not dot:
      raise UsageError(f"--hp for compare must look like METHOD.NAME=VALUE, got {key!r}")
    per_method.setdefault(_method_key(method), {})[name] = value
  stray = sorted(set(per_method) - set(names))
  if stray:
    raise UsageError(f"--hp names {', '.join(stray)}, which is not among the methods run "
                     f"({', '.join(names)})")
  return _run_all(args, bench, names, list(range(args.seeds)), per_method, "compare")


def cmd_train(args) -> int:
  if args.benchmark.lower() == "mt10":
    return _train_mt10(args)
  bench = _benchmark(args)
  method = _check_methods([args.method])[0]
  hp = _key_values(args.hp, "--hp")
  return _run_all(args, bench, [method], [args.seed], {method: hp}, "train")


def _train_mt10(args) -> int:
  """`ntkmtl train --benchmark mt10`: the MT10 runner of the repository's experiments/mt10
  (multi-task SAC on Meta-World; a reinforcement-learning loop, not `training.fit`)."""
  try:
    from experiments.mt10 import main as mt10_main
  except ImportError as e:
    raise UsageError("MT10 runs from a source checkout (its multi-task SAC lives in the "
                     "repository's experiments/mt10): run `python -m experiments.mt10.main` "
                     f"from the repository root ({e})") from e
  argv = ["--method", _check_methods([args.method])[0], "--seeds", str(args.seed)]
  for option, value in _key_values(args.option, "--option").items():
    if option == "config":
      argv += ["--config", str(value)]
    elif option == "num_train_steps":
      argv += ["--num-train-steps", str(value)]
    else:
      raise UsageError(f"unknown MT10 option {option!r} (config, num_train_steps)")
  if args.steps is not None:
    argv += ["--num-train-steps", str(args.steps)]
  if args.out:
    argv += ["--workdir", args.out]
  if args.quiet:
    argv.append("--no-progress")
  mt10_main.main(argv)
  return 0


def cmd_spectrum(args) -> int:
  import jax
  import numpy as np
  from ntkmtl_jax import kernel, training
  bench = _benchmark(args)
  method = _check_methods([args.method])[0]
  config, _ = _base_config(args, bench)
  batch_size = config.batch_size
  if args.chunks < 1 or batch_size % args.chunks:
    raise UsageError(f"--chunks must divide the batch size ({batch_size})")
  out = _output_dir(args, "spectrum") if args.out else None
  fns = bench.functions
  data = bench.train_data(args.seed, batch_size)
  if args.train_steps > 0:
    result = training.fit(bench, config.replace(
        method=method, seed=args.seed, max_steps=args.train_steps, num_epochs=None,
        probe_every=0, hparams={"task": 0} if method == "stl" else {}),
        progress=not args.quiet)
    params, model_state = result.params, result.model_state
  else:
    params, model_state = fns.init(jax.random.key(args.seed), next(data))
  batch = next(data)
  losses = lambda p, b: fns.loss_fn(p, model_state, b)[0]
  ntk = kernel.ntk_weights(losses, params, batch, num_chunks=args.chunks, shared=fns.shared,
                           return_blocks=True)
  blocks = np.asarray(ntk.blocks, np.float64)  # (k, k, n, n)
  sums = blocks.sum(axis=(2, 3))  # <sum_a J_ia, sum_b J_jb>: Gram of the batch gradients
  norms = np.sqrt(np.maximum(np.diag(sums), 1e-300))
  cosine = sums / np.outer(norms, norms)
  z, _ = fns.encode(params, model_state, batch)
  sr_chunks = args.chunks if args.chunks > 1 else 1
  sr_eig, _ = kernel.representation_eigenvalues(fns.decode, params, z, batch,
                                                num_chunks=sr_chunks)
  lam = np.asarray(ntk.eigenvalues, np.float64)
  names = bench.task_names
  width = max(len(n) for n in names) + 2
  print(f"{bench.name}: batch {batch_size}, n = {args.chunks} chunks, after "
        f"{args.train_steps} {method} steps, seed {args.seed}")
  print(f"{'task':<{width}}{'loss':>12}{'lambda_i':>14}{'NTKMTL w_i':>13}{'lambda_i(z)':>14}")
  for i, n in enumerate(names):
    print(f"{n:<{width}}{float(np.mean(ntk.losses[i])):>12.4g}{lam[i]:>14.4g}"
          f"{float(ntk.weights[i]):>13.4g}{float(sr_eig[i]):>14.4g}")
  print(f"imbalance max/min lambda_i: {lam.max() / max(lam.min(), 1e-300):.3g}")
  print("cosine between task gradients:")
  print(" " * width + "".join(f"{n:>10}" for n in names))
  for i, n in enumerate(names):
    print(f"{n:<{width}}" + "".join(f"{cosine[i, j]:>10.3f}" for j in range(len(names))))
  if out:
    path = os.path.join(out, "spectrum.json")
    training.write_json(path, dict(
        benchmark=bench.name, task_names=list(names), chunks=args.chunks,
        train_steps=args.train_steps, method=method, seed=args.seed, eigenvalues=lam.tolist(),
        weights=np.asarray(ntk.weights).tolist(),
        representation_eigenvalues=np.asarray(sr_eig).tolist(), cosine=cosine.tolist(),
        blocks=blocks.tolist()))
    print(f"Wrote {path}")
  return 0


def cmd_list(args) -> int:
  del args
  from ntkmtl_jax import benchmarks, methods
  print("Benchmarks (ntkmtl compare --benchmark NAME):")
  for name in benchmarks.benchmark_names():
    print(f"  {name:<14}{benchmarks.describe(name)}")
  print(f"  {'mt10':<14}Meta-World MT10, multi-task SAC (ntkmtl train --benchmark mt10; the rl "
        "extra, from a source checkout)")
  print("Methods (--methods a,b,c; --hp METHOD.NAME=VALUE):")
  for name in methods.names():
    hps = ", ".join(f"{k}={v!r}" for k, v in methods.defaults(name).items() if k != "shared")
    print(f"  {name:<14}{hps}")
  return 0


def experiment_main(benchmark: str, get_config, argv: list[str] | None = None) -> list:
  """The command line of a benchmark folder (`python -m experiments.<name>.main`).

  One run of the chosen config (`--config default|tiny`), or a comparison (`--methods`,
  `--seeds`) printed as the `ntkmtl` command's table; `--workdir` holds each run's
  checkpoints (a run started again with it resumes) and the reports. The runs go through
  `training.fit`, as `ntkmtl train` and `ntkmtl compare` do: the same config gives the same
  result whichever command ran it.

  Args:
    benchmark: the benchmark's registry name.
    get_config: `get_config(name) -> training.Config` of the folder's `configs`.
    argv: the arguments (default: the process's).

  Returns:
    The `RunResult`s, one per run.
  """
  from ntkmtl_jax import benchmarks
  from ntkmtl_jax.data.splits import DatasetMissingError
  parser = argparse.ArgumentParser(prog=f"python -m experiments.{benchmark}.main",
                                   description=f"Train a multi-task method on {benchmark}.")
  parser.add_argument("--config", default="default", choices=("default", "tiny"),
                      help="default: the paper's hyper-parameters; tiny: a smoke run.")
  parser.add_argument("--method", default=None, help="a name from ntkmtl_jax.methods.names()")
  parser.add_argument("--methods", default=None,
                      help="comma-separated methods to compare (\"stl\" runs one per task); "
                      "overrides --method")
  parser.add_argument("--seeds", default=None, help="comma-separated seeds (with --methods)")
  parser.add_argument("--hp", action="append", default=[], metavar="NAME=VALUE",
                      help="a method hyper-parameter (repeatable), e.g. --hp exponent=0.75")
  parser.add_argument("--data-dir", default=None, help="where the dataset lives")
  parser.add_argument("--workdir", default=None,
                      help="checkpoints and results; rerun with it to resume")
  parser.add_argument("--overwrite", action="store_true",
                      help="discard an unfinished run of another config in --workdir")
  for flag, kind in (("--max-steps", int), ("--epochs", int), ("--batch-size", int),
                     ("--learning-rate", float), ("--seed", int), ("--strategy", str)):
    parser.add_argument(flag, type=kind, default=None)
  flags = parser.parse_args(argv)
  config = get_config(flags.config)
  changes = {field: getattr(flags, flag) for flag, field in (
      ("method", "method"), ("data_dir", "data_dir"), ("max_steps", "max_steps"),
      ("epochs", "num_epochs"), ("batch_size", "batch_size"),
      ("learning_rate", "learning_rate"), ("seed", "seed"), ("strategy", "strategy"))
      if getattr(flags, flag) is not None}
  try:
    hp = _key_values(flags.hp, "--hp")
  except UsageError as error:
    raise SystemExit(str(error)) from None
  config = config.replace(**changes, hparams={**config.hparams, **hp})
  try:
    bench = benchmarks.from_config(config)
  except DatasetMissingError as error:
    raise SystemExit(str(error)) from None
  names = flags.methods.split(",") if flags.methods else [config.method]
  seeds = [int(x) for x in flags.seeds.split(",")] if flags.seeds else [config.seed]
  plan = _plan(config, [_method_key(n) for n in names], seeds,
               lambda m: _stl_runs(m, bench, config.hparams))
  workdirs = None
  if flags.workdir:
    many = len(plan) > 1
    workdirs = [os.path.join(flags.workdir, _run_label(c)) if many else flags.workdir
                for c in plan]
  from ntkmtl_jax.checkpoints import RunMismatchError
  try:
    validate_plan(bench, plan)
  except UsageError as error:
    raise SystemExit(f"{parser.prog}: error: {error}") from None
  try:
    code, runs = run_all(bench, plan, out=flags.workdir,
                         report_config=dataclasses.asdict(config),
                         title=f"{benchmark}: {bench.description}", progress=False,
                         plots=False, workdirs=workdirs, overwrite=flags.overwrite)
  except RunMismatchError as error:
    raise SystemExit(str(error)) from None
  if code:  # 130: interrupted (checkpoints kept); 3: a run skipped most of its steps
    raise SystemExit(code)
  return runs


def _run_label(config) -> str:
  """A run's folder name: method (and STL task) and seed."""
  task = f"-task{config.hparams['task']}" if config.method_key == "stl" else ""
  return f"{config.method_key}{task}-seed{config.seed}"


COMMANDS = dict(compare=cmd_compare, train=cmd_train, spectrum=cmd_spectrum, list=cmd_list)


def main(argv: list[str] | None = None) -> int:
  """Entry point of the `ntkmtl` console script; returns the exit status."""
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.command is None:
    parser.print_help()
    return 2
  from ntkmtl_jax._optional import MissingExtraError
  from ntkmtl_jax.data.splits import DatasetMissingError
  if not getattr(args, "no_compilation_cache", True) and \
      not os.environ.get("NTKMTL_NO_COMPILATION_CACHE"):
    from ntkmtl_jax import compilation_cache
    compilation_cache.enable()
  try:
    return COMMANDS[args.command](args)
  except (UsageError, MissingExtraError, DatasetMissingError) as e:
    sys.stderr.write(f"ntkmtl {args.command}: error: {e}\n")
    return 2
  except KeyboardInterrupt:
    sys.stderr.write("\nInterrupted.\n")
    return 130


if __name__ == "__main__":
  sys.exit(main())
