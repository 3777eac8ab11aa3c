"""The alignment methods (IMTL-G, Aligned-MTL, ConFIG; methods/alignment.py): each method's
defining property on fresh random Jacobians, float32 against float64 NumPy references."""

import numpy as np
import pytest

from ntkmtl_jax import methods
from ntkmtl_jax.methods import alignment

from conftest import assert_close, gram32, random_jacobian, random_wide_jacobian
from conftest import run_gram_weighting as run_weighting

# ------------------------------------------------------------------------------- IMTL-G


def test_imtl_g_projections_on_unit_gradients_are_equal(seed):
  rng = np.random.default_rng(seed)
  jac = random_jacobian(rng)
  k = jac.shape[0]
  weights, state = run_weighting(methods.get("imtl_g", k), gram32(jac))
  np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-5)
  d = weights @ jac
  projections = (jac / np.linalg.norm(jac, axis=1, keepdims=True)) @ d
  np.testing.assert_allclose(
    projections,
    projections.mean(),
    rtol=1e-3,
    atol=1e-4 * np.abs(projections).max(),
    err_msg=f"seed={seed}",
  )
  assert int(state.solver_failures) == 0


@pytest.mark.parametrize("scale", [1.0, 1e2, 1e4])
def test_imtl_g_two_tasks_near_parallel_is_flagged_singular_and_stays_finite(seed, scale):
  """Two tasks: the system is 1 x 1, ~ ||g|| angle^2 for a near-parallel pair (where every
  weighting projects equally and float32 returns arbitrary weights); it must be said singular
  and fall back to the ridge, while a pair at a clear angle (any scale ratio) must not."""
  rng = np.random.default_rng(seed)
  g = rng.normal(size=64)
  for angle in (1e-6, 1e-4, 1e-3):
    other = g + angle * np.linalg.norm(g) * rng.normal(size=64) / 8.0
    jac = np.stack([g, scale * other])
    weights, singular = alignment.imtl_g_weights(gram32(jac))
    assert bool(singular), (angle, scale)
    assert np.all(np.isfinite(np.asarray(weights))) and abs(float(weights.sum()) - 1.0) < 1e-5
  jac = np.stack([g, scale * rng.normal(size=64)])  # about 90 degrees apart
  weights, singular = alignment.imtl_g_weights(gram32(jac))
  assert not bool(singular)
  d = np.asarray(weights, np.float64) @ jac
  projections = (jac / np.linalg.norm(jac, axis=1, keepdims=True)) @ d
  np.testing.assert_allclose(projections[0], projections[1], rtol=1e-3)


# ---------------------------------------------------------------------------- Aligned-MTL


def numpy_aligned_balance(gram, scale_mode):
  lam, vec = np.linalg.eigh(gram)
  keep = lam > lam.max() * len(gram) * np.finfo(np.float32).eps
  lam, vec = lam[keep], vec[:, keep]
  scale = {"min": lam.min(), "median": np.sort(lam)[(len(lam) - 1) // 2], "rmse": lam.mean()}[
    scale_mode
  ]
  return np.sqrt(scale) * vec @ np.diag(lam**-0.5) @ vec.T, scale


@pytest.mark.parametrize("scale_mode", ("min", "median", "rmse"))
def test_aligned_mtl_aligns_to_equal_singular_values(seed, scale_mode):
  rng = np.random.default_rng(seed)
  jac = random_wide_jacobian(rng)
  k = jac.shape[0]
  agg = methods.get("aligned_mtl", k, scale_mode=scale_mode)
  weights, state = run_weighting(agg, gram32(jac))
  balance, scale = numpy_aligned_balance(jac @ jac.T, scale_mode)
  assert_close(weights, balance.sum(axis=1), rtol=1e-3, err_msg=f"seed={seed}")
  # The aligned gradients (columns of J^T B) have k equal singular values sqrt(scale).
  aligned_balance, _, rank = alignment.aligned_mtl_transform(gram32(jac), scale_mode)
  singular = np.linalg.svd(jac.T @ np.asarray(aligned_balance, np.float64), compute_uv=False)
  np.testing.assert_allclose(
    singular / singular.max(), np.ones(k), rtol=1e-3, err_msg=f"seed={seed}"
  )
  assert int(rank) == k
  lam = np.linalg.eigvalsh(jac @ jac.T)
  np.testing.assert_allclose(
    float(state.condition_number), np.sqrt(lam.max() / lam.min()), rtol=1e-2, err_msg=f"seed={seed}"
  )


def test_aligned_mtl_rank_deficient_keeps_the_range(seed):
  rng = np.random.default_rng(seed)
  jac = random_wide_jacobian(rng, k=int(rng.integers(4, 7)), p=3)
  weights, state = run_weighting(methods.get("aligned_mtl", jac.shape[0]), gram32(jac))
  balance, _ = numpy_aligned_balance(jac @ jac.T, "min")
  assert int(state.rank) == 3, f"seed={seed}"
  assert_close(weights @ jac, balance.sum(axis=1) @ jac, rtol=1e-2, err_msg=f"seed={seed}")


# --------------------------------------------------------------------------------- ConFIG


def test_config_has_equal_cosines_and_the_projection_length(seed):
  rng = np.random.default_rng(seed)
  jac = random_wide_jacobian(rng)
  k = jac.shape[0]
  weights, state = run_weighting(methods.get("config", k), gram32(jac))
  update = weights @ jac
  cosines = jac @ update / (np.linalg.norm(jac, axis=1) * np.linalg.norm(update))
  np.testing.assert_allclose(cosines, np.full(k, cosines.mean()), rtol=1e-3, err_msg=f"seed={seed}")
  assert cosines.min() > 0, f"seed={seed}"
  np.testing.assert_allclose(float(state.cosine), cosines.mean(), rtol=1e-3)
  # The paper's direction: the least-squares solution of U^T d = 1 (U the unit gradients),
  # scaled by the sum of the projections of the gradients on its unit vector.
  unit_grads = jac / np.linalg.norm(jac, axis=1, keepdims=True)
  direction = np.linalg.lstsq(unit_grads, np.ones(k), rcond=None)[0]
  direction /= np.linalg.norm(direction)
  assert_close(update, np.sum(jac @ direction) * direction, rtol=1e-3, err_msg=f"seed={seed}")
