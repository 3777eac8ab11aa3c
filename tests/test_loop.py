"""The training loop (`loop.fit`): Ctrl-C, the callback, the typed run state, which methods'
steps carry the eigenvalues, and the method the loop builds for a config (the registry's
defaults, no name special-cased). Resume and checkpoints: test_checkpoints.py; the command
line over the loop: test_cli.py."""

import dataclasses
import json
import math

import jax
import numpy as np
import optax
import pytest

pytest.importorskip("sklearn")  # the offline benchmarks' data

import ntkmtl_jax as nm  # noqa: E402
from ntkmtl_jax import benchmarks, loop  # noqa: E402
from ntkmtl_jax.data import Split  # noqa: E402
from ntkmtl_jax.optimizer import build_optimizer  # noqa: E402

from conftest import TanhMLP, assert_close  # noqa: E402


def test_fit_stops_cleanly_on_keyboard_interrupt():
  bench = benchmarks.get_benchmark("sines", num_train=64)
  taken = []

  def take(indices, rng):
    if rng is not None:  # a training batch (the parameter initialisation reads one without)
      taken.append(len(indices))
      if len(taken) == 6:
        raise KeyboardInterrupt
    return bench.train.take(indices, rng)

  interrupted = dataclasses.replace(bench, train=Split(len(bench.train), take))
  result = loop.fit(interrupted, bench.config.replace(batch_size=16, max_steps=50), progress=False)
  # Five batches, five steps; the sixth batch was interrupted while being read.
  assert result.interrupted and result.steps == 5
  assert result.history.losses.shape == (5, 3) and set(result.metrics) == set(bench.metric_names)


def test_fit_calls_the_callback_after_every_step():
  bench = benchmarks.get_benchmark("sines", num_train=64)
  seen = []

  def callback(t, state, metrics):
    seen.append((t, int(state.step), np.asarray(metrics["losses"])))

  result = loop.fit(
    bench,
    bench.config.replace(method="ntkmtl", batch_size=16, max_steps=4),
    progress=False,
    callback=callback,
  )
  assert [t for t, _, _ in seen] == [1, 2, 3, 4]
  assert [s for _, s, _ in seen] == [1, 2, 3, 4]  # called after the step, with its state
  np.testing.assert_allclose(np.stack([l for _, _, l in seen]), result.history.losses, rtol=1e-6)


def test_run_state_survives_its_json_round_trip():
  """What a checkpoint stores of the run's position reads back as the same `RunState`
  (infinite scores, None, nested evaluations), and keys of another version are ignored."""
  run = loop.RunState(
    epoch=3,
    batch=7,
    best_score=0.25,
    best_epoch=2,
    val_metrics={"a": 1.0},
    metrics={"a": 0.5},
    plateau_best=-math.inf,
    plateau_wait=4,
    evaluations=[dict(epoch=2, step=9, val={"a": 1.0})],
    step_times=[0.1, 0.2],
    fingerprint=dict(method="ls", seed=1),
  )
  text = json.dumps(run.to_dict(), allow_nan=True)
  assert loop.RunState.from_dict(json.loads(text)) == run
  assert loop.RunState.from_dict(dict(json.loads(text), retired_key=1)) == run
  assert loop.RunState().best_score == -math.inf and loop.RunState().evaluations == []


@pytest.mark.parametrize(
  "name, hparams, expected",
  [
    ("ntkmtl", {}, True),
    ("ntkmtl", {"num_chunks": 2}, True),
    ("ntkmtl_sr", {}, False),  # its eigenvalues are the representation's
    ("gradnorm", {}, False),  # squared norms, but no eigenvalues in its state
    ("mgda", {}, False),
    ("ls", {}, False),
  ],
)
def test_which_steps_carry_the_shared_eigenvalues(name, hparams, expected):
  bench = benchmarks.get_benchmark("sines", num_train=64)
  config = bench.config.replace(method=name, hparams=hparams, batch_size=16)
  step, method = loop.build_step(bench, config)
  assert loop.eigenvalues_in_step(method, loop.initial_state(bench, config, step)) == expected


@pytest.mark.one_seed
def test_the_configs_ntkmtl_is_the_official_step_with_any_hyper_parameters(seed):
  """`Config(method="ntkmtl")` builds the registry's NTKMTL, whose defaults are the authors'
  step: with n = 1 it updates exactly as `official_ntkmtl`'s method and clip, and with
  num_chunks it keeps the x k scaling (the loop no longer treats the name specially)."""
  rng = np.random.default_rng(seed)
  model = TanhMLP(rng, num_tasks=3, task_scales=rng.uniform(0.2, 5.0, 3))
  config = nm.config.Config(method="ntkmtl", max_grad_norm=1.0, learning_rate=1e-2)
  method, chain = build_optimizer(config, 3, model.shared)
  official, clip = nm.official_ntkmtl(3, model.shared)
  ours = nm.make_train_step(model.loss_fn, method, chain)
  theirs = nm.make_train_step(model.loss_fn, official, optax.chain(clip, optax.adam(1e-2)))
  mine, mine_metrics = ours(ours.init(model.params), model.batch)
  ref, ref_metrics = theirs(theirs.init(model.params), model.batch)
  jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-6), mine.params, ref.params)
  assert_close(mine_metrics["weights"], ref_metrics["weights"], rtol=1e-6)
  chunked, _ = build_optimizer(config.replace(hparams={"num_chunks": 2}), 3, model.shared)
  assert chunked.hparams["scale_by_num_tasks"] and chunked.needs.num_chunks == 2
  g, _ = model.numpy_task_gradients()
  lam = np.sum(g**2, axis=1)
  assert_close(mine_metrics["weights"], 3 * np.sqrt(lam.sum() / lam), rtol=1e-4)


def test_epoch_end_checkpoints_wait_for_the_minimum_interval(tmp_path):
  """With `checkpoint_min_interval`, epoch ends inside a short run save nothing; where the run
  stops is always saved (and without it every epoch end is)."""
  from ntkmtl_jax.checkpoints import RunCheckpoints

  bench = benchmarks.get_benchmark("sines", num_train=64, num_test=32, hidden=(8,))
  config = bench.config.replace(method="ls", batch_size=16, max_steps=10, probe_every=0)
  every, spaced = str(tmp_path / "every"), str(tmp_path / "spaced")
  loop.fit(bench, config, every, progress=False)
  result = loop.fit(bench, config.replace(checkpoint_min_interval=3600.0), spaced, progress=False)
  assert RunCheckpoints(every).steps() == [10, 8, 4]  # 4 batches an epoch; the newest 3 kept
  assert RunCheckpoints(spaced).steps() == [10] and result.steps == 10
