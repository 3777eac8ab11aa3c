"""The `ntkmtl` command: train, compare and inspect multi-task methods on a benchmark.

    ntkmtl compare                      # the demo: STL, LS, NTKMTL, NTKMTL-SR and baselines
    ntkmtl train --method ntkmtl        # one method, one seed
    ntkmtl spectrum                     # NTK eigenvalues of each task on one batch
    ntkmtl list                         # benchmarks and methods

Every command speaks one vocabulary (`ntkmtl_jax.cli.flags`); `train` and `compare` plan,
check and run their runs through `ntkmtl_jax.loop.fit` (`ntkmtl_jax.cli.runs`), MT10
through its own loop (`ntkmtl_jax.benchmarks.mt10`).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from ntkmtl_jax.cli import flags
from ntkmtl_jax.cli.commands import COMMANDS
from ntkmtl_jax.cli.flags import UsageError
from ntkmtl_jax.cli.runs import default_methods, plan_runs, run_all, validate_plan

__all__ = [
  "UsageError",
  "build_parser",
  "default_methods",
  "main",
  "plan_runs",
  "run_all",
  "validate_plan",
]

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
  ntkmtl compare --methods stl,ls,ntkmtl --seeds 0 --steps 200
  ntkmtl compare --benchmark sines --option imbalance=100
  ntkmtl train --method ntkmtl --hp exponent=0.75 --workdir runs/mine
  ntkmtl train --benchmark qm9 --preset tiny --data-dir ~/tensorflow_datasets
  ntkmtl spectrum --chunks 4 --train-steps 100
"""


class _Parser(argparse.ArgumentParser):
  """argparse with one-line errors (exit status 2) and no abbreviated flags: `--seed` on
  `compare` (whose flag is `--seeds`) is refused, not read as `--seeds`."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, allow_abbrev=False, **kwargs)

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _formatter(prog):
  return argparse.RawDescriptionHelpFormatter(prog, max_help_position=30, width=92)


def build_parser() -> argparse.ArgumentParser:
  """The `ntkmtl` argument parser."""
  parser = _Parser(
    prog="ntkmtl", description=DESCRIPTION, epilog=EPILOG, formatter_class=_formatter
  )
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

  def command(name, text, description, *, many=False, default_method="ntkmtl", runs=True):
    """A subcommand with the shared vocabulary (`cli.flags`)."""
    p = sub.add_parser(
      name, formatter_class=_formatter, help=text, description=textwrap.dedent(description)
    )
    flags.add_benchmark_flags(p)
    flags.add_method_flags(p, many=many, default_method=default_method)
    flags.add_training_flags(p)
    flags.add_output_flags(p, checkpoints=runs, plots=runs)
    return p

  command(
    "compare",
    "compare several methods over several seeds; print the table, write reports",
    """\
        Train every method on the benchmark for each seed, then print a table laid out like
        the NTKMTL paper's (per-metric seed means, mean rank MR, Delta m % against STL) and
        write results.json, results.csv and PNG plots (training curves per task, task
        weights, NTK eigenvalues lambda_i for LS vs NTKMTL) to the workdir, with each run's
        checkpoints (run again with --resume to continue). STL runs one model per task.
        Ctrl-C stops early and keeps the finished runs.""",
    many=True,
  )
  command(
    "train",
    "train one method on one benchmark",
    """\
        Train one method for one seed, print its metrics and write results.json, results.csv
        and plots, and the run's checkpoints in WORKDIR/<method>-seed<seed> (run again with
        --resume to continue). `--method stl` trains one model per task.""",
  )
  p = command(
    "spectrum",
    "NTK eigenvalues lambda_i of each task on one batch (the imbalance)",
    """\
        Build the extended NTK of the benchmark's model on one batch split into --chunks
        chunks and print, per task, lambda_i (largest eigenvalue of its kernel block K_ii),
        the NTKMTL weight, and the task affinity (`spectra.task_affinity`). With
        --train-steps N the model is first trained N steps with --method (default ls).""",
    default_method="ls",
    runs=False,
  )
  p.add_argument(
    "--chunks",
    "-n",
    type=int,
    default=1,
    help="n, chunks of the batch (rows of each task's Jacobian; default 1)",
  )
  p.add_argument(
    "--train-steps",
    type=int,
    default=0,
    help="train this many steps before measuring (default: 0, at init)",
  )

  sub.add_parser(
    "list",
    formatter_class=_formatter,
    help="list the benchmarks and the methods",
    description="List the registered benchmarks, their presets and the methods.",
  )
  return parser


def main(argv: list[str] | None = None) -> int:
  """Entry point of the `ntkmtl` console script; returns the exit status."""
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.command is None:
    parser.print_help()
    return 2
  from ntkmtl_jax._optional import MissingExtraError
  from ntkmtl_jax.checkpoints import DamagedCheckpointError
  from ntkmtl_jax.data.splits import DatasetMissingError
  from ntkmtl_jax.data.validation import DataFileError
  from ntkmtl_jax.interrupt import Terminated, exit_status, terminate_as_exception
  from ntkmtl_jax.io import OutputWriteError
  from ntkmtl_jax.locking import WorkdirBusyError

  terminate_as_exception()  # SIGTERM outside a training loop: clean up, exit 143

  if not getattr(args, "no_compilation_cache", True) and not os.environ.get(
    "NTKMTL_NO_COMPILATION_CACHE"
  ):
    from ntkmtl_jax import compilation_cache

    compilation_cache.enable()
  try:
    return COMMANDS[args.command](args)
  except (UsageError, MissingExtraError, DatasetMissingError, DataFileError, WorkdirBusyError) as e:
    sys.stderr.write(f"ntkmtl {args.command}: error: {e}\n")
    return 2
  except (OutputWriteError, DamagedCheckpointError) as e:  # a full disk, a damaged best model
    sys.stderr.write(f"ntkmtl {args.command}: error: {e}\n")
    return 1
  except Terminated:
    sys.stderr.write("\nTerminated (SIGTERM).\n")
    return exit_status("SIGTERM")
  except KeyboardInterrupt:
    sys.stderr.write("\nInterrupted.\n")
    return 130


if __name__ == "__main__":
  sys.exit(main())
