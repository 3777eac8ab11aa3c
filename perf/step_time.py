"""Step time, compile time and memory of multi-task methods, as ratios to LS in one run.

    python perf/step_time.py                  # CelebA net at batch 8 and 32, small MLP
    python perf/step_time.py --quick          # small MLP only
    python perf/step_time.py --methods all    # also one row per registered method
    python perf/step_time.py --k-sweep        # CelebA net with k = 5, 10, 20, 40 tasks

For each model and batch size it times LS, NTKMTL (n = 1) with each strategy for the k task
backward passes, NTKMTL (n = 4) and NTKMTL-SR (n = 4), and (with --methods) the baselines of
the registry with their default strategy. Times are medians over --repeats steps after one
compile. Memory is XLA's buffer assignment for the compiled step (arguments + outputs +
temporaries, `compiled.memory_analysis()`), which is what the step asks the device for.
Configurations whose compiled step needs more than --max-gib are reported, not run.

--k-sweep keeps the CelebA network and batch (--k-sweep-batch, 8 by default) and varies the
number of tasks: LS, NTKMTL (n = 1, default strategy) and NTKMTL-SR (n = 4). NTKMTL's k task
backward passes make its step grow at most linearly in k (the forward pass and the
optimiser are shared); NTKMTL-SR's one backward pass keeps it flat, like LS.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# XLA:CPU's default scheduler optimises for concurrency and runs the k task backward passes
# side by side, which defeats the streaming strategy's memory bound; the memory-minimising
# scheduler keeps it (and costs no time here). Must be set before jax starts.
if "--concurrency-scheduler" not in sys.argv:
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
  ).strip()

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ntkmtl_jax as nm
from ntkmtl_jax.models.celeba import celeba_functions
from ntkmtl_jax.models.multitask import LinearHeads, task_functions


def mlp_functions(num_tasks: int):
  import flax.linen as nn

  class Encoder(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
      for width in (256, 256):
        x = nn.relu(nn.Dense(width)(x))
      return x

  return task_functions(
    Encoder(), LinearHeads(num_tasks), lambda out, b: jnp.mean((out - b["y"]) ** 2, axis=0)
  )


def make_case(name: str, batch_size: int, seed: int = 0, num_tasks: int | None = None):
  rng = np.random.default_rng(seed)
  if name == "celeba":
    k = 40 if num_tasks is None else num_tasks
    fns = celeba_functions(k)
    batch = {
      "x": jnp.asarray(rng.normal(size=(batch_size, 64, 64, 3)), jnp.float32),
      "y": jnp.asarray(rng.integers(0, 2, size=(batch_size, k)), jnp.float32),
    }
  else:
    k = 10
    fns = mlp_functions(k)
    batch = {
      "x": jnp.asarray(rng.normal(size=(batch_size, 64)), jnp.float32),
      "y": jnp.asarray(rng.normal(size=(batch_size, k)), jnp.float32),
    }
  params, model_state = fns.init(jax.random.key(seed), batch)
  return k, fns, params, model_state, batch


def configurations(k, shared, methods):
  rows = [("LS", lambda: nm.methods.get("ls", k, shared=shared), "unroll")]
  for strategy in ("unroll", "vmap", "chunked", "streaming", "sequential"):
    rows.append((f"NTKMTL n=1 {strategy}", lambda: nm.official_ntkmtl(k, shared)[0], strategy))
  for strategy in ("unroll", "streaming", "sequential"):
    rows.append(
      (f"NTKMTL n=4 {strategy}", lambda: nm.ntkmtl(k, num_chunks=4, shared=shared), strategy)
    )
  for strategy in ("unroll", "streaming", "sequential"):  # a Gram method
    rows.append((f"MGDA {strategy}", lambda: nm.methods.get("mgda", k, shared=shared), strategy))
  rows.append(("NTKMTL-SR n=4", lambda: nm.ntkmtl_sr(k, num_chunks=4, shared=shared), "auto"))
  for name in methods:
    if name in ("ls", "ntkmtl", "ntkmtl_sr", "mgda"):
      continue
    rows.append((name, lambda name=name: nm.methods.get(name, k, shared=shared), "auto"))
  return rows


def measure(fns, agg, strategy, params, model_state, batch, repeats, max_bytes):
  step = nm.make_train_step(
    fns.loss_fn,
    agg,
    optax.chain(nm.clip_shared_by_global_norm(1.0, fns.shared), optax.adam(3e-4)),
    strategy=strategy,
    has_state=True,
    encode=fns.encode,
    decode=fns.decode,
  )
  state = step.init(params, model_state)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  total = None
  if mem is not None:
    total = (
      mem.argument_size_in_bytes
      + mem.output_size_in_bytes
      + mem.temp_size_in_bytes
      - mem.alias_size_in_bytes
    )
  if total is not None and total > max_bytes:
    return dict(compile_s=compile_s, bytes=total, times=None)
  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  times, cpu_times = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
    cpu_times.append(time.process_time() - c0)
  return dict(compile_s=compile_s, bytes=total, times=times, cpu_times=cpu_times)


def torch_reference(python: str, batch_size: int, repeats: int, device: str = "cpu") -> dict:
  """Median step times of the PyTorch reference (LS, official NTKMTL) at `batch_size`."""
  import json
  import subprocess

  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pytorch_reference.py")
  out = subprocess.run(
    [python, script, "--batch", str(batch_size), "--repeats", str(repeats), "--device", device],
    capture_output=True,
    text=True,
  )
  if out.returncode:
    print(f"PyTorch reference failed: {out.stderr.strip().splitlines()[-1:]}")
    return {}
  return json.loads(out.stdout.strip().splitlines()[-1])


def k_sweep(ks, batch_size, repeats, max_bytes):
  """The CelebA network with k tasks: LS, NTKMTL n=1 and NTKMTL-SR, and their growth in k."""
  rows = (
    ("LS", lambda k, shared: nm.methods.get("ls", k, shared=shared)),
    ("NTKMTL n=1", lambda k, shared: nm.official_ntkmtl(k, shared)[0]),
    ("NTKMTL-SR n=4", lambda k, shared: nm.ntkmtl_sr(k, num_chunks=4, shared=shared)),
  )
  # On a CPU shared with other work the wall time of a step varies with the load; the CPU
  # time the process spends (all XLA threads) measures the step's work and does not.
  on_cpu = jax.default_backend() == "cpu"
  basis = "CPU s" if on_cpu else "step s"
  print(
    f"k sweep: CelebA network, batch {batch_size}; '/ LS', 'x k0' (over the smallest k) "
    f"compare {basis}; 'k / k0' is what linear growth would give"
  )
  header = (
    f"{'tasks':>6}  {'method':<16}{'step s':>9}{'CPU s':>9}{'/ LS':>8}{'x k0':>8}"
    f"{'k / k0':>8}{'compile s':>11}{'memory MiB':>12}"
  )
  print(header)
  print("-" * len(header))
  first = {}
  for k in ks:
    _, fns, params, model_state, batch = make_case("celeba", batch_size, num_tasks=k)
    ls = None
    for label, make in rows:
      try:
        r = measure(
          fns, make(k, fns.shared), "auto", params, model_state, batch, repeats, max_bytes
        )
      except Exception as e:  # report and go on: one failing row must not lose the table
        print(f"{k:>6}  {label:<16}failed: {type(e).__name__}: {str(e)[:60]}", flush=True)
        continue
      mib = r["bytes"] / 2**20 if r["bytes"] is not None else float("nan")
      if r["times"] is None:
        print(f"{k:>6}  {label:<16}{'not run: needs':>17} {mib:>8.0f} MiB", flush=True)
        continue
      med, cpu = statistics.median(r["times"]), statistics.median(r["cpu_times"])
      value = cpu if on_cpu else med
      ls = value if ls is None else ls
      k0, v0 = first.setdefault(label, (k, value))
      print(
        f"{k:>6}  {label:<16}{med:>9.3f}{cpu:>9.3f}{value / ls:>8.2f}{value / v0:>8.2f}"
        f"{k / k0:>8.1f}{r['compile_s']:>11.1f}{mib:>12.0f}",
        flush=True,
      )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="small MLP only")
  parser.add_argument(
    "--concurrency-scheduler",
    action="store_true",
    help="keep XLA:CPU's default (concurrency-optimised) scheduler",
  )
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument(
    "--max-gib",
    type=float,
    default=12.0,
    help="do not run a configuration whose compiled step needs more",
  )
  parser.add_argument(
    "--methods", default="", help="'all' or a comma-separated list of registry names to add as rows"
  )
  parser.add_argument(
    "--cases", default="", help="comma-separated, e.g. celeba:8,celeba:32,mlp:256"
  )
  parser.add_argument(
    "--torch-python",
    default="",
    help="a Python with torch: adds the PyTorch reference step's rows "
    "(perf/pytorch_reference.py) for the CelebA cases",
  )
  parser.add_argument(
    "--torch-device",
    choices=("auto", "cpu", "cuda"),
    default="auto",
    help="where the PyTorch reference runs; auto: cuda when jax runs on a GPU, else cpu",
  )
  parser.add_argument(
    "--k-sweep",
    nargs="?",
    const="5,10,20,40",
    default="",
    help="instead of the cases: the CelebA network with these numbers of "
    "tasks (default 5,10,20,40)",
  )
  parser.add_argument("--k-sweep-batch", type=int, default=8)
  parser.add_argument(
    "--skip",
    default="chunked@celeba:8,chunked@celeba:32",
    help="comma-separated 'label-substring@case' to report but not run",
  )
  args = parser.parse_args(argv)
  methods = (
    nm.methods.names() if args.methods == "all" else [m for m in args.methods.split(",") if m]
  )
  if args.cases:
    cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",")]
  elif args.quick:
    cases = [("mlp", 256)]
  else:
    cases = [("celeba", 8), ("celeba", 32), ("mlp", 256)]
  skips = [s.split("@") for s in args.skip.split(",") if s]

  print(
    f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}), "
    f"default strategy: {nm.default_strategy()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
  )
  header = (
    f"{'model':<10}{'batch':>6}  {'method':<24}{'step s':>9}{'/ LS':>8}"
    f"{'compile s':>11}{'memory MiB':>12}{'/ LS':>7}"
  )
  torch_device = args.torch_device
  if torch_device == "auto":
    torch_device = "cuda" if jax.default_backend() == "gpu" else "cpu"
  if args.k_sweep:
    k_sweep(
      [int(k) for k in args.k_sweep.split(",")],
      args.k_sweep_batch,
      args.repeats,
      args.max_gib * 2**30,
    )
    return 0
  print(header)
  print("-" * len(header))
  for model, bs in cases:
    k, fns, params, model_state, batch = make_case(model, bs)
    ls = None
    for label, make, strategy in configurations(k, fns.shared, methods):
      case = f"{model}:{bs}"
      if any(sub in label and case == where for sub, where in skips):
        print(f"{model:<10}{bs:>6}  {label:<24}{'not run (--skip)':>37}", flush=True)
        continue
      try:
        r = measure(
          fns, make(), strategy, params, model_state, batch, args.repeats, args.max_gib * 2**30
        )
      except Exception as e:  # report and go on: one failing row must not lose the table
        print(
          f"{model:<10}{bs:>6}  {label:<24}failed: {type(e).__name__}: {str(e)[:60]}", flush=True
        )
        continue
      mib = r["bytes"] / 2**20 if r["bytes"] is not None else float("nan")
      if r["times"] is None:
        print(
          f"{model:<10}{bs:>6}  {label:<24}{'not run: needs':>17} {mib:>8.0f} MiB"
          f"{r['compile_s']:>11.1f}",
          flush=True,
        )
        continue
      med = statistics.median(r["times"])
      if ls is None:
        ls = (med, mib)
      print(
        f"{model:<10}{bs:>6}  {label:<24}{med:>9.3f}{med / ls[0]:>8.2f}"
        f"{r['compile_s']:>11.1f}{mib:>12.0f}{mib / ls[1]:>7.2f}",
        flush=True,
      )
    if args.torch_python and model == "celeba" and ls is not None:
      reference = torch_reference(args.torch_python, bs, args.repeats, torch_device)
      for key, label in (("ls", "PyTorch LS"), ("ntkmtl", "PyTorch NTKMTL n=1")):
        if key in reference:
          print(
            f"{model:<10}{bs:>6}  {label:<24}{reference[key]:>9.3f}{reference[key] / ls[0]:>8.2f}",
            flush=True,
          )
  return 0


if __name__ == "__main__":
  sys.exit(main())
