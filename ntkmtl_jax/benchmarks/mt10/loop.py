"""The MT10 training loop (MTRL's order: act, update, step the ten environments), periodic
evaluation, checkpoints of the agent with the replay buffer (`ntkmtl_jax.checkpoints`),
`train_and_evaluate` (one run) and `run` (methods x seeds, then the summary)."""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from ntkmtl_jax import checkpoints
from ntkmtl_jax.interrupt import StopRequests, Terminated
from ntkmtl_jax.locking import workdir_lock
from ntkmtl_jax.benchmarks.mt10 import environments, report, sac
from ntkmtl_jax.benchmarks.mt10.config import MT10Config

CHECKPOINT_DIR = "checkpoints"


def evaluate(agent: sac.Agent, actor_params, env, num_episodes: int,
             max_episode_steps: int, seed: int | None = None) -> dict:
  """Runs the deterministic policy (tanh of the mean) for `num_episodes` per task.

  A task's episode succeeds when Meta-World reports `success` at any step of it (MTRL).

  Returns:
    dict with per-task `success` and `return` (means over the episodes), and their means.
  """
  num_tasks = env.num_envs
  successes, returns = np.zeros(num_tasks), np.zeros(num_tasks)
  for episode in range(num_episodes):
    obs, _ = env.reset(seed=None if seed is None else seed + episode)
    success, total, alive = np.zeros(num_tasks, bool), np.zeros(num_tasks), np.ones(num_tasks, bool)
    for _ in range(max_episode_steps):
      action = np.asarray(agent.act_deterministic(actor_params, obs))
      obs, reward, terminated, truncated, info = env.step(action)
      success |= environments.step_success(info, num_tasks) & alive
      total += np.where(alive, reward, 0.0)
      alive &= ~(terminated | truncated)
      if not alive.any():
        break
    successes += success
    returns += total
  successes /= num_episodes
  returns /= num_episodes
  return dict(success=successes.tolist(), mean_success=float(successes.mean()),
              episode_return=returns.tolist(), mean_return=float(returns.mean()))


def checkpoint_manager(workdir: str):
  """The orbax manager of a run's checkpoints, `workdir/checkpoints/<step>/`: the newest kept."""
  return checkpoints.step_manager(os.path.join(workdir, CHECKPOINT_DIR), keep=1)


def save_checkpoint(manager, step: int, state: sac.SACState,
                    buffer: environments.MultiTaskReplayBuffer, history: list) -> None:
  """Writes the agent, the replay buffer (with its sampler's state) and the history as
  checkpoint `step` of `manager` (a `checkpoint_manager`), which then drops the one before."""
  checkpoints.save_step(manager, step, trees=dict(agent=state, replay_buffer=buffer.arrays()),
                        json_items=dict(meta=dict(step=step, history=history,
                                                  replay_sampler=buffer.sampler_state())))


def restore_checkpoint(manager, template: sac.SACState,
                       buffer: environments.MultiTaskReplayBuffer):
  """The newest checkpoint of `manager` as (state, step, history), `buffer` filled from it;
  None when there is none.

  Raises:
    DamagedCheckpointError: the checkpoint cannot be read or does not match the digests
      written with it (MT10 keeps one checkpoint, so there is none to fall back to).
    ValueError: the checkpoint does not restore into this run (another config wrote it).
  """
  step = manager.latest_step()
  if step is None:
    return None
  path = checkpoints.step_path(manager, step)
  try:
    restored = checkpoints.restore_step(
        manager, step, trees=dict(agent=template, replay_buffer=buffer.arrays()),
        json_items=("meta",))
  except checkpoints.DamagedCheckpointError as error:
    raise checkpoints.DamagedCheckpointError(
        f"The checkpoint {path} is damaged: {error}. MT10 keeps one checkpoint, so the run "
        "cannot resume; delete that directory to train from the start (or use another "
        "workdir).") from None
  except Exception as error:
    raise ValueError(f"The checkpoint of step {step} in {manager.directory} does not restore "
                     f"into this run ({checkpoints.short_error(error)}); resume with the config "
                     "that wrote it, or use another workdir.") from error
  meta = restored["meta"]
  buffer.restore(restored["replay_buffer"], meta["replay_sampler"])
  return jax.device_put(restored["agent"]), meta["step"], meta["history"]


# Fields of `MT10Config` that shape the compiled agent; runs that agree on them (other seeds,
# a resumed run with more steps) reuse one agent and skip recompilation.
_AGENT_FIELDS = ("method", "method_hparams", "actor_lr", "critic_lr", "alpha_lr", "hidden_dim",
                 "num_layers", "log_std_bounds", "discount", "init_temperature",
                 "per_task_alpha", "critic_tau", "critic_target_update_freq",
                 "actor_update_freq", "max_grad_norm")
