"""The NTKMTL / NTKMTL-SR optax transforms and the official preset."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
import optax

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
  expected = k * np.sqrt(np.sum(norms ** 2)) * np.sum(g / norms[:, None], axis=0)
  assert_close(flat_shared(update), expected, err_msg=f"seed={seed}")
  direction = k * np.sum(g / norms[:, None], axis=0)
  cos = expected @ direction / np.linalg.norm(expected) / np.linalg.norm(direction)
  np.testing.assert_allclose(cos, 1.0, rtol=1e-9)
  # Heads get their plain, unweighted gradients.
  assert_close(update["heads"]["w"], heads.sum(0))
  np.testing.assert_allclose(state.eigenvalues, norms ** 2, rtol=2e-4)
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
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
               updates, expected)


def test_kernel_form_takes_eigenvalues_as_extra_argument(seed):
  rng = np.random.default_rng(seed)
  model = TanhMLP(rng, num_tasks=3, batch=8)
  ntk = nm.ntk_weights(model.loss_fn, model.params, model.batch, num_chunks=4,
                       shared=model.shared)
  agg = nm.ntkmtl(3, num_chunks=4, shared=model.shared, normalization="mean", exponent=0.75)
  grads = stacked_task_grads(model)
  update, state = agg.update(grads, agg.init(model.params), model.params,
                             eigenvalues=ntk.eigenvalues)
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
  params = {"z": jnp.asarray(rng.normal(size=(batch, dim)), jnp.float32),
            "heads": jnp.asarray(rng.normal(size=(dim, k)), jnp.float32)}
  data = {"y": jnp.asarray(rng.normal(size=(batch, k)) * rng.uniform(0.3, 3, k), jnp.float32),
          "row": jnp.arange(batch)}
  shared = {"z": True, "heads": False}
  decode = lambda p, z, b: jnp.mean((jnp.tanh(z @ p["heads"]) - b["y"]) ** 2, axis=0)
  encode = lambda p, b: p["z"][b["row"]]
  loss_fn = lambda p, b: decode(p, encode(p, b), b)

  full = nm.ntk_weights(loss_fn, params, data, num_chunks=n, shared=shared)
  eig, _ = nm.representation_eigenvalues(decode, params, encode(params, data), data,
                                         num_chunks=n)
  np.testing.assert_allclose(eig, full.eigenvalues, rtol=1e-4)

  sr = nm.make_train_step(None, nm.ntkmtl_sr(k, num_chunks=n, shared=shared), optax.sgd(0.1),
                          encode=encode, decode=decode)
  _, metrics = sr(sr.init(params), data)
  np.testing.assert_allclose(metrics["weights"], full.weights, rtol=1e-4)


def test_wrong_number_of_tasks_is_reported():
  agg = nm.ntkmtl(4)
  grads = {"w": jnp.ones((3, 5))}
  with pytest.raises(ValueError, match="built for 4 tasks"):
    agg.update(grads, agg.init({"w": jnp.zeros(5)}))


def test_bad_hyperparameters_are_reported():
  with pytest.raises(ValueError, match="exponent"):
    nm.ntkmtl(3, exponent=0.0)
  with pytest.raises(ValueError, match="normalization"):
    nm.weights_from_eigenvalues(jnp.ones(3), normalization="median")
  with pytest.raises(ValueError, match="eigenvalue_ema"):
    nm.ntkmtl(3, eigenvalue_ema=1.0)
