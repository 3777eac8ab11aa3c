"""The train step (ntkmtl_jax/step.py, make_train_step): flax models with BatchNorm, bad
input, sharding (strategies: tests/test_strategy.py)."""

import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ntkmtl_jax as nm
from ntkmtl_jax.models.multitask import LinearHeads, task_functions

from conftest import ROOT, TanhMLP, assert_close, run_python


def _run(model, agg, strategy, steps=2, optimizer=None, jit=True):
  step = nm.make_train_step(
    model.loss_fn, agg, optimizer or optax.sgd(0.05), strategy=strategy, jit=jit
  )
  state = step.init(model.params)
  history = []
  for _ in range(steps):
    state, metrics = step(state, model.batch)
    history.append(metrics)
  return state, history


@pytest.mark.one_seed
def test_step_equals_transform_on_task_gradients(seed):
  """One jitted step == jacrev task gradients -> official preset -> Adam, by hand."""
  rng = np.random.default_rng(seed)
  model = TanhMLP(rng, num_tasks=4, task_scales=rng.uniform(0.2, 5.0, 4))
  agg, clip = nm.official_ntkmtl(4, model.shared)
  opt = optax.chain(clip, optax.adam(1e-2))
  step = nm.make_train_step(model.loss_fn, agg, opt)
  state, metrics = step(step.init(model.params), model.batch)

  grads = jax.jacrev(model.loss_fn)(model.params, model.batch)
  tx = optax.chain(agg, clip, optax.adam(1e-2))
  updates, _ = tx.update(grads, tx.init(model.params), model.params)
  expected = optax.apply_updates(model.params, updates)
  jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-5), state.params, expected)
  g, _ = model.numpy_task_gradients()
  norms2 = np.sum(g**2, axis=1)
  assert_close(metrics["eigenvalues"], norms2)
  assert_close(metrics["weights"], 4 * np.sqrt(norms2.sum() / norms2))
  assert_close(
    metrics["losses"],
    np.mean(
      (
        np.tanh(model.x @ model.params64["shared"]["w"] + model.params64["shared"]["b"])
        @ model.params64["heads"]["w"]
        - model.y
      )
      ** 2,
      0,
    ),
  )


@pytest.mark.one_seed
def test_jit_and_eager_agree(seed):
  model = TanhMLP(np.random.default_rng(seed), num_tasks=3)
  for make in (
    lambda: nm.ntkmtl(3, shared=model.shared),
    lambda: nm.ntkmtl(3, num_chunks=4, shared=model.shared),
  ):
    jitted, _ = _run(model, make(), "unroll", jit=True)
    eager, _ = _run(model, make(), "unroll", jit=False)
    jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-5), jitted.params, eager.params)


def test_non_finite_losses_skip_the_step(seed):
  model = TanhMLP(np.random.default_rng(seed), num_tasks=3)
  step = nm.make_train_step(model.loss_fn, nm.ntkmtl(3, shared=model.shared), optax.adam(1e-2))
  state = step.init(model.params)
  state, m = step(state, model.batch)
  assert bool(m["finite"]) and int(m["skipped"]) == 0
  bad = dict(model.batch, y=model.batch["y"].at[0, 1].set(jnp.nan))
  new_state, m = step(state, bad)
  assert not bool(m["finite"]) and int(m["skipped"]) == 1
  for new, old in (
    (new_state.params, state.params),
    (new_state.optimizer_state, state.optimizer_state),
    (new_state.method_state, state.method_state),
  ):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new, old)
  assert int(new_state.step) == int(state.step) + 1
  new_state, m = step(new_state, model.batch)
  assert bool(m["finite"]) and int(m["skipped"]) == 1


def test_infinite_gradient_skips_the_step():
  model = TanhMLP(np.random.default_rng(0), num_tasks=2)
  sqrt_loss = lambda p, b: jnp.sqrt(model.loss_fn(p, b) * jnp.array([1.0, 0.0]))
  step = nm.make_train_step(sqrt_loss, nm.methods.get("ls", 2), optax.sgd(0.1))
  state = step.init(model.params)
  new_state, m = step(state, model.batch)  # d sqrt(x)/dx at 0 is inf
  assert not bool(m["finite"]) and int(m["skipped"]) == 1
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new_state.params, state.params)


