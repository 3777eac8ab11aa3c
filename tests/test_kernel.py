"""ntk_weights and the extended-NTK pieces against a float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkmtl_jax as nm
from ntkmtl_jax import kernel

from conftest import TanhMLP, flat_shared


def numpy_weights(eigs, exponent, normalization):
  ref = eigs.sum() if normalization == "sum" else eigs.mean()
  return (ref / eigs) ** exponent


@pytest.mark.parametrize("num_chunks", [1, 2, 4])
@pytest.mark.parametrize("normalization", ["sum", "mean"])
@pytest.mark.parametrize("exponent", [0.5, 0.75])
def test_ntk_weights_match_numpy(seed, num_chunks, normalization, exponent):
  rng = np.random.default_rng(seed)
  k = int(rng.integers(2, 6))
  model = TanhMLP(rng, num_tasks=k, task_scales=rng.uniform(0.2, 5.0, k), batch=8)
  jac = model.numpy_chunk_jacobian(num_chunks)  # (k, n, P) float64
  blocks = np.einsum("iap,jbp->ijab", jac, jac)
  eigs = np.array([np.linalg.eigvalsh(blocks[i, i])[-1] for i in range(k)])
  expected = numpy_weights(eigs, exponent, normalization)

  out = nm.ntk_weights(
    model.loss_fn,
    model.params,
    model.batch,
    num_chunks=num_chunks,
    exponent=exponent,
    normalization=normalization,
    shared=model.shared,
    return_blocks=True,
    return_jacobian=True,
  )
  np.testing.assert_allclose(out.eigenvalues, eigs, rtol=2e-4, err_msg=f"seed={seed}")
  np.testing.assert_allclose(out.weights, expected, rtol=2e-4, err_msg=f"seed={seed}")
  np.testing.assert_allclose(out.blocks, blocks, rtol=2e-4, atol=1e-5 * np.abs(blocks).max())
  np.testing.assert_allclose(
    flat_shared(out.jacobian), jac, rtol=2e-4, atol=1e-5 * np.abs(jac).max()
  )
  assert out.jacobian["heads"]["w"] is None  # only the shared parameters are differentiated
  # Shared parameters make the tasks interact: the off-diagonal blocks are not zero.
  off = blocks[~np.eye(k, dtype=bool)]
  assert np.abs(off).max() > 1e-3 * np.abs(blocks).max()


def test_paper_and_code_normalisations_differ_by_k_to_the_exponent(seed):
  model = TanhMLP(np.random.default_rng(seed), num_tasks=4)
  common = dict(shared=model.shared, exponent=0.75)
  code = nm.ntk_weights(model.loss_fn, model.params, model.batch, normalization="sum", **common)
  paper = nm.ntk_weights(model.loss_fn, model.params, model.batch, normalization="mean", **common)
  np.testing.assert_allclose(code.weights, paper.weights * 4**0.75, rtol=1e-5)


def test_power_iteration_on_stacked_blocks(seed):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(5, 7, 7))
  blocks = np.einsum("kab,kcb->kac", a, a)
  got = kernel.largest_eigenvalue(
    jnp.asarray(blocks, jnp.float32), method="power", power_iterations=500
  )
  np.testing.assert_allclose(got, np.linalg.eigvalsh(blocks)[:, -1], rtol=1e-3)


def test_ntk_weights_jit_matches_eager(seed):
  model = TanhMLP(np.random.default_rng(seed), num_tasks=3)
  fn = lambda p, b: nm.ntk_weights(model.loss_fn, p, b, num_chunks=2, shared=model.shared)
  eager = fn(model.params, model.batch)
  jitted = jax.jit(fn)(model.params, model.batch)
  np.testing.assert_allclose(jitted.weights, eager.weights, rtol=1e-5)


def test_zero_gradient_task_gets_finite_weight(seed):
  rng = np.random.default_rng(seed)
  eigs = jnp.asarray(np.concatenate([[0.0], rng.uniform(0.1, 10.0, 3)]), jnp.float32)
  w = kernel.weights_from_eigenvalues(eigs)
  assert np.all(np.isfinite(w))
  np.testing.assert_allclose(w[0], (1.0 / kernel.EIGENVALUE_FLOOR) ** 0.5, rtol=1e-3)
  # Every task dead: equal weights, no NaN.
  w0 = kernel.weights_from_eigenvalues(jnp.zeros(4))
  np.testing.assert_allclose(w0, np.full(4, 4**0.5), rtol=1e-6)
  # `floored_weight` replaces only the floored task's weight.
  wf = kernel.weights_from_eigenvalues(eigs, floored_weight=1.0)
  np.testing.assert_allclose(wf, np.concatenate([[1.0], np.asarray(w[1:])]), rtol=1e-6)


def test_zero_gradient_task_in_ntk_weights(seed):
  model = TanhMLP(np.random.default_rng(seed), num_tasks=3)
  params = model.params
  params["heads"]["w"] = params["heads"]["w"].at[:, 1].set(0.0)  # task 1 gets no gradient
  out = nm.ntk_weights(model.loss_fn, params, model.batch, shared=model.shared)
  assert out.eigenvalues[1] == 0.0
  assert np.all(np.isfinite(out.weights))


def test_batch_not_divisible_names_both_numbers():
  model = TanhMLP(np.random.default_rng(0), batch=10)
  with pytest.raises(ValueError, match=r"Batch size 10 .*num_chunks=4"):
    nm.ntk_weights(model.loss_fn, model.params, model.batch, num_chunks=4)


def test_wrong_loss_shape_names_expected_shape():
  model = TanhMLP(np.random.default_rng(0))
  scalar_loss = lambda p, b: jnp.sum(model.loss_fn(p, b))
  with pytest.raises(ValueError, match=r"shape \(num_tasks,\)"):
    nm.ntk_weights(scalar_loss, model.params, model.batch)


def test_mask_mismatch_and_empty_mask_are_explained():
  model = TanhMLP(np.random.default_rng(0))
  with pytest.raises(ValueError, match="does not match the parameter tree"):
    nm.ntk_weights(model.loss_fn, model.params, model.batch, shared={"shared": True})
  nothing = lambda p: jax.tree.map(lambda _: False, p)
  with pytest.raises(ValueError, match="selects no parameter"):
    nm.ntk_weights(model.loss_fn, model.params, model.batch, shared=nothing)


def test_representation_eigenvalues_are_chunk_gradient_norms(seed):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(8, 5))
  w = rng.normal(size=(5, 3))
  y = rng.normal(size=(8, 3))
  decode = lambda p, zz, b: jnp.mean((zz @ p - b["y"]) ** 2, axis=0)
  eig, losses = kernel.representation_eigenvalues(
    decode, jnp.asarray(w), jnp.asarray(z), {"y": jnp.asarray(y)}, num_chunks=4
  )
  expected = np.zeros(3)
  for zc, yc in zip(np.split(z, 4), np.split(y, 4)):
    err = zc @ w - yc
    for i in range(3):
      g = (2.0 / len(zc)) * err[:, i : i + 1] * w[:, i][None]  # d l_i / d z_c
      expected[i] = max(expected[i], np.sum(g**2))
  np.testing.assert_allclose(eig, expected, rtol=1e-4)
  assert losses.shape == (3, 4)
