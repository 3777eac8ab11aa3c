"""MoDo and CR-MOGM (methods/stochastic.py): the weights over several steps against NumPy/SciPy
references of their recursions, on random and hard Jacobians."""

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from ntkmtl_jax import methods
from ntkmtl_jax.testing import cases

from conftest import enable_x64, random_jacobian, run_gram_weighting

HARD = ("imbalanced", "near_collinear", "near_opposite")


def numpy_simplex_projection(v):
  """argmin_{x >= 0, sum x = 1} ||x - v||, by bisection on the threshold (not by sorting)."""
  lo, hi = v.min() - 1.0, v.max()
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if np.maximum(v - mid, 0).sum() > 1 else (lo, mid)
  return np.maximum(v - 0.5 * (lo + hi), 0)


def scipy_min_norm(gram):
  k = len(gram)
  res = scipy.optimize.minimize(
    lambda w: w @ gram @ w,
    np.ones(k) / k,
    jac=lambda w: 2 * gram @ w,
    bounds=[(0, 1)] * k,
    constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
    method="SLSQP",
    options={"ftol": 1e-16, "maxiter": 1000},
  )
  return res.x


def steps(rng, jac, count=4):
  """`count` steps of the Jacobian, perturbed by 5 % from the second on."""
  return [(jac * (1 + 0.05 * rng.normal(size=jac.shape))) if t else jac for t in range(count)]


def run(agg, jacs, dtype=jnp.float32):
  state, out = None, []
  for jac in jacs:
    weights, state = run_gram_weighting(agg, jnp.asarray(jac @ jac.T, dtype), state=state)
    out.append(weights)
  return np.stack(out), state


@pytest.mark.parametrize("gamma", [0.001, 0.1])
def test_modo_follows_its_projected_steps(seed, gamma):
  rng = np.random.default_rng(seed)
  jacs = steps(rng, random_jacobian(rng, p=30))
  k = len(jacs[0])
  weights, _ = run(methods.get("modo", k, gamma=gamma), jacs)
  lam = np.ones(k) / k
  for t, jac in enumerate(jacs):
    lam = numpy_simplex_projection(lam - gamma * (jac @ jac.T @ lam + 0.1 * lam))
    np.testing.assert_allclose(weights[t], lam, rtol=1e-4, atol=1e-6, err_msg=f"step {t}")


@pytest.mark.parametrize("family", HARD)
def test_modo_on_hard_cases(seed, family):
  rng = np.random.default_rng(seed)
  for k in (3, 5):
    case = cases.make_case(family, k, seed, dim=30)
    # Normalised so that gamma's step is neither nothing nor a jump to a vertex.
    jacs = steps(rng, case.jacobian / np.linalg.norm(case.jacobian, axis=1).mean())
    with enable_x64():
      weights, _ = run(methods.get("modo", k, gamma=0.05), jacs, jnp.float64)
    lam = np.ones(k) / k
    for t, jac in enumerate(jacs):
      lam = numpy_simplex_projection(lam - 0.05 * (jac @ jac.T @ lam + 0.1 * lam))
      # (lambda lives in the float32 state between steps)
      np.testing.assert_allclose(weights[t], lam, rtol=1e-6, atol=1e-7, err_msg=case.name)


def test_cr_mogm_averages_min_norm_weights(seed):
  rng = np.random.default_rng(seed)
  jacs = steps(rng, random_jacobian(rng, p=30))
  k = len(jacs[0])
  weights, state = run(methods.get("cr_mogm", k, alpha=0.3), jacs)
  lam = None
  for t, jac in enumerate(jacs):
    hat = scipy_min_norm(jac @ jac.T)
    lam = hat if lam is None else 0.7 * lam + 0.3 * hat
    np.testing.assert_allclose(weights[t], lam, atol=2e-4, err_msg=f"step {t}")
  assert int(state.solver_failures) == 0


@pytest.mark.parametrize("family", HARD)
def test_cr_mogm_on_hard_cases(seed, family):
  # Each step's min-norm weights (alpha = 1: no average; the average, from the float32
  # state, is checked above) satisfy the optimality conditions of min ||J^T w|| on the
  # simplex: (G w)_i >= w^T G w, with equality where w_i > 0 (relative to the largest
  # |G_ij|, float64).
  rng = np.random.default_rng(seed)
  for k in (3, 5):
    case = cases.make_case(family, k, seed, dim=30)
    jacs = steps(rng, case.jacobian)
    with enable_x64():
      weights, _ = run(methods.get("cr_mogm", k, alpha=1.0), jacs, jnp.float64)
    for hat, jac in zip(weights, jacs):
      gram = jac @ jac.T
      value, slopes = hat @ gram @ hat, gram @ hat
      tol = 1e-7 * np.abs(gram).max()
      np.testing.assert_allclose(hat.sum(), 1.0, rtol=1e-9)
      assert np.all(hat >= -1e-9) and np.all(slopes >= value - tol), case.name
      assert np.all(np.abs(slopes - value)[hat > 1e-6] <= tol), case.name


def test_refuses_bad_hyperparameters():
  with pytest.raises(ValueError, match="alpha"):
    methods.get("cr_mogm", 3, alpha=0.0)
  with pytest.raises(ValueError, match="gamma"):
    methods.get("modo", 3, gamma=-1.0)


def test_modo_double_sampling_through_the_gram_argument(seed):
  # The paper's estimator: lambda steps on G_1 G_2^T (two independent batches), the update
  # combines a third batch's gradients.
  import jax

  rng = np.random.default_rng(seed)
  j1, j2, j3 = (random_jacobian(rng, k=3, p=12) for _ in range(3))
  agg = methods.get("modo", 3, gamma=0.05)
  params = {"w": jnp.zeros(12)}
  out, state = jax.jit(agg.update)(
    {"w": jnp.asarray(j3, jnp.float32)},
    agg.init(params),
    params,
    gram=jnp.asarray(j1 @ j2.T, jnp.float32),
  )
  lam = numpy_simplex_projection(np.ones(3) / 3 - 0.05 * (j1 @ j2.T @ (np.ones(3) / 3) + 0.1 / 3))
  np.testing.assert_allclose(np.asarray(state.simplex_weights), lam, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(out["w"]), lam @ j3, rtol=1e-4, atol=1e-5)
