"""The conflict-resolving methods (PCGrad, GradDrop, GradVac; methods/conflict.py): each
method's defining property on fresh random Jacobians, float32 against float64 NumPy
replicas of the papers' algorithms."""

import jax
import jax.numpy as jnp
import numpy as np

from ntkmtl_jax import methods
from ntkmtl_jax.methods import conflict

from conftest import assert_close, gram32, random_jacobian, random_wide_jacobian
from conftest import run_gram_weighting as run_weighting

# ------------------------------------------------------------------------------- PCGrad


def numpy_pcgrad(jac, orders):
  projected = jac.copy()
  for i in range(jac.shape[0]):
    for j in orders[i]:
      dot = projected[i] @ jac[j]
      if dot < 0:
        projected[i] -= dot / (jac[j] @ jac[j]) * jac[j]
  return projected


def test_pcgrad_matches_reference_and_removes_the_conflicts_it_projects(seed):
  rng = np.random.default_rng(seed)
  jac = random_jacobian(rng)
  k = jac.shape[0]
  key = jax.random.key(seed)
  agg = methods.get("pcgrad", k)
  update, state = jax.jit(agg.update)({"w": jnp.asarray(jac, jnp.float32)}, agg.init(None), key=key)
  orders_and_coefficients = jax.jit(
    lambda g, kk: (
      conflict.pcgrad_orders(kk, k),
      conflict.pcgrad_coefficients(g, conflict.pcgrad_orders(kk, k)),
    )
  )
  orders, coeffs = orders_and_coefficients(gram32(jac), key)
  orders = np.asarray(orders)
  assert all(sorted(o) == list(range(k)) for o in orders)
  projected = numpy_pcgrad(jac, orders)
  assert_close(update["w"], projected.sum(0), rtol=1e-4, err_msg=f"seed={seed}")
  scale = np.linalg.norm(jac, axis=1).max() ** 2
  # Defining property: after the last projection of its order, task i's gradient no longer
  # conflicts with that task's original gradient ...
  ours = np.asarray(coeffs, np.float64) @ jac
  for i in range(k):
    assert ours[i] @ jac[orders[i][-1]] >= -1e-5 * scale, f"seed={seed}"
  # ... and with two tasks, no conflict is left at all.
  two = random_jacobian(rng, k=2)
  # Force a conflict: <g_1, g_0> = -|g_1| |g_0| / 2 after this.
  two[1] -= (
    ((two[1] @ two[0]) + 0.5 * np.linalg.norm(two[1]) * np.linalg.norm(two[0]))
    / (two[0] @ two[0])
    * two[0]
  )
  assert two[1] @ two[0] < 0
  c2 = np.asarray(jax.jit(conflict.pcgrad_coefficients)(gram32(two), jnp.asarray([[1, 0], [0, 1]])))
  pc = c2 @ two
  scale2 = np.linalg.norm(two, axis=1).max() ** 2
  assert pc[0] @ two[1] >= -1e-5 * scale2 and pc[1] @ two[0] >= -1e-5 * scale2
  assert abs(pc[0] @ two[1]) <= 1e-5 * scale2, "a conflicting pair is projected to orthogonal"
  off = (jac @ jac.T)[np.triu_indices(k, 1)]
  assert int(state.conflicts) == int(np.sum(off < 0))


# ----------------------------------------------------------------------------- GradDrop


def test_graddrop_output_is_the_sum_of_one_sign(seed):
  rng = np.random.default_rng(seed)
  jac = random_jacobian(rng, p=200)
  jac[:, :20] = np.abs(jac[:, :20])  # purity 1: every positive entry is kept
  k = jac.shape[0]
  agg = methods.get("graddrop", k)
  update, state = jax.jit(agg.update)(
    {"w": jnp.asarray(jac, jnp.float32)}, agg.init(None), key=jax.random.key(seed)
  )
  out = np.asarray(update["w"], np.float64)
  positive = np.where(jac > 0, jac, 0).sum(0)
  negative = np.where(jac < 0, jac, 0).sum(0)
  tol = 1e-5 * np.abs(jac).max()
  is_pos = np.abs(out - positive) <= tol
  is_neg = np.abs(out - negative) <= tol
  assert np.all(is_pos | is_neg), f"seed={seed}"
  # The output's sign agrees with every gradient entry that was kept.
  assert np.all(np.sign(out[is_pos & ~is_neg]) >= 0) and np.all(np.sign(out[is_neg & ~is_pos]) <= 0)
  np.testing.assert_allclose(out[:20], jac[:, :20].sum(0), rtol=1e-5)
  # Both signs are chosen somewhere (P = 200 coordinates with mixed purity).
  mixed = (positive != 0) & (negative != 0)
  assert np.any(is_pos & mixed & ~is_neg) and np.any(is_neg & mixed & ~is_pos), f"seed={seed}"
  assert np.all((np.asarray(state.kept_fraction) >= 0) & (np.asarray(state.kept_fraction) <= 1))


