"""The `ntkmtl` commands: compare, train, spectrum and list (each `cmd_<name>(args) -> status`)."""

from __future__ import annotations

import dataclasses
import datetime
import os

from ntkmtl_jax._names import canonical
from ntkmtl_jax.cli import flags, runs
from ntkmtl_jax.cli.flags import UsageError


def _output_dir(args, command: str) -> str:
  """--workdir, or a new folder runs/<benchmark>-<command>-<time>[-n] that no other run has;
  proven to take files (`io.check_writable`: no symlink in it is written through). One that
  cannot be made or written is refused as a bad argument, before anything runs."""
  from ntkmtl_jax import io

  out = args.workdir
  try:
    if out is None:
      stamp = f"{args.benchmark}-{command}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
      io.check_writable("runs")
      for n in range(1, 10_000):  # makedirs without exist_ok: atomic, one winner per name
        out = os.path.join("runs", stamp if n == 1 else f"{stamp}-{n}")
        try:
          os.makedirs(out)
          break
        except FileExistsError:
          continue
        except OSError as error:
          raise io.write_error(out, error, what="the output directory") from None
    return io.check_writable(out)
  except io.OutputWriteError as error:
    raise UsageError(str(error)) from None


def _require_plots():
  from ntkmtl_jax._optional import require

  require("matplotlib", "plots", "the PNG plots (or pass --no-plots)")


def _compare_hparams(args, names: list[str]) -> dict[str, dict]:
  per_method: dict[str, dict] = {}
  for key, value in flags.key_values(args.hp, "--hp").items():
    method, dot, name = key.partition(".")
    if not dot:
      raise UsageError(f"--hp for compare must look like METHOD.NAME=VALUE, got {key!r}")
    per_method.setdefault(canonical(method), {})[name] = value
  stray = sorted(set(per_method) - set(names))
  if stray:
    raise UsageError(
      f"--hp names {', '.join(stray)}, which is not among the methods run ({', '.join(names)})"
    )
  return per_method


def _methods_seeds_hparams(args, command: str):
  if command == "compare":
    names = flags.method_list(args.methods.split(",")) if args.methods else runs.default_methods()
    return names, flags.seed_list(args.seeds), _compare_hparams(args, names)
  [name] = flags.method_list([args.method])
  if args.seed < 0:
    raise UsageError(f"--seed must be >= 0, got {args.seed}")
  return [name], [args.seed], {name: flags.key_values(args.hp, "--hp")}


