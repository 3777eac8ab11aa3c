"""How exact each method's solver is on the hard cases, and what it costs, in one table.

    python perf/solver_accuracy.py                   # float64, every hard case
    python perf/solver_accuracy.py --quick           # k = 2, 3, 5 and one seed
    python perf/solver_accuracy.py --dtype float32   # what a float32 model gets
    python perf/solver_accuracy.py --methods mgda,cagrad --markdown

For every method whose step solves a problem on the Gram matrix (the rows of
`ntkmtl_jax.testing.references.REFERENCES`) and every hard case of
`ntkmtl_jax.testing.cases` (task scales from 1 to 1e4, nearly collinear and nearly opposite
gradients, a zero or duplicated gradient, more tasks than directions; k = 2, 3, 5, 10, 40),
it runs the method's jitted weighting once on the case's Gram matrix and compares the
direction sum_i w_i g_i with an independent NumPy/SciPy float64 reference:

- the first table: the worst relative error ||d - d_ref|| / max(||d_ref||, 1e-6 max_i
  ||g_i||) over k and seeds, per family of cases ("-" where the method's answer is not
  unique there, e.g. IMTL-G with a zero gradient);
- the second: the steps where the solver reported no convergence (`solver_failures`), the
  most iterations it used, and the time of one jitted call as a ratio to LS's weighting on
  the same Gram matrix (median of --repeats calls, after compiling), per k.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ntkmtl_jax import methods  # noqa: E402
from ntkmtl_jax.method import TaskStats  # noqa: E402
from ntkmtl_jax.testing import cases as hard  # noqa: E402
from ntkmtl_jax.testing import references  # noqa: E402


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  # One line and exit status 2 for a bad argument, as the `ntkmtl` command.
  parser.error = lambda message: parser.exit(
    2, f"{parser.prog}: error: {message} (see {parser.prog} --help)\n"
  )
  parser.add_argument("--quick", action="store_true", help="k = 2, 3, 5 and seed 0 only")
  parser.add_argument(
    "--dtype",
    choices=("float64", "float32"),
    default="float64",
    help="dtype of the Gram matrix the methods see (the reference is always float64)",
  )
  parser.add_argument(
    "--methods",
    default="all",
    help="comma-separated rows of REFERENCES (e.g. mgda,mgda/frank_wolfe)",
  )
  parser.add_argument("--ks", default=None, help="comma-separated numbers of tasks")
  parser.add_argument("--seeds", default=None, help="comma-separated seeds")
  parser.add_argument("--repeats", type=int, default=20, help="timed calls per method and k")
  parser.add_argument("--markdown", action="store_true", help="print markdown tables")
  args = parser.parse_args(argv)
  rows = list(references.REFERENCES) if args.methods == "all" else args.methods.split(",")
  unknown = [r for r in rows if r not in references.REFERENCES]
  if unknown:
    parser.error(f"unknown method rows {unknown}; known: {', '.join(references.REFERENCES)}")
  ks = (2, 3, 5) if args.quick else hard.NUM_TASKS
  seeds = (0,) if args.quick else hard.SEEDS
  try:
    if args.ks:
      ks = tuple(int(k) for k in args.ks.split(","))
    if args.seeds:
      seeds = tuple(int(s) for s in args.seeds.split(","))
  except ValueError:
    parser.error("--ks and --seeds take comma-separated integers")
  if args.repeats < 1 or any(k < 2 for k in ks):
    parser.error("--repeats must be >= 1 and every k >= 2")
  return args, rows, ks, seeds


def time_call(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def stats_of(case: hard.HardCase, dtype) -> TaskStats:
  return TaskStats(
    losses=jnp.asarray(case.losses, dtype),
    gram=jnp.asarray(case.gram, dtype),
    sq_norms=jnp.asarray(np.diag(case.gram), dtype),
    key=jax.random.key(0),
  )


def table(header, body, markdown):
  widths = [max(len(str(r[i])) for r in [header] + body) for i in range(len(header))]
  if markdown:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in body]
  else:
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*header), "-" * (sum(widths) + 2 * len(widths) - 2)]
    lines += [fmt.format(*r) for r in body]
  return "\n".join(lines)


def main(argv=None) -> int:
  args, rows, ks, seeds = parse_args(argv)
  dtype = jnp.float64 if args.dtype == "float64" else jnp.float32
  cases = list(hard.hard_cases(ks=ks, seeds=seeds))
  errors = {}  # (row, family) -> worst error, or None where no reference exists
  failures = {row: 0 for row in rows}
  iterations = {row: 0 for row in rows}
  ratios = {}
  start = time.perf_counter()
  for k in ks:
    at_k = [c for c in cases if c.num_tasks == k]
    ls = methods.get("ls", k)
    ls_weights = jax.jit(ls.weights)
    ls_time = time_call(ls_weights, stats_of(at_k[0], dtype), ls.init(None), repeats=args.repeats)
    for row in rows:
      name, hparams = references.method_of(row)
      method = methods.get(name, k, **hparams)
      weights_fn = jax.jit(method.weights)
      for case in at_k:
        expected = references.reference_direction(row, case)
        weights, state = weights_fn(stats_of(case, dtype), method.init(None))
        failures[row] += int(getattr(state, "solver_failures", 0))
        iterations[row] = max(iterations[row], int(getattr(state, "iterations", 0)))
        key = (row, case.family)
        if expected is None:
          errors.setdefault(key, None)
          continue
        got = np.asarray(weights, np.float64) @ case.jacobian
        error = hard.relative_error(got, expected, case.jacobian)
        errors[key] = max(errors.get(key) or 0.0, error)
      ratios[(row, k)] = (
        time_call(weights_fn, stats_of(at_k[0], dtype), method.init(None), repeats=args.repeats)
        / ls_time
      )
  families = [f for f in hard.FAMILIES if any(c.family == f for c in cases)]
  print(
    f"solver accuracy: {args.dtype} Gram, {len(cases)} hard cases (k = "
    f"{', '.join(map(str, ks))}; seeds {', '.join(map(str, seeds))}), jax "
    f"{jax.__version__} on {jax.default_backend()}, {time.perf_counter() - start:.0f} s"
  )
  print("\nworst relative error of the direction against the float64 reference, per family:")
  body = []
  for row in rows:
    cells = []
    for f in families:
      value = errors.get((row, f))
      cells.append("-" if value is None else f"{value:.0e}")
    body.append([row] + cells)
  print(table(["method"] + families, body, args.markdown))
  print(
    f"\nsolver failures (of {len(cases)} solves), most iterations, and time per jitted call "
    "as a ratio to LS's weighting:"
  )
  body = [
    [row, failures[row], iterations[row]] + [f"{ratios[(row, k)]:.1f}x" for k in ks] for row in rows
  ]
  print(table(["method", "failures", "max iters"] + [f"k={k}" for k in ks], body, args.markdown))
  return 0


if __name__ == "__main__":
  sys.exit(main())
