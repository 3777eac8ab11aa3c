"""Meta-World MT10 environment steps and multi-task SAC updates per second, per method.

    python perf/mt10_throughput.py [--methods ls,ntkmtl,nash_mtl] [--updates 10]
        [--batch-per-task 128] [--env-steps 300]

One environment step steps the ten tasks once (random actions); one update is the critic,
actor, temperature and targets of the paper's networks. It prints a Markdown table;
compilation is timed separately and excluded from the rates.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from ntkmtl_jax.benchmarks.mt10 import environments, sac
from ntkmtl_jax.benchmarks.mt10.config import get_config


def env_steps_per_second(num_steps: int, seed: int = 0) -> tuple[float, float]:
  """(vector steps/s, seconds to build the ten environments)."""
  t0 = time.perf_counter()
  env = environments.make_mt10_env(seed)
  build = time.perf_counter() - t0
  env.reset(seed=seed)
  rng = np.random.default_rng(seed)
  t0 = time.perf_counter()
  for _ in range(num_steps):
    env.step(rng.uniform(-1, 1, (env.num_envs, 4)).astype(np.float32))
  rate = num_steps / (time.perf_counter() - t0)
  env.close()
  return rate, build


def updates_per_second(
  method: str, num_updates: int, batch_per_task: int, config_name: str = "default"
) -> tuple[float, float]:
  """(updates/s after compilation, compile + first update seconds) on random transitions."""
  config = get_config(config_name).replace(method=method, batch_size_per_task=batch_per_task)
  n, obs_dim, action_dim = environments.NUM_TASKS, 49, 4
  agent = sac.make_agent(config, obs_dim, action_dim, n)
  state = agent.init(jax.random.key(0))
  buffer = environments.MultiTaskReplayBuffer(n, 1000, obs_dim, action_dim, seed=0)
  rng = np.random.default_rng(0)
  for _ in range(1000):
    obs = rng.normal(size=(n, obs_dim)).astype(np.float32)
    buffer.add(obs, rng.uniform(-1, 1, (n, action_dim)), rng.normal(size=n), obs, np.ones(n))
  t0 = time.perf_counter()
  state, metrics = agent.update(state, buffer.sample(batch_per_task))
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(num_updates):
    state, metrics = agent.update(state, buffer.sample(batch_per_task))
  jax.block_until_ready(metrics)
  return num_updates / (time.perf_counter() - t0), compile_s


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(
    prog="python perf/mt10_throughput.py",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--methods", default="ls,ntkmtl,nash_mtl")
  p.add_argument("--updates", type=int, default=10)
  p.add_argument("--batch-per-task", type=int, default=128)
  p.add_argument("--env-steps", type=int, default=300)
  args = p.parse_args(argv)
  env_rate, build_s = env_steps_per_second(args.env_steps)
  rows = []
  for method in args.methods.split(","):
    rate, compile_s = updates_per_second(method, args.updates, args.batch_per_task)
    # A training step = one vector env step + one update (+ acting, negligible here).
    step_rate = 1.0 / (1.0 / env_rate + 1.0 / rate)
    rows.append(
      dict(
        method=method,
        updates_per_s=rate,
        compile_s=compile_s,
        train_steps_per_s=step_rate,
        hours_for_2m_steps=2_000_000 / step_rate / 3600,
      )
    )
  print(
    f"\n{jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} CPUs, "
    f"batch {10 * args.batch_per_task} ({args.batch_per_task} per task), 3x400 networks"
  )
  print(
    f"MT10 env: {env_rate:.0f} vector steps/s ({10 * env_rate:.0f} transitions/s); "
    f"building the ten environments took {build_s:.1f} s\n"
  )
  print(
    "| method | updates/s | compile + first update (s) | train steps/s (env + update) "
    "| hours for 2M steps |"
  )
  print("| --- | --- | --- | --- | --- |")
  for r in rows:
    print(
      f"| {r['method']} | {r['updates_per_s']:.2f} | {r['compile_s']:.1f} | "
      f"{r['train_steps_per_s']:.2f} | {r['hours_for_2m_steps']:.0f} |"
    )
  return rows


if __name__ == "__main__":
  main()
