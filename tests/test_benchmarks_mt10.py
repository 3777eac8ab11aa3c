"""MT10 multi-task SAC (`ntkmtl_jax.benchmarks.mt10`): the presets, losses against NumPy, the
per-task replay sampler, real Meta-World steps and updates, the aggregated update against
per-task gradients, checkpoints and resume through `run`, and importing without the rl
extra."""

import glob
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import ntkmtl_jax  # noqa: E402
from ntkmtl_jax import checkpoints  # noqa: E402
from ntkmtl_jax._optional import MissingExtraError  # noqa: E402
from ntkmtl_jax.benchmarks import mt10  # noqa: E402
from ntkmtl_jax.benchmarks.mt10 import environments, loop, sac  # noqa: E402

NUM_TASKS, PER_TASK, OBS_DIM, ACTION_DIM = 3, 4, 5, 2


def np_mlp(params, x):
  """The MLP forward in NumPy: Dense_0 ... Dense_L, ReLU between."""
  layers = sorted(params, key=lambda name: int(name.split("_")[1]))
  for i, name in enumerate(layers):
    x = x @ np.asarray(params[name]["kernel"], np.float64) + np.asarray(params[name]["bias"])
    if i < len(layers) - 1:
      x = np.maximum(x, 0.0)
  return x


def np_policy(actor_params, obs, noise, bounds=(-20.0, 2.0)):
  out = np_mlp(actor_params["params"]["MLP_0"], obs)
  mu, log_std = out[:, :ACTION_DIM], out[:, ACTION_DIM:]
  log_std = bounds[0] + 0.5 * (bounds[1] - bounds[0]) * (np.tanh(log_std) + 1)
  pre = mu + noise * np.exp(log_std)
  log_prob = (-0.5 * noise**2 - log_std).sum(-1) - 0.5 * np.log(2 * np.pi) * ACTION_DIM
  action = np.tanh(pre)
  log_prob -= np.log(np.maximum(1 - action**2, 0) + 1e-6).sum(-1)
  return action, log_prob


def np_critic(critic_params, obs, action):
  x = np.concatenate([obs, action], -1)
  p = critic_params["params"]
  return np_mlp(p["q1"], x)[:, 0], np_mlp(p["q2"], x)[:, 0]


def test_presets_and_their_names():
  assert list(mt10.PRESETS) == ["default", "short", "tiny"]
  assert mt10.get_config() == mt10.get_config("default") == mt10.MT10Config()
  default, short, tiny = (mt10.get_config(name) for name in ("default", "short", "tiny"))
  assert (default.num_train_steps, default.batch_size_per_task, default.hidden_dim) == (
    2_000_000,
    128,
    400,
  )
  assert (short.num_train_steps, short.batch_size_per_task, short.hidden_dim) == (2000, 32, 400)
  assert (tiny.num_train_steps, tiny.eval_freq, tiny.hidden_dim, tiny.num_layers) == (20, 20, 32, 2)
  assert mt10.PAPER_SUCCESS["ntkmtl"] == (0.96, 0.03)
  tiny.method_hparams["ntkmtl"]["n"] = 4  # a copy: the preset is unchanged
  assert mt10.PRESETS["tiny"].method_hparams == {"ntkmtl": {}}
  with pytest.raises(ValueError, match="Unknown MT10 preset 'paper'.*default, short, tiny"):
    mt10.get_config("paper")


