"""Meta-World MT10 environments (gymnasium vector API of Meta-World 3) and the per-task
replay buffer of multi-task SAC.

The observation is Meta-World's 39 numbers followed by the one-hot task id (10), as in
MTRL's MT-SAC without a task encoder. Meta-World and gymnasium (the `rl` extra) are imported
when the environments are built.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ntkmtl_jax._optional import require

NUM_TASKS = 10
# Meta-World's MT10 order (`metaworld.env_dict.MT10_V3`); the one-hot ids follow it.
TASK_NAMES = ("reach", "push", "pick-place", "door-open", "drawer-open", "drawer-close",
              "button-press-topdown", "peg-insert-side", "window-open", "window-close")


def require_metaworld():
  """Imports gymnasium and metaworld (which registers the Meta-World/* environments).

  Returns:
    The gymnasium module.

  Raises:
    MissingExtraError: either is not installed; the message names the `rl` extra.
  """
  gymnasium = require("gymnasium", "rl", "Meta-World MT10")
  require("metaworld", "rl", "Meta-World MT10")
  return gymnasium


def make_mt10_env(seed: int, *, max_episode_steps: int = 150,
                  reward_normalization: str | None = "exponential",
                  reward_function_version: str = "v2", fixed_goals: bool = True):
  """The ten MT10 tasks as one synchronous gymnasium vector env (one sub-env per task).

  Args:
    seed: seeds the benchmark's goal sampling, the simulators and the action spaces.
    max_episode_steps: the time limit (episodes end by truncation, never by success).
    reward_normalization: "exponential" divides rewards by a running standard deviation
      (alpha 0.001, as MTRL's wrapper); None keeps Meta-World's reward.
    reward_function_version: Meta-World's reward version ("v2" or "v1").
    fixed_goals: keep one goal per task for the whole run (MTRL's MT10); False samples
      one of the 50 goals at every reset (Meta-World 3's default).

  Returns:
    A `gymnasium.vector.SyncVectorEnv` with observations (10, 49).

  Raises:
    MissingExtraError: Meta-World or gymnasium is not installed (the `rl` extra).
  """
  gym = require_metaworld()
  with _quiet_box_warnings():
    env = gym.make_vec("Meta-World/MT10", vector_strategy="sync", seed=seed, use_one_hot=True,
                       max_episode_steps=max_episode_steps,
                       reward_normalization_method=reward_normalization,
                       reward_function_version=reward_function_version)
  if fixed_goals:
    rng = np.random.default_rng(seed)
    for sub_env in env.envs:
      tasks = sub_env.get_wrapper_attr("tasks")
      sub_env.unwrapped.set_task(tasks[int(rng.integers(len(tasks)))])
      sub_env.get_wrapper_attr("toggle_sample_tasks_on_reset")(False)
  return env


class _quiet_box_warnings:
  """Silences gymnasium's float64->float32 Box precision warnings from Meta-World."""

  def __enter__(self):
    import warnings
    self._ctx = warnings.catch_warnings()
    self._ctx.__enter__()
    warnings.filterwarnings("ignore", message=".*precision lowered.*")

  def __exit__(self, *exc):
    return self._ctx.__exit__(*exc)


def step_success(info: dict, num_envs: int = NUM_TASKS) -> np.ndarray:
  """Meta-World's per-task `success` flags of one vector step, (num_envs,) bool.

  At an auto-reset step gymnasium moves the finished episodes' infos to `final_info`;
  their success is read there.
  """
  success = np.zeros(num_envs, bool)
  if "success" in info:
    mask = info.get("_success", np.ones(num_envs, bool))
    success |= np.asarray(info["success"], float).astype(bool) & mask
  final = info.get("final_info")
  if isinstance(final, dict) and "success" in final:
    mask = final.get("_success", np.ones(num_envs, bool))
    success |= np.asarray(final["success"], float).astype(bool) & mask
  return success


def next_observation(next_obs: np.ndarray, info: dict) -> np.ndarray:
  """The true next observations: gymnasium's `final_obs` where an episode just ended."""
  if "final_obs" not in info:
    return next_obs
  out = np.array(next_obs, copy=True)
  for i in np.flatnonzero(info["_final_obs"]):
    out[i] = info["final_obs"][i]
  return out


class MultiTaskReplayBuffer:
  """One ring buffer per task; `sample(n)` draws exactly n transitions from each task.

  Transitions are stored task by task, so a batch is task-major: rows
  `[i * n, (i + 1) * n)` belong to task i (what the per-task SAC losses reduce over).
  """

  FIELDS = ("obs", "action", "reward", "next_obs", "not_done")

  def __init__(self, num_tasks: int, capacity_per_task: int, obs_dim: int, action_dim: int,
               seed: int = 0):
    self.num_tasks = num_tasks
    self.capacity = capacity_per_task
    self.data = {
        "obs": np.zeros((num_tasks, capacity_per_task, obs_dim), np.float32),
        "action": np.zeros((num_tasks, capacity_per_task, action_dim), np.float32),
        "reward": np.zeros((num_tasks, capacity_per_task), np.float32),
        "next_obs": np.zeros((num_tasks, capacity_per_task, obs_dim), np.float32),
        "not_done": np.zeros((num_tasks, capacity_per_task), np.float32),
    }
    self.size = np.zeros(num_tasks, np.int64)
    self.position = np.zeros(num_tasks, np.int64)
    self.rng = np.random.default_rng(seed)

  def add(self, obs, action, reward, next_obs, not_done) -> None:
    """Adds one transition per task (each argument has a leading axis of num_tasks)."""
    rows = np.arange(self.num_tasks)
    for name, value in zip(self.FIELDS, (obs, action, reward, next_obs, not_done)):
      self.data[name][rows, self.position] = value
    self.position = (self.position + 1) % self.capacity
    self.size = np.minimum(self.size + 1, self.capacity)

  def sample_indices(self, per_task: int) -> np.ndarray:
    """(num_tasks, per_task) indices, uniform (with replacement) over each task's data."""
    if (self.size == 0).any():
      raise ValueError("Every task needs at least one transition before sampling; collect "
                       "experience (init_steps > 0) first.")
    return (self.rng.random((self.num_tasks, per_task)) * self.size[:, None]).astype(np.int64)

  def sample(self, per_task: int) -> dict[str, np.ndarray]:
    """A task-major batch of num_tasks * per_task transitions, with `task` ids."""
    idx = self.sample_indices(per_task)
    rows = np.arange(self.num_tasks)[:, None]
    batch = {name: value[rows, idx].reshape((self.num_tasks * per_task,) + value.shape[2:])
             for name, value in self.data.items()}
    batch["task"] = np.repeat(np.arange(self.num_tasks, dtype=np.int32), per_task)
    return batch

  def arrays(self) -> dict[str, np.ndarray]:
    """The contents and fill levels: arrays whose shapes the config fixes (a checkpoint's)."""
    return dict(size=self.size, position=self.position,
                **{f"data_{k}": v for k, v in self.data.items()})

  def sampler_state(self) -> dict[str, Any]:
    """The state of the sampler's generator (JSON: NumPy's `bit_generator.state`)."""
    return self.rng.bit_generator.state

  def restore(self, arrays: dict[str, np.ndarray], sampler_state: dict[str, Any]) -> None:
    """Sets the buffer to what `arrays` and `sampler_state` of a buffer of these sizes hold."""
    for k in self.data:
      self.data[k][...] = arrays[f"data_{k}"]
    self.size[...] = arrays["size"]
    self.position[...] = arrays["position"]
    self.rng.bit_generator.state = sampler_state
