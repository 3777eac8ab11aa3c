"""The command line's one vocabulary: every flag declared once, and the `Config` it makes.

Every command that runs training (`ntkmtl train`, `ntkmtl compare`, `ntkmtl spectrum
--train-steps`, MT10 through `--benchmark mt10`) takes the same flags for the same things:

  --benchmark NAME   --preset NAME   --protocol ours|official   --option NAME=VALUE
  --data-dir DIR
  --method NAME | --methods A,B   --seed S | --seeds 0,1,2   --hp NAME=VALUE
  --steps N   --epochs N   --batch-size N   --lr X   --optimizer   --schedule
  --max-grad-norm X   --task-passes   --materialize   --workdir DIR   --resume   --overwrite
  --quiet   --no-plots   --no-compilation-cache
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

from ntkmtl_jax._names import canonical
from ntkmtl_jax.config import OPTIMIZERS, PROTOCOLS, SCHEDULES, Config

PASSES = ("auto", "vmap", "unroll", "chunked", "sequential")
MATERIALIZE = {"auto": None, "yes": True, "no": False}


class UsageError(Exception):
  """A bad command line: reported on one line with exit status 2."""


def key_values(items: list[str] | None, what: str) -> dict:
  """{name: value} of NAME=VALUE items; values are JSON where they parse (lists as tuples)."""
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


def seed_list(text: str) -> list[int]:
  """`--seeds 0,1,2` -> [0, 1, 2]; every seed an integer >= 0."""
  try:
    seeds = [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    raise UsageError(
      f"--seeds must be comma-separated integers, e.g. 0,1,2; got {text!r}"
    ) from None
  if not seeds or min(seeds) < 0:
    raise UsageError(f"--seeds must list seeds >= 0, e.g. 0,1,2; got {text!r}")
  return list(dict.fromkeys(seeds))


def method_list(names: list[str]) -> list[str]:
  """The registry names of `names`, in order, without repeats; refuses unknown ones.
  "all" stands for every registered method, in the registry's order."""
  from ntkmtl_jax import methods

  known = methods.names()
  keys = [canonical(n) for n in names if n.strip()]
  keys = [m for n in keys for m in (known if n == "all" else [n])]
  unknown = [n for n in keys if n not in known]
  if unknown:
    raise UsageError(f"unknown method {unknown[0]!r} (known: {', '.join(known)})")
  if not keys:
    raise UsageError("no method given")
  return list(dict.fromkeys(keys))


def add_benchmark_flags(p: argparse.ArgumentParser):
  """Which problem: benchmark, preset, options, data directory."""
  from ntkmtl_jax import benchmarks

  p.add_argument(
    "--benchmark",
    "-b",
    default="multidigits",
    metavar="NAME",
    help="benchmark to run (default: multidigits; choices: "
    f"{', '.join(benchmarks.benchmark_names())}, mt10)",
  )
  p.add_argument(
    "--preset",
    default="default",
    metavar="NAME",
    help="the benchmark's preset run: default (its published protocol) or tiny "
    "(a smoke run of a few steps); mt10 also has short",
  )
  p.add_argument(
    "--protocol",
    choices=PROTOCOLS,
    help="ours (the default: e.g. selection on a validation split held out from training) "
    "or official (what the authors' trainers do: celeba, qm9, nyuv2, cityscapes; "
    "experiments/README.md lists the differences)",
  )
  p.add_argument(
    "--option",
    "-O",
    action="append",
    metavar="NAME=VALUE",
    help="benchmark data or model option, repeatable (e.g. regression_scale=0.1 "
    "for multidigits, imbalance=100 for sines)",
  )
  p.add_argument(
    "--data-dir",
    metavar="DIR",
    help="where the benchmark's data lives (tfds data_dir, or the MTAN layout's root)",
  )