def test_importing_needs_no_rl_extra_and_running_names_it():
  """With Meta-World, gymnasium, orbax and matplotlib absent the package imports (and nothing
  of the repository's experiments/), and a run raises MissingExtraError naming the rl extra."""
  script = """
import sys
for name in ("metaworld", "gymnasium", "mujoco", "orbax", "matplotlib"):
  sys.modules[name] = None  # as if not installed: importing it raises ModuleNotFoundError
import ntkmtl_jax.benchmarks
from ntkmtl_jax.benchmarks import mt10
from ntkmtl_jax._optional import MissingExtraError
assert not [m for m in sys.modules if m.split(".")[0] == "experiments"]
try:
  mt10.run(mt10.get_config("tiny"), ["ls"], [0], None, progress=False)
except MissingExtraError as error:
  print(error.extra, error)
"""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), JAX_PLATFORMS="cpu")
  done = subprocess.run(
    [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 0, done.stderr
  assert done.stdout.startswith("rl ") and "pip install -e '.[rl]'" in done.stdout


@pytest.fixture(scope="module")
def small():
  config = mt10.get_config("tiny").replace(hidden_dim=8, num_layers=2, discount=0.9)
  networks = sac.Networks(sac.Actor(ACTION_DIM, 8, 2), sac.DoubleCritic(8, 2))
  k = jax.random.split(jax.random.key(0), 4)
  actor_params = networks.actor.init(k[0], jnp.zeros((1, OBS_DIM)))
  critic_params = networks.critic.init(k[1], jnp.zeros((1, OBS_DIM)), jnp.zeros((1, ACTION_DIM)))
  target_params = networks.critic.init(k[2], jnp.zeros((1, OBS_DIM)), jnp.zeros((1, ACTION_DIM)))
  rng = np.random.default_rng(1)
  b = NUM_TASKS * PER_TASK
  batch = dict(
    obs=rng.normal(size=(b, OBS_DIM)).astype(np.float32),
    action=rng.uniform(-1, 1, (b, ACTION_DIM)).astype(np.float32),
    reward=rng.normal(size=b).astype(np.float32),
    next_obs=rng.normal(size=(b, OBS_DIM)).astype(np.float32),
    not_done=(rng.random(b) > 0.3).astype(np.float32),
    task=np.repeat(np.arange(NUM_TASKS, dtype=np.int32), PER_TASK),
  )
  noise = rng.normal(size=(b, ACTION_DIM)).astype(np.float32)
  log_alpha = np.log(np.array([0.5, 1.0, 2.0], np.float32))
  return config, networks, actor_params, critic_params, target_params, batch, noise, log_alpha


@pytest.mark.parametrize("per_task_alpha", [False, True])
def test_sac_losses_match_numpy(small, per_task_alpha):
  config, networks, actor_params, critic_params, target_params, batch, noise, log_alpha = small
  alpha_np = (
    np.exp(log_alpha)[batch["task"]] if per_task_alpha else np.full(len(batch["task"]), 0.5)
  )
  alpha = sac.alpha_per_sample(jnp.asarray(log_alpha), batch["task"], per_task_alpha)
  np.testing.assert_allclose(alpha, alpha_np, rtol=1e-6)

  # Target: r + gamma * not_done * (min of the target critics - alpha * log pi(a'|s')).
  next_action, next_log_prob = np_policy(actor_params, batch["next_obs"], noise)
  tq1, tq2 = np_critic(target_params, batch["next_obs"], next_action)
  y = batch["reward"] + 0.9 * batch["not_done"] * (np.minimum(tq1, tq2) - alpha_np * next_log_prob)
  target = sac.critic_target(networks, actor_params, target_params, batch, alpha, noise, 0.9)
  np.testing.assert_allclose(target, y, rtol=1e-4, atol=1e-4)

  q1, q2 = np_critic(critic_params, batch["obs"], batch["action"])
  critic_np = ((q1 - y) ** 2 + (q2 - y) ** 2).reshape(NUM_TASKS, PER_TASK).mean(1)
  critic = sac.critic_task_losses(networks, NUM_TASKS)(
    critic_params, dict(obs=batch["obs"], action=batch["action"], target_q=target)
  )
  np.testing.assert_allclose(critic, critic_np, rtol=1e-4, atol=1e-4)

  action, log_prob = np_policy(actor_params, batch["obs"], noise)
  aq1, aq2 = np_critic(critic_params, batch["obs"], action)
  actor_np = (alpha_np * log_prob - np.minimum(aq1, aq2)).reshape(NUM_TASKS, PER_TASK).mean(1)
  actor = sac.actor_task_losses(networks, NUM_TASKS)(
    actor_params, dict(obs=batch["obs"], noise=noise, alpha=alpha, critic_params=critic_params)
  )
  np.testing.assert_allclose(actor, actor_np, rtol=1e-4, atol=1e-4)

  # Temperature: mean of alpha * (-log pi - target entropy); d/d log alpha = alpha * (...).
  target_entropy = -float(ACTION_DIM)
  bracket = -log_prob - target_entropy
  loss, grad = jax.value_and_grad(sac.temperature_loss)(
    jnp.asarray(log_alpha),
    jnp.asarray(log_prob, jnp.float32),
    batch["task"],
    target_entropy,
    per_task_alpha,
  )
  np.testing.assert_allclose(loss, np.mean(alpha_np * bracket), rtol=1e-4)
  grad_np = np.zeros(NUM_TASKS)
  rows = batch["task"] if per_task_alpha else np.zeros_like(batch["task"])
  np.add.at(grad_np, rows, alpha_np * bracket / len(bracket))
  np.testing.assert_allclose(grad, grad_np, rtol=1e-4, atol=1e-6)


def test_replay_sampler_draws_exactly_per_task_from_that_task():
  buffer = environments.MultiTaskReplayBuffer(
    NUM_TASKS, capacity_per_task=7, obs_dim=2, action_dim=1, seed=0
  )
  for t in range(11):  # wraps the ring: 7 kept per task, the latest overwriting the oldest
    obs = np.stack([np.arange(NUM_TASKS), np.full(NUM_TASKS, t)], 1).astype(np.float32)
    buffer.add(obs, np.zeros((NUM_TASKS, 1)), np.arange(NUM_TASKS), obs, np.ones(NUM_TASKS))
  assert list(buffer.size) == [7] * NUM_TASKS
  idx = buffer.sample_indices(128)
  assert idx.shape == (NUM_TASKS, 128) and idx.min() >= 0 and idx.max() < 7
  batch = buffer.sample(128)
  assert batch["obs"].shape == (NUM_TASKS * 128, 2)
  np.testing.assert_array_equal(np.bincount(batch["task"]), [128] * NUM_TASKS)
  np.testing.assert_array_equal(batch["obs"][:, 0], batch["task"])  # rows from their own task
  np.testing.assert_array_equal(batch["reward"], batch["task"])
  assert batch["obs"][:, 1].min() >= 4  # only the 7 newest (t = 4..10) remain
  # A partly filled task samples only its filled rows.
  buffer.size[1] = 2
  assert buffer.sample_indices(500)[1].max() < 2


def _one_update_with_sgd(method, small_config, batch, num_tasks, obs_dim, action_dim):
  config = small_config.replace(method=method)
  agent = sac.make_agent(
    config, obs_dim, action_dim, num_tasks, optimizer=lambda lr: optax.sgd(1.0)
  )
  state = agent.init(jax.random.key(3))
  new_state, _ = jax.jit(agent.update_unjitted)(state, batch)
  return agent, state, new_state


def _expected_direction(method, task_grads):
  flat = [jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)]) for g in task_grads]
  if method == "ls":
    weights = np.ones(len(flat))
  else:  # NTKMTL, n = 1: w_i = (sum_j |g_j|^2 / |g_i|^2) ** 0.5 (times k if it scales by k)
    sq = np.array([float(jnp.sum(f**2)) for f in flat])
    weights = np.sqrt(sq.sum() / sq)
    if ntkmtl_jax.methods.defaults("ntkmtl").get("scale_by_num_tasks"):
      weights = weights * len(flat)
  return jax.tree.map(lambda *gs: sum(w * g for w, g in zip(weights, gs)), *task_grads)