def test_graddrop_leak_one_keeps_everything(seed):
  rng = np.random.default_rng(seed)
  jac = random_jacobian(rng)
  direction, _ = jax.jit(conflict.graddrop_direction)(
    jnp.asarray(jac, jnp.float32), jax.random.key(seed), jnp.ones(jac.shape[0])
  )
  assert_close(direction, jac.sum(0), rtol=1e-5, err_msg=f"seed={seed}")


# -------------------------------------------------------------------------------- GradVac


def numpy_gradvac(jac, orders, targets, beta):
  """The paper's Algorithm 1 on explicit float64 gradients; returns (update, targets, pcs)."""
  k = jac.shape[0]
  targets = targets.copy()
  pcs = jac.copy()
  for i in range(k):
    for j in orders[i]:
      if j == i:
        continue
      phi = pcs[i] @ jac[j] / (np.linalg.norm(pcs[i]) * np.linalg.norm(jac[j]))
      if phi < targets[i, j]:
        t = targets[i, j]
        w = (
          np.linalg.norm(pcs[i])
          * (t * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - t**2))
          / (np.linalg.norm(jac[j]) * np.sqrt(1 - t**2))
        )
        pcs[i] = pcs[i] + w * jac[j]
      targets[i, j] = (1 - beta) * targets[i, j] + beta * phi
  return pcs.sum(0), targets, pcs


def test_gradvac_matches_the_papers_algorithm(seed):
  rng = np.random.default_rng(seed)
  jac = random_wide_jacobian(rng)
  k = jac.shape[0]
  beta = float(rng.uniform(0.01, 0.5))
  agg = methods.get("gradvac", k, beta=beta)
  targets = rng.uniform(-0.5, 0.9, size=(k, k))
  state = agg.init(None)._replace(targets=jnp.asarray(targets, jnp.float32))
  key = jax.random.key(seed)
  weights, new_state = run_weighting(agg, gram32(jac), key=key, state=state)
  orders = np.asarray(conflict.pcgrad_orders(key, k))
  update, new_targets, _ = numpy_gradvac(jac, orders, targets, beta)
  assert_close(weights @ jac, update, rtol=1e-3, err_msg=f"seed={seed}")
  np.testing.assert_allclose(
    np.asarray(new_state.targets), new_targets, atol=2e-4, err_msg=f"seed={seed}"
  )


def test_gradvac_two_tasks_reach_their_targets(seed):
  rng = np.random.default_rng(seed)
  jac = random_wide_jacobian(rng, k=2)
  targets = rng.uniform(-0.3, 0.9, size=(2, 2))
  agg = methods.get("gradvac", 2)
  state = agg.init(None)._replace(targets=jnp.asarray(targets, jnp.float32))
  coeffs, _, adjusted = conflict.gradvac_coefficients(
    gram32(jac), jnp.array([[0, 1], [1, 0]]), state.targets, 0.01
  )
  corrected = np.asarray(coeffs, np.float64) @ jac
  phi = jac[0] @ jac[1] / np.prod(np.linalg.norm(jac, axis=1))
  for i, j in ((0, 1), (1, 0)):
    cosine = corrected[i] @ jac[j] / (np.linalg.norm(corrected[i]) * np.linalg.norm(jac[j]))
    # Raised exactly to the target where below it, untouched otherwise.
    np.testing.assert_allclose(cosine, max(phi, targets[i, j]), atol=1e-4, err_msg=f"seed={seed}")
  assert int(adjusted) == int(np.sum(phi < targets[[0, 1], [1, 0]]))


def test_gradvac_leaves_zero_gradients_alone(seed):
  rng = np.random.default_rng(seed)
  jac = random_wide_jacobian(rng, k=3)
  jac[1] = 0.0
  agg = methods.get("gradvac", 3)
  state = agg.init(None)._replace(targets=jnp.full((3, 3), 0.5, jnp.float32))
  weights, _ = run_weighting(agg, gram32(jac), key=jax.random.key(seed), state=state)
  assert np.all(np.isfinite(weights)) and np.abs(weights).max() < 1e3, f"seed={seed}"
