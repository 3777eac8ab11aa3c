"""MT10 run settings: `MT10Config`, its presets and the paper's Table 4.

`PRESETS` holds `default` (the paper's setting), `short` (a CPU run of minutes) and `tiny`
(20 steps of small networks, for tests: its time is building the ten environments and
compiling); `get_config(name)` returns one of them.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

# Table 4 of the paper: MT10 success rate, mean (and standard error) over 10 seeds.
PAPER_SUCCESS = {
    "stl": (0.90, 0.03), "mtl_sac": (0.49, 0.07), "mtl_sac_te": (0.54, 0.05),
    "mh_sac": (0.61, 0.04), "pcgrad": (0.72, 0.02), "cagrad": (0.83, 0.05),
    "moco": (0.75, 0.05), "nash_mtl": (0.91, 0.03), "famo": (0.83, 0.05),
    "fairgrad": (0.84, 0.07), "aligned_mtl": (0.97, 0.05), "ntkmtl": (0.96, 0.03),
}


@dataclasses.dataclass(frozen=True)
class MT10Config:
  """Hyper-parameters of a multi-task SAC run on Meta-World MT10.

  Defaults are MTRL's (facebookresearch/mtrl: `config/agent/state_sac.yaml`,
  `agent/components/metaworld_actor.yaml`, `agent/optimizers/metaworld_*.yaml`,
  `experiment/metaworld.yaml`) with the Nash-MTL / FAMO / NTKMTL MT10 overrides (replay
  batch 1280, 2M steps, one evaluation episode, shared temperature); see
  experiments/mt10.md in the repository.

  Attributes:
    method: a name in `ntkmtl_jax.methods` (`ls` is MT-SAC).
    method_hparams: keyword hyper-parameters per method name (used when `method` matches).
    seed: seeds the networks, the replay sampler and the environments.
    num_train_steps: vectorised environment steps (each steps all ten tasks once).
    init_steps: steps with uniformly random actions before learning starts.
    warmup_updates: updates made at step `init_steps` (MTRL makes `init_steps` of them);
      None means `init_steps`. Every later step makes one update.
    batch_size_per_task: transitions sampled from each task's replay (128 x 10 = 1280).
    replay_capacity_per_task: transitions kept per task (MTRL: 1M in all).
    discount: the discount factor gamma.
    init_temperature: initial entropy temperature alpha.
    per_task_alpha: one learnt temperature per task (MTRL's `should_use_disentangled_alpha`).
    actor_lr, critic_lr, alpha_lr: Adam learning rates (betas 0.9, 0.999).
    hidden_dim, num_layers: width and number of hidden layers of the actor and critics.
    log_std_bounds: the actor's log-standard-deviation range (tanh-rescaled).
    critic_tau: Polyak rate of the target critics.
    critic_target_update_freq, actor_update_freq: in updates.
    max_grad_norm: clip the aggregated update's global norm (None: no clipping, as MTRL).
    max_episode_steps: episode length (MTRL hard-codes 150).
    reward_normalization: "exponential" (MTRL's running reward scale, alpha 0.001) or None.
    reward_function_version: Meta-World's reward ("v2", or the older "v1").
    eval_freq: evaluate (and checkpoint) every this many steps.
    num_eval_episodes: evaluation episodes per task.
    checkpoint: save orbax checkpoints (agent) and the replay buffer into the workdir.
    log_every: steps between progress-bar updates of the metrics.
  """
  method: str = "ls"
  method_hparams: Any = dataclasses.field(default_factory=lambda: {"ntkmtl": {}})
  seed: int = 0
  num_train_steps: int = 2_000_000
  init_steps: int = 1500
  warmup_updates: int | None = None
  batch_size_per_task: int = 128
  replay_capacity_per_task: int = 100_000
  discount: float = 0.99
  init_temperature: float = 1.0
  per_task_alpha: bool = False
  actor_lr: float = 3e-4
  critic_lr: float = 3e-4
  alpha_lr: float = 3e-4
  hidden_dim: int = 400
  num_layers: int = 3
  log_std_bounds: tuple = (-20.0, 2.0)
  critic_tau: float = 0.005
  critic_target_update_freq: int = 1
  actor_update_freq: int = 1
  max_grad_norm: float | None = None
  max_episode_steps: int = 150
  reward_normalization: str | None = "exponential"
  reward_function_version: str = "v2"
  eval_freq: int = 10_000
  num_eval_episodes: int = 1
  checkpoint: bool = True
  log_every: int = 50

  def replace(self, **changes) -> MT10Config:
    return dataclasses.replace(self, **changes)

  def hparams(self) -> dict:
    """The hyper-parameters given to `ntkmtl_jax.methods.get` for `self.method`."""
    return dict((self.method_hparams or {}).get(self.method, {}))


DEFAULT = MT10Config()

PRESETS = {
    # The paper's MT10 setting: MTRL multi-task SAC, batch 1280 (128 per task), 2M steps.
    "default": DEFAULT,
    # A CPU run of minutes (docs/mt10_short_run.png): the paper's networks and SAC constants,
    # 2,000 steps (20,000 transitions), 32 transitions per task per update instead of 128 (so
    # that NTKMTL's ten backward passes fit the time), a 500-step random warm-up and an
    # evaluation every 250 steps.
    "short": DEFAULT.replace(num_train_steps=2000, init_steps=500, warmup_updates=50,
                             batch_size_per_task=32, replay_capacity_per_task=5000,
                             eval_freq=250, log_every=25),
    # A smoke run: small networks, 20 steps, evaluations at steps 0 and 20.
    "tiny": DEFAULT.replace(num_train_steps=20, init_steps=8, warmup_updates=2,
                            batch_size_per_task=4, replay_capacity_per_task=64, hidden_dim=32,
                            num_layers=2, max_episode_steps=10, eval_freq=20, log_every=1),
}


def get_config(name: str = "default") -> MT10Config:
  """A copy of the preset `name` of `PRESETS` (`default`, `short` or `tiny`).

  Raises:
    ValueError: `name` is not a preset; the message lists them.
  """
  if name not in PRESETS:
    raise ValueError(f"Unknown MT10 preset {name!r}; the presets are "
                     f"{', '.join(PRESETS)}.")
  return copy.deepcopy(PRESETS[name])  # its method_hparams dict is the caller's to change