@pytest.mark.parametrize("method", ["ls", "ntkmtl"])
def test_aggregated_update_equals_method_on_per_task_gradients(small, method):
  config, *_, batch, _, _ = small
  agent, state, new_state = _one_update_with_sgd(
    method, config, batch, NUM_TASKS, OBS_DIM, ACTION_DIM
  )
  critic_loss = sac.critic_task_losses(agent.networks, NUM_TASKS)
  actor_loss = sac.actor_task_losses(agent.networks, NUM_TASKS)

  @jax.jit
  def per_task_gradients(state, new_critic_params):
    """Each task's gradient on its own, one jax.grad per task."""
    next_noise, actor_noise = sac.update_noise(
      state.key, state.step, len(batch["task"]), ACTION_DIM
    )
    alpha = sac.alpha_per_sample(state.log_alpha, batch["task"], config.per_task_alpha)
    target_q = sac.critic_target(
      agent.networks,
      state.actor.params,
      state.target_critic_params,
      batch,
      alpha,
      next_noise,
      config.discount,
    )
    critic_batch = dict(obs=batch["obs"], action=batch["action"], target_q=target_q)
    actor_batch = dict(
      obs=batch["obs"], noise=actor_noise, alpha=alpha, critic_params=new_critic_params
    )  # the actor sees the updated critic
    critic = [
      jax.grad(lambda p, i=i: critic_loss(p, critic_batch)[i])(state.critic.params)
      for i in range(NUM_TASKS)
    ]
    actor = [
      jax.grad(lambda p, i=i: actor_loss(p, actor_batch)[i])(state.actor.params)
      for i in range(NUM_TASKS)
    ]
    return critic, actor

  critic_grads, actor_grads = per_task_gradients(state, new_state.critic.params)
  for old, new, grads in (
    (state.critic.params, new_state.critic.params, critic_grads),
    (state.actor.params, new_state.actor.params, actor_grads),
  ):
    chex_close(new, jax.tree.map(lambda p, d: p - d, old, _expected_direction(method, grads)))
  # Target critics move by tau toward the updated critics.
  tau = config.critic_tau
  chex_close(
    new_state.target_critic_params,
    jax.tree.map(
      lambda t, p: (1 - tau) * t + tau * p, state.target_critic_params, new_state.critic.params
    ),
  )


