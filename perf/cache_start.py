"""First vs second start of a jitted multi-task step with the persistent compilation cache.

    python perf/cache_start.py            # two fresh processes on one empty cache folder

Each process enables `ntkmtl_jax.compilation_cache` in the same folder, builds the NTKMTL
(n = 1) train step of a small multi-task MLP, and times its first call (trace, compile or
cache read, run). The first process compiles and writes the cache; the second reads it.
Prints one line per process and the cache hits jax reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def one_start(tasks: int, batch: int) -> dict:
  t_start = time.perf_counter()
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import ntkmtl_jax as nm
  from ntkmtl_jax import compilation_cache
  from ntkmtl_jax.models.mlp import MLPEncoder
  from ntkmtl_jax.models.multitask import LinearHeads, task_functions

  compilation_cache.enable()
  hits = []
  jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None
  )
  fns = task_functions(
    MLPEncoder((256, 256)), LinearHeads(tasks), lambda out, b: jnp.mean((out - b["y"]) ** 2, axis=0)
  )
  rng = np.random.default_rng(0)
  data = {
    "x": jnp.asarray(rng.normal(size=(batch, 64)), jnp.float32),
    "y": jnp.asarray(rng.normal(size=(batch, tasks)), jnp.float32),
  }
  params, model_state = fns.init(jax.random.key(0), data)
  agg, clip = nm.official_ntkmtl(tasks, fns.shared)
  step = nm.make_train_step(
    fns.loss_fn,
    agg,
    optax.chain(clip, optax.adam(1e-3)),
    has_state=True,
    encode=fns.encode,
    decode=fns.decode,
  )
  state = step.init(params, model_state)
  t0 = time.perf_counter()
  state, metrics = step(state, data)
  jax.block_until_ready(metrics)
  first_call = time.perf_counter() - t0
  return {
    "first_call_s": first_call,
    "process_s": time.perf_counter() - t_start,
    "cache_hits": len(hits),
    "cache_dir": compilation_cache.directory(),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tasks", type=int, default=10)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--cache-dir", default="", help="default: a new temporary folder")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(one_start(args.tasks, args.batch)))
    return 0
  folder = args.cache_dir or tempfile.mkdtemp(prefix="ntkmtl-xla-cache-")
  env = dict(os.environ, NTKMTL_CACHE_DIR=folder)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
  print(
    f"cache folder {folder}; NTKMTL n=1 step, MLP 64-256-256, {args.tasks} tasks, "
    f"batch {args.batch}"
  )
  print(f"{'start':<8}{'first step s':>14}{'process s':>11}{'cache hits':>12}{'files':>7}")
  for name in ("first", "second"):
    out = subprocess.run(
      [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        "--tasks",
        str(args.tasks),
        "--batch",
        str(args.batch),
      ],
      env=env,
      capture_output=True,
      text=True,
      check=True,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(
      f"{name:<8}{r['first_call_s']:>14.2f}{r['process_s']:>11.2f}{r['cache_hits']:>12}"
      f"{len(os.listdir(folder)):>7}",
      flush=True,
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