def add_method_flags(p: argparse.ArgumentParser, *, many: bool, default_method: str = "ntkmtl"):
  """Which methods and seeds: --methods/--seeds (many) or --method/--seed, and --hp."""
  if many:
    p.add_argument(
      "--methods",
      "-m",
      metavar="LIST",
      help="comma-separated method names, or all (stl runs one model per task); see `ntkmtl list`",
    )
    p.add_argument(
      "--seeds", default="0,1,2", metavar="LIST", help="comma-separated seeds (default: 0,1,2)"
    )
    p.add_argument(
      "--hp",
      action="append",
      metavar="METHOD.NAME=VALUE",
      help="method hyper-parameter, repeatable (e.g. ntkmtl.exponent=0.75)",
    )
  else:
    p.add_argument(
      "--method",
      "-m",
      default=default_method,
      help=f"method name (default: {default_method}); see `ntkmtl list`",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument(
      "--hp",
      action="append",
      metavar="NAME=VALUE",
      help="method hyper-parameter, repeatable (e.g. exponent=0.75)",
    )


def add_training_flags(p: argparse.ArgumentParser):
  """How to train: the run's length, optimiser, schedule, clipping and task passes."""
  p.add_argument("--steps", type=int, help="train steps per run (default: the preset's)")
  p.add_argument("--epochs", type=int, help="epochs per run (default: the preset's)")
  p.add_argument("--batch-size", type=int, help="mini-batch size (default: the preset's)")
  p.add_argument("--lr", type=float, help="learning rate (default: the preset's)")
  p.add_argument(
    "--optimizer",
    choices=OPTIMIZERS,
    help="optimiser after the task aggregation (default: the preset's, adam)",
  )
  p.add_argument(
    "--schedule", choices=SCHEDULES, help="per-epoch learning-rate schedule (default: the preset's)"
  )
  p.add_argument(
    "--max-grad-norm",
    type=float,
    default=None,
    help="clip the shared update's global norm to this before the optimiser "
    "(default: the preset's; 0 turns clipping off)",
  )
  p.add_argument(
    "--task-passes",
    choices=PASSES,
    help="how the task backward passes loop (default: auto, the backend's measured choice)",
  )
  p.add_argument(
    "--materialize",
    choices=tuple(MATERIALIZE),
    help="hold the k task gradients together (yes) or stream their statistics "
    "and run one weighted backward (no); default auto",
  )


def add_output_flags(p: argparse.ArgumentParser, *, checkpoints: bool = True, plots: bool = True):
  """Where results go and what is shown."""
  p.add_argument(
    "--workdir",
    "-w",
    metavar="DIR",
    help="results, reports and each run's checkpoints (WORKDIR/<method>-seed<s>); "
    "default: runs/<benchmark>-<command>-<time>",
  )
  if checkpoints:
    p.add_argument("--resume", action="store_true", help="continue the runs that --workdir holds")
    p.add_argument(
      "--overwrite",
      action="store_true",
      help="discard unfinished runs that --workdir holds (finished ones are kept)",
    )
  if plots:
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
  p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
  p.add_argument(
    "--no-compilation-cache",
    action="store_true",
    help="do not keep compiled steps on disk for the next run ($NTKMTL_CACHE_DIR, "
    "else ~/.cache/ntkmtl-jax/xla)",
  )


def benchmark_config(args) -> Config:
  """The preset's `Config` with --option and --data-dir (no data read yet)."""
  from ntkmtl_jax import benchmarks

  if canonical(args.benchmark) not in benchmarks.benchmark_names():
    raise UsageError(
      f"unknown benchmark {args.benchmark!r} (known: "
      f"{', '.join(benchmarks.benchmark_names())}, mt10)"
    )
  options = key_values(args.option, "--option")
  if "data_dir" in options:
    raise UsageError("give the data directory as --data-dir DIR, not as an --option")
  protocol = getattr(args, "protocol", None) or "ours"
  try:
    defaults = benchmarks.get_config(args.benchmark, args.preset, protocol=protocol)
  except ValueError as e:
    raise UsageError(str(e)) from e
  for name, value in options.items():
    default = {**defaults.data, **defaults.model}.get(name)
    if isinstance(default, tuple) and not isinstance(value, tuple):
      raise UsageError(
        f"--option {name} takes a JSON list such as {name}={json.dumps(list(default))}, "
        f"got {value!r}"
      )
  try:
    return benchmarks.get_config(
      args.benchmark,
      args.preset,
      data_dir=args.data_dir,
      protocol=protocol,
      **options,
    )
  except ValueError as e:
    raise UsageError(str(e)) from e


def build_benchmark(config: Config):
  """The benchmark `config` names; a bad option is a `UsageError`."""
  from ntkmtl_jax import benchmarks

  from ntkmtl_jax.data.validation import DataFileError

  try:
    return benchmarks.from_config(config)
  except DataFileError:
    raise  # names the file and the fix itself
  except (TypeError, ValueError) as e:
    raise UsageError(f"bad option for benchmark {config.benchmark!r}: {e}") from e
  except FileNotFoundError as e:  # a paper benchmark whose data is not there
    raise UsageError(f"{e}\n  (give the data's directory with --data-dir DIR)") from e


def training_config(args, config: Config, num_train: int) -> Config:
  """`config` with the training flags applied and checked against the training split."""
  changes = {}
  for flag, field in (
    ("batch_size", "batch_size"),
    ("lr", "learning_rate"),
    ("optimizer", "optimizer"),
    ("schedule", "lr_schedule"),
    ("task_passes", "task_passes"),
    ("epochs", "num_epochs"),
  ):
    if getattr(args, flag, None) is not None:
      changes[field] = getattr(args, flag)
  if getattr(args, "materialize", None) is not None:
    changes["materialize"] = MATERIALIZE[args.materialize]
  if args.steps is not None:
    changes.update(max_steps=args.steps, num_epochs=args.epochs)
  if args.max_grad_norm is not None:
    if not 0 <= args.max_grad_norm < math.inf:
      raise UsageError(
        f"--max-grad-norm must be a finite norm >= 0 (0: no clipping), got {args.max_grad_norm}"
      )
    changes["max_grad_norm"] = args.max_grad_norm or None
  merged = {**dataclasses.asdict(config), **changes}
  if (
    any(v is not None and v <= 0 for v in (merged["max_steps"], merged["num_epochs"]))
    or merged["batch_size"] < 1
    or not 0 < merged["learning_rate"] < math.inf
  ):
    raise UsageError("--steps, --epochs, --batch-size and --lr must be positive (and --lr finite)")
  try:
    config = config.replace(**changes)
  except ValueError as e:
    raise UsageError(str(e)) from e
  if config.batch_size > num_train:
    raise UsageError(
      f"--batch-size {config.batch_size} is larger than the training split ({num_train} examples)"
    )
  return config