def _assert_unchanged(new_state, state):
  for new, old in (
    (new_state.params, state.params),
    (new_state.optimizer_state, state.optimizer_state),
    (new_state.method_state, state.method_state),
  ):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new, old)


def test_finite_batch_that_overflows_the_optimiser_state_is_skipped():
  """Losses and update finite, but Adam's second moment overflows (g^2 > float32 max): the
  step is skipped with cause `nonfinite_state`, and a normal batch afterwards trains."""
  model = TanhMLP(np.random.default_rng(3), num_tasks=2)
  # A term linear in the shared bias, scaled by the batch: loss ~ 1e20 is finite, its
  # gradient ~ 1e20 is finite, its square is not.
  loss_fn = lambda p, b: model.loss_fn(p, b) + b["scale"] * jnp.sum(p["shared"]["b"])
  step = nm.make_train_step(loss_fn, nm.methods.get("ls", 2), optax.adam(1e-2))
  state = step.init(model.params)
  huge = dict(model.batch, scale=jnp.float32(1e20))
  new_state, m = step(state, huge)
  assert np.all(np.isfinite(m["losses"])) and not bool(m["nonfinite_update"])
  assert not bool(m["finite"]) and int(m["skipped"]) == 1 and bool(m["nonfinite_state"])
  _assert_unchanged(new_state, state)
  new_state, m = step(new_state, dict(model.batch, scale=jnp.float32(0.0)))
  assert bool(m["finite"])
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new_state.params, state.params)
  assert max(jax.tree.leaves(moved)) > 0


def test_nan_learning_rate_makes_every_step_skipped_with_its_cause():
  model = TanhMLP(np.random.default_rng(4), num_tasks=3)
  step = nm.make_train_step(
    model.loss_fn, nm.ntkmtl(3, shared=model.shared), optax.adam(float("nan"))
  )
  state = step.init(model.params)
  for t in range(3):
    new_state, m = step(state, model.batch)
    assert not bool(m["finite"]) and int(m["skipped"]) == t + 1
    assert bool(m["nonfinite_state"]) and not bool(m["nonfinite_losses"])
    assert not bool(m["nonfinite_update"])
    _assert_unchanged(new_state, state)
    state = new_state


def test_optimiser_receives_the_summed_loss_as_value(seed):
  """`optax.contrib.reduce_on_plateau` reads `value=`: the step passes the summed loss, and
  the plateau's running average equals the losses' sum computed by hand."""
  model = TanhMLP(np.random.default_rng(seed), num_tasks=3)
  opt = optax.chain(
    optax.adam(1e-2), optax.contrib.reduce_on_plateau(patience=1, accumulation_size=1)
  )
  step = nm.make_train_step(model.loss_fn, nm.methods.get("ls", 3), opt)
  state = step.init(model.params)
  state, m = step(state, model.batch)
  assert bool(m["finite"])
  plateau = state.optimizer_state[1]
  np.testing.assert_allclose(float(plateau.best_value), float(np.sum(m["losses"])), rtol=1e-6)


def test_wrong_loss_shape_and_chunks_are_reported():
  model = TanhMLP(np.random.default_rng(0), num_tasks=3, batch=6)
  bad = lambda p, b: model.loss_fn(p, b)[None]
  step = nm.make_train_step(bad, nm.ntkmtl(3), optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"shape \(num_tasks,\)"):
    step(step.init(model.params), model.batch)
  step = nm.make_train_step(model.loss_fn, nm.ntkmtl(3, num_chunks=4), optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"Batch size 6 .*num_chunks=4"):
    step(step.init(model.params), model.batch)
  with pytest.raises(ValueError, match="encode=.*decode="):
    nm.make_train_step(model.loss_fn, nm.ntkmtl_sr(3), optax.sgd(0.1))