def chex_close(actual, expected):
  raw = lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    a, e = raw(a), raw(e)
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=2e-4, atol=2e-5)


@pytest.fixture(scope="module")
def mt10_env():
  pytest.importorskip("metaworld", reason="Meta-World is not installed: pip install -e '.[rl]'")
  return environments.make_mt10_env(0, max_episode_steps=6)


def test_real_mt10_steps_and_updates(mt10_env):
  env = mt10_env
  assert env.num_envs == 10 and env.single_observation_space.shape == (49,)
  obs, _ = env.reset(seed=0)
  np.testing.assert_array_equal(obs[:, -10:], np.eye(10))  # the one-hot task ids
  buffer = environments.MultiTaskReplayBuffer(10, 32, 49, 4, seed=0)
  rng = np.random.default_rng(0)
  for _ in range(8):  # crosses one time-limit reset (6 steps)
    action = rng.uniform(-1, 1, (10, 4)).astype(np.float32)
    next_obs, reward, terminated, truncated, info = env.step(action)
    assert environments.step_success(info).shape == (10,)
    buffer.add(obs, action, reward, environments.next_observation(next_obs, info), 1.0 - terminated)
    obs = next_obs
  config = mt10.get_config("tiny")
  for method in ("ls", "ntkmtl", "nash_mtl"):
    agent = loop.cached_agent(config.replace(method=method), 49, 4, 10)
    state = agent.init(jax.random.key(0))
    before = state.critic.params
    before = jax.tree.map(np.asarray, before)
    for _ in range(2):
      state, metrics = agent.update(state, buffer.sample(config.batch_size_per_task))
    assert metrics["critic_losses"].shape == (10,) and metrics["actor_weights"].shape == (10,)
    assert np.all(np.isfinite(metrics["critic_losses"])) and int(metrics["skipped"]) == 0, method
    moved = [
      np.abs(np.asarray(a) - b).max()
      for a, b in zip(jax.tree.leaves(state.critic.params), jax.tree.leaves(before))
    ]
    assert max(moved) > 0, method
    action = np.asarray(agent.act(state.actor.params, obs, jax.random.key(1)))
    assert action.shape == (10, 4) and np.abs(action).max() <= 1.0
  result = loop.evaluate(agent, state.actor.params, env, num_episodes=1, max_episode_steps=6)
  assert len(result["success"]) == 10 and 0.0 <= result["mean_success"] <= 1.0


def test_missing_metaworld_names_the_fix(monkeypatch):
  monkeypatch.setitem(sys.modules, "metaworld", None)  # as if not installed
  with pytest.raises(MissingExtraError, match=r"metaworld .*pip install -e '\.\[rl\]'") as e:
    environments.require_metaworld()
  assert e.value.extra == "rl"
  with pytest.raises(MissingExtraError):
    environments.make_mt10_env(0)


def test_ntkmtl_sr_is_refused_with_the_reason():
  with pytest.raises(ValueError, match="shared representation"):
    sac.make_agent(mt10.get_config("tiny").replace(method="ntkmtl_sr"), 49, 4, 10)


