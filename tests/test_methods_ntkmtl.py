"""NTKMTL / NTKMTL-SR (methods/ntkmtl.py), the official preset, and the typed method records."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ntkmtl_jax as nm

from conftest import TanhMLP, assert_close, flat_shared


def stacked_task_grads(model):
  return jax.jacrev(model.loss_fn)(model.params, model.batch)  # leaves (k, ...)


def test_official_preset_shared_update_closed_form(seed):
  rng = np.random.default_rng(seed)
  k = int(rng.integers(2, 6))
  model = TanhMLP(rng, num_tasks=k, task_scales=rng.uniform(0.2, 5.0, k))
  g, heads = model.numpy_task_gradients()
  norms = np.linalg.norm(g, axis=1)
  agg, clip = nm.official_ntkmtl(k, shared=model.shared)
  update, state = agg.update(stacked_task_grads(model), agg.init(model.params), model.params)
  # With exponent 0.5, w_i = sqrt(sum_j ||g_j||^2) / ||g_i||: the official shared update is
  # k * sqrt(sum_j ||g_j||^2) * sum_i g_i / ||g_i||, i.e. along k * sum_i g_i / ||g_i||.
  expected = k * np.sqrt(np.sum(norms**2)) * np.sum(g / norms[:, None], axis=0)
  assert_close(flat_shared(update), expected, err_msg=f"seed={seed}")
  direction = k * np.sum(g / norms[:, None], axis=0)
  cos = expected @ direction / np.linalg.norm(expected) / np.linalg.norm(direction)
  np.testing.assert_allclose(cos, 1.0, rtol=1e-9)
  # Heads get their plain, unweighted gradients.
  assert_close(update["heads"]["w"], heads.sum(0))
  np.testing.assert_allclose(state.eigenvalues, norms**2, rtol=2e-4)
  # The clip acts on the shared update only.
  clipped, _ = clip.update(update, clip.init(model.params))
  np.testing.assert_allclose(np.linalg.norm(flat_shared(clipped)), 1.0, rtol=1e-5)
  np.testing.assert_allclose(clipped["heads"]["w"], update["heads"]["w"], rtol=1e-6)


def test_composes_in_optax_chain(seed):
  model = TanhMLP(np.random.default_rng(seed), num_tasks=3)
  agg = nm.ntkmtl(3, shared=model.shared)
  tx = optax.chain(agg, nm.clip_shared_by_global_norm(1.0, model.shared), optax.adam(1e-2))
  state = tx.init(model.params)
  grads = stacked_task_grads(model)
  updates, state = jax.jit(tx.update)(grads, state, model.params)
  # Same as running the pieces by hand.
  agg_update, _ = agg.update(grads, agg.init(model.params), model.params)
  clip = nm.clip_shared_by_global_norm(1.0, model.shared)
  clipped, _ = clip.update(agg_update, clip.init(model.params))
  adam = optax.adam(1e-2)
  expected, _ = adam.update(clipped, adam.init(model.params))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), updates, expected
  )


def test_kernel_form_takes_eigenvalues_as_extra_argument(seed):
  rng = np.random.default_rng(seed)
  model = TanhMLP(rng, num_tasks=3, batch=8)
  ntk = nm.ntk_weights(model.loss_fn, model.params, model.batch, num_chunks=4, shared=model.shared)
  agg = nm.ntkmtl(
    3,
    num_chunks=4,
    shared=model.shared,
    normalization="mean",
    exponent=0.75,
    scale_by_num_tasks=False,
  )  # the paper's formula
  grads = stacked_task_grads(model)
  update, state = agg.update(
    grads, agg.init(model.params), model.params, eigenvalues=ntk.eigenvalues
  )
  eigs = np.asarray(ntk.eigenvalues, np.float64)
  w = (eigs.mean() / eigs) ** 0.75
  g, _ = model.numpy_task_gradients()
  assert_close(flat_shared(update), w @ g)
  with pytest.raises(ValueError, match="eigenvalues"):
    agg.update(grads, agg.init(model.params), model.params)


def test_eigenvalue_ema(seed):
  rng = np.random.default_rng(seed)
  agg = nm.ntkmtl(3, eigenvalue_ema=0.9)
  grads = {"w": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)}
  state = agg.init({"w": jnp.zeros(5)})
  _, state = agg.update(grads, state)
  first = np.sum(np.asarray(grads["w"], np.float64) ** 2, axis=1)
  np.testing.assert_allclose(state.eigenvalues, first, rtol=1e-5)
  grads2 = {"w": grads["w"] * 2.0}
  _, state = agg.update(grads2, state)
  np.testing.assert_allclose(state.eigenvalues, 0.9 * first + 0.1 * 4 * first, rtol=1e-5)
  assert int(state.count) == 2


def test_sr_equals_full_kernel_when_encoder_is_identity(seed):
  """With z a parameter (identity encoder), the kernel at z is the kernel at the shared
  parameters, so NTKMTL-SR and NTKMTL (n chunks) give the same eigenvalues and weights."""
  rng = np.random.default_rng(seed)
  k, batch, dim, n = 3, 8, 5, 4
  params = {
    "z": jnp.asarray(rng.normal(size=(batch, dim)), jnp.float32),
    "heads": jnp.asarray(rng.normal(size=(dim, k)), jnp.float32),
  }
  data = {
    "y": jnp.asarray(rng.normal(size=(batch, k)) * rng.uniform(0.3, 3, k), jnp.float32),
    "row": jnp.arange(batch),
  }
  shared = {"z": True, "heads": False}
  decode = lambda p, z, b: jnp.mean((jnp.tanh(z @ p["heads"]) - b["y"]) ** 2, axis=0)
  encode = lambda p, b: p["z"][b["row"]]
  loss_fn = lambda p, b: decode(p, encode(p, b), b)

  full = nm.ntk_weights(loss_fn, params, data, num_chunks=n, shared=shared)
  eig, _ = nm.representation_eigenvalues(decode, params, encode(params, data), data, num_chunks=n)
  np.testing.assert_allclose(eig, full.eigenvalues, rtol=1e-4)

  sr = nm.make_train_step(
    None, nm.ntkmtl_sr(k, num_chunks=n, shared=shared), optax.sgd(0.1), encode=encode, decode=decode
  )
  _, metrics = sr(sr.init(params), data)
  np.testing.assert_allclose(metrics["weights"], full.weights, rtol=1e-4)


def test_wrong_number_of_tasks_is_reported():
  agg = nm.ntkmtl(4)
  grads = {"w": jnp.ones((3, 5))}
  with pytest.raises(ValueError, match="built for 4 tasks"):
    agg.update(grads, agg.init({"w": jnp.zeros(5)}))


def test_sr_task_without_shared_gradient_keeps_a_plain_head_update(seed):
  """A task whose loss never reaches the encoder (d l / d z = 0) gets weight 1 under
  NTKMTL-SR: its head moves by its ordinary gradient and stays finite under SGD, while the
  other tasks keep their NTKMTL-SR weights."""
  rng = np.random.default_rng(seed)
  batch, dim = 8, 4
  params = {
    "enc": jnp.asarray(rng.normal(size=(3, dim)), jnp.float32),
    "heads": jnp.asarray(rng.normal(size=(dim, 2)), jnp.float32),
    "bias": jnp.asarray(rng.normal(size=()), jnp.float32),
  }
  data = {
    "x": jnp.asarray(rng.normal(size=(batch, 3)), jnp.float32),
    "y": jnp.asarray(rng.normal(size=(batch, 3)) * [1.0, 30.0, 5.0], jnp.float32),
  }
  shared = {"enc": True, "heads": False, "bias": False}
  encode = lambda p, b: jnp.tanh(b["x"] @ p["enc"])

  def decode(p, z, b):
    fit = jnp.mean((z @ p["heads"] - b["y"][:, :2]) ** 2, axis=0)
    constant = jnp.mean((p["bias"] - b["y"][:, 2]) ** 2)  # does not use z
    return jnp.concatenate([fit, constant[None]])

  lr = 0.05
  step = nm.make_train_step(
    None, nm.ntkmtl_sr(3, num_chunks=2, shared=shared), optax.sgd(lr), encode=encode, decode=decode
  )
  state = step.init(params)
  for _ in range(30):
    before = float(state.params["bias"])
    state, metrics = step(state, data)
    assert bool(metrics["finite"])
    w = np.asarray(metrics["weights"])
    assert w[2] == 1.0 and np.all(w[:2] > 1.0), w
    plain = 2.0 * np.mean(before - np.asarray(data["y"][:, 2]))
    np.testing.assert_allclose(
      float(state.params["bias"]), before - lr * plain, rtol=1e-4, atol=1e-5
    )
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))


def test_needs_and_methods_are_typed_records():
  method = nm.ntkmtl(3, num_chunks=4, statistic="trace")
  assert isinstance(method, nm.Weighting) and nm.is_method(method)
  assert method.needs == nm.Needs("kernel", 4, statistic="trace")
  assert method.needs.task_gradients and not method.needs.uses_representation
  assert nm.ntkmtl(3).needs.kind == "sq_norms"
  assert nm.ntkmtl_sr(3).needs == nm.Needs("representation", 4)
  with pytest.raises(dataclasses.FrozenInstanceError):
    method.needs = nm.Needs("losses")
  # The derived optax Aggregator is a plain one, and chains.
  assert type(method.aggregator).__name__ == "Aggregator"
  with pytest.raises(ValueError, match="num_chunks"):
    nm.Needs("gram", num_chunks=2)
  with pytest.raises(ValueError, match="kind"):
    nm.Needs("hessian")
  with pytest.raises(ValueError, match="power method"):
    nm.Needs("kernel", 4, eigen_method="power", statistic="top_r")


@pytest.mark.parametrize("factory", [nm.ntkmtl, nm.ntkmtl_sr])
@pytest.mark.parametrize("exponent", [0.0, -1.0, float("nan"), float("inf"), "abc"])
def test_both_variants_refuse_a_bad_exponent(factory, exponent):
  with pytest.raises(ValueError, match="exponent must be a positive finite number"):
    factory(3, exponent=exponent)


def test_clip_refuses_a_norm_that_would_zero_or_reverse_the_update():
  for bad in (0.0, -1.0, float("nan")):
    with pytest.raises(ValueError, match="max_norm must be positive"):
      nm.clip_shared_by_global_norm(bad)
    with pytest.raises(ValueError, match="max_norm must be positive"):
      nm.official_ntkmtl(3, max_norm=bad)


def test_bad_hyperparameters_are_reported():
  with pytest.raises(ValueError, match="exponent"):
    nm.ntkmtl(3, exponent=0.0)
  with pytest.raises(ValueError, match="normalization"):
    nm.weights_from_eigenvalues(jnp.ones(3), normalization="median")
  with pytest.raises(ValueError, match="eigenvalue_ema"):
    nm.ntkmtl(3, eigenvalue_ema=1.0)