class _BNEncoder(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    x = nn.Dense(8)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
    return nn.relu(x)


def _bn_model(k):
  return task_functions(
    _BNEncoder(), LinearHeads(k), lambda out, b: jnp.mean((out - b["y"]) ** 2, axis=0)
  )


@pytest.mark.parametrize("method", ["ntkmtl", "ntkmtl_n2", "ntkmtl_sr", "ls"])
@pytest.mark.one_seed
def test_flax_model_with_batchnorm(seed, method):
  rng = np.random.default_rng(seed)
  k = 3
  fns = _bn_model(k)
  batch = {
    "x": jnp.asarray(rng.normal(size=(8, 4)) + 2.0, jnp.float32),
    "y": jnp.asarray(rng.normal(size=(8, k)), jnp.float32),
  }
  params, model_state = fns.init(jax.random.key(seed), batch)
  agg = {
    "ntkmtl": lambda: nm.ntkmtl(k, shared=fns.shared),
    "ntkmtl_n2": lambda: nm.ntkmtl(k, num_chunks=2, shared=fns.shared),
    "ntkmtl_sr": lambda: nm.ntkmtl_sr(k, num_chunks=2, shared=fns.shared),
    "ls": lambda: nm.methods.get("ls", k, shared=fns.shared),
  }[method]()
  step = nm.make_train_step(
    fns.loss_fn, agg, optax.adam(1e-2), has_state=True, encode=fns.encode, decode=fns.decode
  )
  state = step.init(params, model_state)
  for _ in range(3):
    state, metrics = step(state, batch)
  assert bool(metrics["finite"])
  mean = state.model_state["batch_stats"]["BatchNorm_0"]["mean"]
  assert float(jnp.abs(mean).max()) > 0.0  # running statistics moved from their zero init
  preds = fns.predict(state.params, state.model_state, batch)
  assert preds.shape == (8, k)


@pytest.mark.one_seed
def test_sharded_step_matches_single_device(tmp_path, seed):
  """The jitted step on a batch sharded over 8 CPU devices == the same step on one device."""
  script = textwrap.dedent("""
      import os, sys, numpy as np, jax, optax
      sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
      import ntkmtl_jax as nm
      from ntkmtl_jax.sharding import data_mesh
      from conftest import TanhMLP
      assert jax.device_count() == 8, jax.devices()
      model = TanhMLP(np.random.default_rng(int(sys.argv[1])), num_tasks=3, batch=16)
      results = []
      for sharded in (False, True):
        for agg in (nm.ntkmtl(3, shared=model.shared),
                    nm.ntkmtl(3, num_chunks=2, shared=model.shared)):
          step = nm.make_train_step(model.loss_fn, agg, optax.adam(1e-2))
          state, batch = step.init(model.params), model.batch
          if sharded:
            mesh = data_mesh()
            state, batch = nm.replicate(state, mesh), nm.shard_batch(batch, mesh)
            assert len(batch["x"].sharding.device_set) == 8
          for _ in range(3):
            state, metrics = step(state, batch)
          results.append(np.concatenate([np.ravel(x) for x in jax.tree.leaves(state.params)]))
      for a, b in zip(results[:2], results[2:]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
      print("sharded == single")
  """)
  path = tmp_path / "sharded.py"
  path.write_text(script)
  out = run_python(
    [str(path), str(seed)],
    cwd=ROOT,
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
    JAX_PLATFORMS="cpu",
  )
  assert out.returncode == 0, f"seed={seed}\n{out.stdout}\n{out.stderr[-3000:]}"
  assert "sharded == single" in out.stdout


def test_shard_batch_rejects_indivisible_batch():
  from ntkmtl_jax.sharding import data_mesh

  class TwoDeviceMesh:  # only the axis size is read before placing anything
    shape = {"data": 2}

  nm.shard_batch({"x": jnp.ones((3, 2))}, data_mesh(jax.devices()[:1]))
  with pytest.raises(ValueError, match=r"Batch size 3 is not divisible by the 2 devices"):
    nm.shard_batch({"x": jnp.ones((3, 2))}, TwoDeviceMesh())


def test_mgda_ub_step_uses_the_representation_gram(seed):
  """The step's MGDA-UB update == the aggregator fed the Gram of d l_i / d z by hand."""
  rng = np.random.default_rng(seed)
  k = 3
  model = TanhMLP(rng, num_tasks=k, task_scales=rng.uniform(0.2, 5.0, k))
  encode = lambda p, b: jnp.tanh(b["x"] @ p["shared"]["w"] + p["shared"]["b"])
  decode = lambda p, z, b: jnp.mean((z @ p["heads"]["w"] - b["y"]) ** 2, axis=0)
  agg = nm.methods.get("mgda_ub", k, shared=model.shared)
  step = nm.make_train_step(None, agg, optax.sgd(1.0), encode=encode, decode=decode)
  state, metrics = step(step.init(model.params), model.batch)

  params, batch = model.params, model.batch
  dz = jax.jacrev(lambda z: decode(params, z, batch))(encode(params, batch)).reshape(k, -1)
  grads = jax.jacrev(model.loss_fn)(params, batch)
  update, agg_state = agg.update(grads, agg.init(params), params, gram=dz @ dz.T)
  expected = jax.tree.map(lambda p, u: p - u, params, update)
  jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-4), state.params, expected)
  assert_close(metrics["weights"], agg_state.weights, rtol=1e-4)
  assert "conflicts" in metrics  # solver diagnostics reach the metrics


