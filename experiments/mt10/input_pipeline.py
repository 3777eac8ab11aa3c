"""Meta-World MT10 environments (gymnasium vector API of Meta-World 3) and the per-task
replay buffer of multi-task SAC.

The observation is Meta-World's 39 numbers followed by the one-hot task id (10), as in
MTRL's MT-SAC without a task encoder.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

NUM_TASKS = 10
# Meta-World's MT10 order (`metaworld.env_dict.MT10_V3`); the one-hot ids follow it.
TASK_NAMES = ("reach", "push", "pick-place", "door-open", "drawer-open", "drawer-close",
              "button-press-topdown", "peg-insert-side", "window-open", "window-close")

INSTALL_HINT = "pip install ntkmtl-jax[rl]"


def require_metaworld():
  """Imports gymnasium and metaworld, or raises one clear line naming the fix."""
  try:
    import gymnasium
    import metaworld  # noqa: F401  (registers the Meta-World/* environments)
  except Exception as e:  # ImportError, or a broken MuJoCo install failing on import
    raise ImportError(f"Meta-World MT10 needs the metaworld and gymnasium packages "
                      f"({type(e).__name__}: {e}); install them with `{INSTALL_HINT}`.") from e
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

  def state_dict(self) -> dict[str, Any]:
    return dict(size=self.size, position=self.position,
                rng=np.frombuffer(repr(self.rng.bit_generator.state).encode(), np.uint8),
                **{f"data_{k}": v for k, v in self.data.items()})

  def save(self, path: str) -> None:
    """Writes the buffer (contents, fill level, sampler state) to `path` (.npz), atomically."""
    tmp = path + ".tmp.npz"
    np.savez(tmp, **self.state_dict())
    os.replace(tmp, path)

  def load(self, path: str) -> None:
    with np.load(path) as f:
      for k in self.data:
        if f[f"data_{k}"].shape != self.data[k].shape:
          raise ValueError(f"The saved replay buffer {path} holds {k} of shape "
                           f"{f[f'data_{k}'].shape}, this run expects {self.data[k].shape}; "
                           "resume with the config that wrote it.")
        self.data[k][...] = f[f"data_{k}"]
      self.size[...] = f["size"]
      self.position[...] = f["position"]
      import ast
      self.rng.bit_generator.state = ast.literal_eval(bytes(f["rng"]).decode())