def _run(args, command: str) -> int:
  """`ntkmtl train` and `ntkmtl compare`: the plan, checked, run and reported."""
  names, seeds, hparams = _methods_seeds_hparams(args, command)
  if canonical(args.benchmark) == "mt10":
    return _run_mt10(args, names, seeds, hparams)
  config = flags.benchmark_config(args)
  bench = flags.build_benchmark(config)
  base = flags.training_config(args, config, len(bench.train))
  from ntkmtl_jax import loop

  steps = loop.run_length(bench, base)[2]
  if not base.probe_every:  # eigenvalue tracks for the plots, about 20 points per run
    base = base.replace(probe_every=max(1, steps // 20))
  plan = runs.plan_runs(base, names, seeds, hparams, bench.num_tasks)
  runs.validate_plan(bench, plan)
  if not args.no_plots:
    _require_plots()
  out = _output_dir(args, command)
  print(
    f"ntkmtl {command}: {bench.name} ({bench.description}); {len(plan)} run(s) of {steps} "
    f"steps, protocol {base.protocol}; writing to {out}",
    flush=True,
  )
  report_config = dict(
    command=command,
    benchmark=bench.name,
    preset=args.preset,
    protocol=base.protocol,
    options=flags.key_values(args.option, ""),
    methods=names,
    seeds=seeds,
    steps=steps,
    batch_size=base.batch_size,
    hparams=hparams,
    run=dataclasses.asdict(base),
  )
  from ntkmtl_jax.checkpoints import RunMismatchError
  from ntkmtl_jax.locking import workdir_lock

  try:
    with workdir_lock(out):
      code, _ = runs.run_all(
        bench,
        plan,
        out=out,
        report_config=report_config,
        title=f"{bench.name}: {bench.description}; {steps} steps, protocol {base.protocol}",
        progress=not args.quiet,
        plots=not args.no_plots,
        resume=args.resume,
        overwrite=args.overwrite,
      )
  except RunMismatchError as error:
    raise UsageError(str(error)) from None
  return code


# Flags of the supervised loop that MT10's SAC does not have (its own are --option fields).
_NOT_FOR_MT10 = (
  "epochs",
  "batch_size",
  "lr",
  "optimizer",
  "schedule",
  "max_grad_norm",
  "task_passes",
  "materialize",
  "data_dir",
  "protocol",
)


def _run_mt10(args, names: list[str], seeds: list[int], hparams: dict[str, dict]) -> int:
  """MT10 (multi-task SAC on Meta-World; its own loop, `ntkmtl_jax.benchmarks.mt10`)."""
  from ntkmtl_jax.benchmarks import mt10

  given = [f"--{f.replace('_', '-')}" for f in _NOT_FOR_MT10 if getattr(args, f, None) is not None]
  if given:
    raise UsageError(
      f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to "
      "mt10 (its one protocol is the paper's MTRL setting); set MT10Config fields with "
      "--option NAME=VALUE (e.g. actor_lr=3e-4, batch_size_per_task=128)"
    )
  try:
    config = mt10.get_config(args.preset)
    options = flags.key_values(args.option, "--option")
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(options) - fields)
    if unknown:
      raise UsageError(
        f"unknown MT10 option(s) {', '.join(unknown)} (MT10Config fields: "
        f"{', '.join(sorted(fields))})"
      )
    if args.steps is not None:
      options["num_train_steps"] = args.steps
    method_hparams = {
      **config.method_hparams,
      **{m: {**config.method_hparams.get(m, {}), **hp} for m, hp in hparams.items() if hp},
    }
    config = config.replace(**options, method_hparams=method_hparams)
  except ValueError as e:
    raise UsageError(str(e)) from e
  mt10.run(config, names, seeds, args.workdir, progress=not args.quiet)
  return 0


def cmd_compare(args) -> int:
  return _run(args, "compare")


def cmd_train(args) -> int:
  return _run(args, "train")


def cmd_spectrum(args) -> int:
  import jax
  import numpy as np

  from ntkmtl_jax import io, kernel, loop, spectra

  [method] = flags.method_list([args.method])
  config = flags.benchmark_config(args)
  bench = flags.build_benchmark(config)
  config = flags.training_config(args, config, len(bench.train))
  batch_size = config.batch_size
  if args.chunks < 1 or batch_size % args.chunks:
    raise UsageError(f"--chunks must divide the batch size ({batch_size})")
  out = _output_dir(args, "spectrum") if args.workdir else None
  fns = bench.functions
  data = bench.train_data(args.seed, batch_size)
  if args.train_steps > 0:
    result = loop.fit(
      bench,
      config.replace(
        method=method,
        seed=args.seed,
        max_steps=args.train_steps,
        num_epochs=None,
        probe_every=0,
        hparams={"task": 0} if method == "stl" else {},
      ),
      progress=not args.quiet,
    )
    params, model_state = result.params, result.model_state
  else:
    params, model_state = fns.init(jax.random.key(args.seed), next(data))
  batch = next(data)
  losses = lambda p, b: fns.loss_fn(p, model_state, b)[0]
  ntk = kernel.ntk_weights(
    losses, params, batch, num_chunks=args.chunks, shared=fns.shared, return_blocks=True
  )
  blocks = np.asarray(ntk.blocks, np.float64)  # (k, k, n, n)
  cosine = np.asarray(spectra.task_affinity(blocks, "cosine"))
  z, _ = fns.encode(params, model_state, batch)
  sr_eig, _ = kernel.representation_eigenvalues(
    fns.decode, params, z, batch, num_chunks=args.chunks
  )
  lam = np.asarray(ntk.eigenvalues, np.float64)
  names = bench.task_names
  width = max(len(n) for n in names) + 2
  print(
    f"{bench.name}: batch {batch_size}, n = {args.chunks} chunks, after "
    f"{args.train_steps} {method} steps, seed {args.seed}"
  )
  print(f"{'task':<{width}}{'loss':>12}{'lambda_i':>14}{'NTKMTL w_i':>13}{'lambda_i(z)':>14}")
  for i, n in enumerate(names):
    print(
      f"{n:<{width}}{float(np.mean(ntk.losses[i])):>12.4g}{lam[i]:>14.4g}"
      f"{float(ntk.weights[i]):>13.4g}{float(sr_eig[i]):>14.4g}"
    )
  print(f"imbalance max/min lambda_i: {float(spectra.imbalance(lam)):.3g}")
  print("task affinity (cosine of the task gradients over the chunks, spectra.task_affinity):")
  print(" " * width + "".join(f"{n:>10}" for n in names))
  for i, n in enumerate(names):
    print(f"{n:<{width}}" + "".join(f"{cosine[i, j]:>10.3f}" for j in range(len(names))))
  if out:
    path = os.path.join(out, "spectrum.json")
    io.write_json(
      path,
      dict(
        benchmark=bench.name,
        task_names=list(names),
        chunks=args.chunks,
        train_steps=args.train_steps,
        method=method,
        seed=args.seed,
        eigenvalues=lam.tolist(),
        weights=np.asarray(ntk.weights).tolist(),
        representation_eigenvalues=np.asarray(sr_eig).tolist(),
        cosine=cosine.tolist(),
        blocks=blocks.tolist(),
      ),
    )
    print(f"Wrote {path}")
  return 0


def cmd_list(args) -> int:
  del args
  from ntkmtl_jax import benchmarks, methods

  print("Benchmarks (--benchmark NAME [--preset P]):")
  for name in benchmarks.benchmark_names():
    presets = ", ".join(benchmarks.preset_names(name))
    print(f"  {name:<14}{benchmarks.describe(name)} [presets: {presets}]")
  print(
    f"  {'mt10':<14}Meta-World MT10, multi-task SAC (the rl extra) [presets: default, short, tiny]"
  )
  print("Methods (--methods a,b,c; --hp METHOD.NAME=VALUE):")
  for name in methods.names():
    hps = ", ".join(f"{k}={v!r}" for k, v in methods.defaults(name).items() if k != "shared")
    print(f"  {name:<14}{hps}")
  return 0


COMMANDS = dict(compare=cmd_compare, train=cmd_train, spectrum=cmd_spectrum, list=cmd_list)