def test_plain_optax_aggregators_run_on_stacked_task_gradients(seed):
  """`method.aggregator` in an `optax.chain`, under `optax.inject_hyperparams`, or copied
  with `_replace`, trains like the method itself (same params after a few steps)."""
  model = TanhMLP(np.random.default_rng(seed), num_tasks=3, task_scales=[0.5, 1.0, 4.0])
  method = nm.ntkmtl(3, shared=model.shared)
  reference, _ = _run(model, method, "unroll")
  injected = optax.inject_hyperparams(
    lambda exponent: nm.ntkmtl(3, exponent=exponent, shared=model.shared).aggregator,
    static_args=("exponent",),
  )(exponent=0.5)
  for wrapped in (
    method.aggregator,
    method.aggregator._replace(),
    optax.chain(method.aggregator, optax.identity()),
    injected,
  ):
    state, history = _run(model, wrapped, "unroll")
    assert bool(history[-1]["finite"])
    jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-5), state.params, reference.params)
  with pytest.raises(TypeError, match="optax aggregator"):
    nm.make_train_step(model.loss_fn, "ntkmtl", optax.sgd(0.1))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_params_train_with_kernel_and_solver_methods(dtype):
  """Half-precision models: kernel blocks, Grams and the solvers work in float32 (eigvalsh and
  the QP solvers have no half-precision kernels); the update keeps the parameters' dtype and
  agrees with the float32 step to half precision."""
  model = TanhMLP(np.random.default_rng(5), num_tasks=3, batch=8)
  low = jax.tree.map(lambda a: a.astype(dtype), model.params)
  low_batch = jax.tree.map(lambda a: a.astype(dtype), model.batch)
  for make in (
    lambda: nm.ntkmtl(3, num_chunks=4, shared=model.shared),
    lambda: nm.methods.get("nash_mtl", 3, shared=model.shared),
    lambda: nm.methods.get("mgda", 3, shared=model.shared),
  ):
    step = nm.make_train_step(model.loss_fn, make(), optax.sgd(1e-2))
    state, metrics = step(step.init(low), low_batch)
    assert bool(metrics["finite"]), make().name
    assert state.params["shared"]["w"].dtype == jnp.dtype(dtype)
    reference = nm.make_train_step(model.loss_fn, make(), optax.sgd(1e-2))
    ref_state, ref_metrics = reference(reference.init(model.params), model.batch)
    np.testing.assert_allclose(
      np.asarray(metrics["weights"], np.float32),
      ref_metrics["weights"],
      rtol=0.1,
      err_msg=make().name,
    )