_AGENTS: dict[str, sac.Agent] = {}


def cached_agent(config: MT10Config, obs_dim: int, action_dim: int, num_tasks: int) -> sac.Agent:
  """`sac.make_agent`, built once per distinct agent configuration in this process."""
  key = repr(([getattr(config, f) for f in _AGENT_FIELDS], obs_dim, action_dim, num_tasks))
  if key not in _AGENTS:
    _AGENTS[key] = sac.make_agent(config, obs_dim, action_dim, num_tasks)
  return _AGENTS[key]


def train_and_evaluate(config: MT10Config, workdir: str | None, *, envs=None,
                       progress: bool = True) -> dict:
  """Trains multi-task SAC with `config.method` on MT10 and evaluates it.

  Evaluates at step 0, every `eval_freq` steps and at the end; checkpoints at each
  evaluation (when `workdir` and `config.checkpoint`) and resumes from the latest one
  found in `workdir`: the agent and the replay buffer are restored exactly, the
  environments restart their episodes.

  Args:
    config: an `MT10Config`.
    workdir: where checkpoints and the report (JSON, CSV, PNG, Markdown) go; None keeps
      nothing on disk.
    envs: optional (train_env, eval_env) built by `environments.make_mt10_env`.
    progress: show a tqdm progress bar (steps/s and the latest metrics).

  Returns:
    dict with `history` (one row per evaluation), `final` (the last evaluation),
    `task_names`, `config` and `seconds`.
  """
  start_time = time.time()
  if envs is None:
    env_kwargs = dict(max_episode_steps=config.max_episode_steps,
                      reward_function_version=config.reward_function_version)
    envs = (environments.make_mt10_env(config.seed,
                                       reward_normalization=config.reward_normalization,
                                       **env_kwargs),
            environments.make_mt10_env(config.seed, reward_normalization=None, **env_kwargs))
  env, eval_env = envs
  num_tasks = env.num_envs
  obs_dim = env.single_observation_space.shape[0]
  action_dim = env.single_action_space.shape[0]
  agent = cached_agent(config, obs_dim, action_dim, num_tasks)
  state = agent.init(jax.random.key(config.seed))
  buffer = environments.MultiTaskReplayBuffer(num_tasks, config.replay_capacity_per_task,
                                              obs_dim, action_dim, seed=config.seed)
  start_step, history = 0, []
  manager = checkpoint_manager(workdir) if workdir and config.checkpoint else None
  restored = restore_checkpoint(manager, state, buffer) if manager else None
  if restored:
    state, start_step, history = restored
  warmup_updates = config.init_steps if config.warmup_updates is None else config.warmup_updates
  action_rng = np.random.default_rng(config.seed + 1 + start_step)
  act_key = jax.random.key(config.seed + 2)
  obs, _ = env.reset(seed=config.seed + start_step)
  metrics, last_losses = None, {}
  updates_time, updates_done, env_time = 0.0, 0, 0.0

  def record_evaluation(step):
    result = evaluate(agent, state.actor.params, eval_env, config.num_eval_episodes,
                      config.max_episode_steps, seed=config.seed + 10_000)
    row = dict(step=step, env_steps=step * num_tasks, **result, **last_losses,
               seconds=time.time() - start_time)
    history.append(row)
    return row

  steps = range(start_step, config.num_train_steps)
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(steps, desc=f"MT10 {config.method}", unit="step", initial=start_step,
               total=config.num_train_steps, mininterval=2.0)
    steps = bar

  def _train_step(step):
    nonlocal state, obs, metrics, last_losses, updates_time, updates_done, env_time
    if step % config.eval_freq == 0 and not (history and history[-1]["step"] == step):
      row = record_evaluation(step)
      rate = updates_done / max(updates_time, 1e-9)
      message = (f"step {step}: mean success {row['mean_success']:.2f}, mean return "
                 f"{row['mean_return']:.1f}, updates/s {rate:.2f}")
      bar.write(message) if bar is not None else print(message, flush=True)
      if manager and step > start_step:
        save_checkpoint(manager, step, state, buffer, history)
    if step < config.init_steps:
      action = action_rng.uniform(-1.0, 1.0, (num_tasks, action_dim)).astype(np.float32)
    else:
      action = np.asarray(agent.act(state.actor.params, obs, jax.random.fold_in(act_key, step)))
    if step >= config.init_steps:
      t0 = time.time()
      for _ in range(warmup_updates if step == config.init_steps else 1):
        batch = buffer.sample(config.batch_size_per_task)
        state, metrics = agent.update(state, batch)
        updates_done += 1
      jax.block_until_ready(metrics)
      updates_time += time.time() - t0
    t0 = time.time()
    next_obs, reward, terminated, truncated, info = env.step(action)
    env_time += time.time() - t0
    # Time-limit truncation bootstraps (MTRL's "infinite bootstrap"); only termination ends.
    buffer.add(obs, action, reward, environments.next_observation(next_obs, info),
               1.0 - terminated.astype(np.float32))
    obs = next_obs
    if metrics is not None and (step % config.log_every == 0 or step == config.num_train_steps - 1):
      last_losses = dict(critic_loss=float(np.mean(metrics["critic_losses"])),
                         actor_loss=float(np.mean(metrics["actor_losses"])),
                         alpha=float(np.mean(metrics["alpha"])),
                         skipped_updates=int(metrics["skipped"]))
      if bar is not None:
        bar.set_postfix(critic=f"{last_losses['critic_loss']:.3g}",
                        actor=f"{last_losses['actor_loss']:.3g}",
                        alpha=f"{last_losses['alpha']:.3g}",
                        updates_per_s=f"{updates_done / max(updates_time, 1e-9):.2f}")

  with StopRequests() as stop:
    try:
      for step in steps:
        if stop.requested:  # SIGINT / SIGTERM: checkpoint here, at a step boundary, and stop
          _stop_at(step, stop.signal_name, manager, state, buffer, history, bar, start_step)
        _train_step(step)
    finally:
      if bar is not None:
        bar.close()
  if not (history and history[-1]["step"] == config.num_train_steps):
    record_evaluation(config.num_train_steps)
  if manager:
    if config.num_train_steps > start_step:
      save_checkpoint(manager, config.num_train_steps, state, buffer, history)
    manager.close()
  result = dict(method=config.method, seed=config.seed, task_names=list(environments.TASK_NAMES),
                history=history, final=history[-1], seconds=time.time() - start_time,
                env_steps_per_s=(config.num_train_steps - start_step) / max(env_time, 1e-9),
                updates_per_s=updates_done / max(updates_time, 1e-9),
                config={k: (list(v) if isinstance(v, tuple) else v)
                        for k, v in vars(config).items()})
  if workdir:
    report.write_run_report(result, workdir)
  result["state"] = state
  return result