def test_checkpoint_restores_agent_and_replay_and_resumes(mt10_env, tmp_path, monkeypatch, capsys):
  pytest.importorskip("orbax.checkpoint")
  # One env for training and evaluation keeps the test fast (evaluation resets it).
  config = mt10.get_config("tiny").replace(
    num_train_steps=12, init_steps=4, eval_freq=6, max_episode_steps=6
  )
  workdir = tmp_path / "ls" / "seed_0"  # where `run` puts method ls, seed 0
  first = mt10.train_and_evaluate(config, str(workdir), envs=(mt10_env, mt10_env), progress=False)
  assert os.listdir(workdir / "checkpoints") == ["12"]  # the newest only
  template = sac.make_agent(config, 49, 4, 10).init(jax.random.key(5))
  buffer = environments.MultiTaskReplayBuffer(10, config.replay_capacity_per_task, 49, 4)
  manager = loop.checkpoint_manager(str(workdir))
  state, step, history = loop.restore_checkpoint(manager, template, buffer)
  assert step == 12 and [row["step"] for row in history] == [0, 6, 12]
  chex_close(state, first["state"])
  assert list(buffer.size) == [12] * 10
  other = environments.MultiTaskReplayBuffer(10, config.replay_capacity_per_task // 2, 49, 4)
  with pytest.raises(ValueError, match="resume with the config that wrote it"):
    loop.restore_checkpoint(manager, template, other)
  manager.close()
  # A damaged copy of the one checkpoint is called damaged (not another config's), naming it
  # (flipped bytes in compressed chunks no longer decode; in raw ones only the digest sees them).
  damaged = tmp_path / "damaged"
  shutil.copytree(workdir, damaged)
  files = glob.glob(
    str(damaged / "checkpoints" / "12" / "replay_buffer" / "**" / "d" / "*"), recursive=True
  )
  path = max(files, key=os.path.getsize)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2 : len(data) // 2 + 64] = bytes(b ^ 0xFF for b in data[len(data) // 2 :][:64])
  open(path, "wb").write(bytes(data))
  manager = loop.checkpoint_manager(str(damaged))
  damage = "12 is damaged: (its digest does not match|it cannot be read)"
  with pytest.raises(checkpoints.DamagedCheckpointError, match=damage):
    loop.restore_checkpoint(manager, template, buffer)
  manager.close()
  # Resumed through `run` (what the command line calls), on the fixture's environments.
  monkeypatch.setattr(environments, "make_mt10_env", lambda *args, **kwargs: mt10_env)
  (second,) = mt10.run(
    config.replace(num_train_steps=18), ["ls"], [0], str(tmp_path), progress=False
  )
  assert [row["step"] for row in second["history"]] == [0, 6, 12, 18]
  assert int(second["state"].step) == int(first["state"].step) + 6
  for name in ("results.json", "history.csv", "per_task.csv", "report.md", "success_curve.png"):
    assert (workdir / name).exists(), name
  for name in ("summary.json", "summary.md", "curves.png"):
    assert (tmp_path / name).exists(), name
  printed = capsys.readouterr().out
  assert "ls seed 0: mean success" in printed and "| ls | 1 |" in printed


class _TerminatedAt:
  """`env` that sends this process SIGTERM (what a batch scheduler sends) at its `at`-th step."""

  def __init__(self, env, at: int):
    self.env, self.at, self.calls = env, at, 0

  def __getattr__(self, name):
    return getattr(self.env, name)

  def step(self, action):
    self.calls += 1
    if self.calls == self.at:
      os.kill(os.getpid(), signal.SIGTERM)
    return self.env.step(action)


def test_sigterm_checkpoints_at_the_step_boundary_and_the_run_resumes(mt10_env, tmp_path, capsys):
  pytest.importorskip("orbax.checkpoint")
  from ntkmtl_jax.interrupt import Terminated

  config = mt10.get_config("tiny").replace(
    num_train_steps=12, init_steps=4, eval_freq=6, max_episode_steps=6
  )
  workdir = tmp_path / "run"
  with pytest.raises(Terminated):
    mt10.train_and_evaluate(
      config, str(workdir), envs=(_TerminatedAt(mt10_env, 8), mt10_env), progress=False
    )
  (stopped,) = os.listdir(workdir / "checkpoints")
  assert int(stopped) in (8, 9)  # the boundary after the step the signal arrived in
  assert f"Interrupted at step {stopped}: saved a checkpoint" in capsys.readouterr().out
  assert not (workdir / "results.json").exists()
  resumed = mt10.train_and_evaluate(config, str(workdir), envs=(mt10_env, mt10_env), progress=False)
  assert [row["step"] for row in resumed["history"]] == [0, 6, 12]
  assert int(resumed["state"].step) > 0 and (workdir / "results.json").exists()