def _stop_at(step, signal_name, manager, state, buffer, history, bar, start_step):
  """Saves the checkpoint of `step` (the steps before it taken) and raises the interrupt."""
  say = bar.write if bar is not None else print
  if manager is not None and step > start_step:
    save_checkpoint(manager, step, state, buffer, history)
    manager.close()
    say(f"Interrupted at step {step}: saved a checkpoint in {manager.directory} "
        f"({signal_name}); run again with the same workdir to continue.")
  raise Terminated if signal_name == "SIGTERM" else KeyboardInterrupt


def run(config: MT10Config, methods: list[str], seeds: list[int], workdir: str | None, *,
        progress: bool = True) -> list[dict]:
  """Trains and evaluates every method with every seed, then summarises them.

  Each run goes to `workdir/<method>/seed_<s>` (resuming from the checkpoints there) and
  prints one line (final mean success and return, seconds). With a `workdir` the summary
  (mean ± standard error over seeds beside the paper's Table 4, per-task success, curves:
  `summary.json`, `summary.md`, `curves.png`) is written there and `summary.md` printed;
  without one the per-task table of the runs is printed.

  Args:
    config: the runs' settings; each run replaces its `method` and `seed`.
    methods: names in `ntkmtl_jax.methods` (`ls` is MT-SAC).
    seeds: the seeds of each method.
    workdir: where the runs and the summary go (None: nothing is written).
    progress: show each run's progress bar.

  Returns:
    The `train_and_evaluate` result of every run, methods outer, seeds inner.

  Raises:
    KeyboardInterrupt, interrupt.Terminated: SIGINT or SIGTERM stopped a run (it
      checkpointed first); the finished runs' reports are in their folders.
    locking.WorkdirBusyError: another process runs in `workdir`.
  """
  if workdir:
    with workdir_lock(workdir):
      return _run_all(config, methods, seeds, workdir, progress)
  return _run_all(config, methods, seeds, workdir, progress)


def _run_all(config, methods, seeds, workdir, progress) -> list[dict]:
  results = []
  for method in (m.strip() for m in methods):
    for seed in seeds:
      run_dir = os.path.join(workdir, method, f"seed_{seed}") if workdir else None
      result = train_and_evaluate(config.replace(method=method, seed=seed), run_dir,
                                  progress=progress)
      final = result["final"]
      print(f"{method} seed {seed}: mean success {final['mean_success']:.2f}, mean return "
            f"{final['mean_return']:.1f} ({result['seconds']:.0f} s)", flush=True)
      results.append(result)
  if workdir:
    report.write_summary(results, workdir)
    with open(os.path.join(workdir, "summary.md")) as f:
      print(f.read())
  else:
    print(report.per_task_table({f"{r['method']} seed {r['seed']}": r["final"]["success"]
                                 for r in results}))
  return results
