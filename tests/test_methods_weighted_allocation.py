"""PIVRG and ConsMTL (methods/weighted_allocation.py): the weights solve G x = sqrt(p / x) with
PIVRG's priorities, against SciPy's least_squares (the authors' solver) and the defining
system on random and hard Jacobians."""

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from ntkmtl_jax import methods
from ntkmtl_jax.testing import cases

from conftest import enable_x64, gram32, random_jacobian, run_gram_weighting


def numpy_priorities(scores, bound=2.0, min_temperature=10.0):
  temperature = max((scores.max() - scores.min()) / np.log(bound), min_temperature)
  e = np.exp((scores - scores.max()) / temperature)
  return len(scores) * e / e.sum()


def scipy_weights(gram, priorities):
  """The authors' solve: least_squares of G x - sqrt(p / x) from x = 1/k, x >= 0."""
  k = len(gram)
  fun = lambda x: gram @ x - np.sqrt(priorities / x)
  return scipy.optimize.least_squares(
    fun, np.ones(k) / k, bounds=(0, np.inf), xtol=1e-15, ftol=1e-15, gtol=1e-15
  ).x


def test_pivrg_priorities_and_weights_match_scipy(seed):
  rng = np.random.default_rng(seed)
  jac = random_jacobian(rng, k=int(rng.integers(2, 6)), p=40)
  k = len(jac)
  first, now = rng.uniform(0.5, 2.0, k), rng.uniform(0.1, 2.0, k)
  agg = methods.get("pivrg", k)
  _, state = run_gram_weighting(agg, gram32(jac), losses=jnp.asarray(first, jnp.float32))
  weights, state = run_gram_weighting(
    agg, gram32(jac), losses=jnp.asarray(now, jnp.float32), state=state
  )
  priorities = numpy_priorities(100 * now / first)
  np.testing.assert_allclose(np.asarray(state.priorities), priorities, rtol=1e-5)
  assert priorities.max() / priorities.min() <= 2.0 + 1e-9
  expected = k * scipy_weights(jac @ jac.T, priorities)
  np.testing.assert_allclose(weights, expected, rtol=2e-3, err_msg=f"seed={seed}")
  assert int(state.solver_failures) == 0


def test_consmtl_is_fairgrad_alpha_two(seed):
  rng = np.random.default_rng(seed)
  jac = random_jacobian(rng, p=40)
  k = len(jac)
  weights, _ = run_gram_weighting(methods.get("consmtl", k), gram32(jac))
  np.testing.assert_allclose(weights, k * scipy_weights(jac @ jac.T, np.ones(k)), rtol=2e-3)


@pytest.mark.parametrize("family", ("imbalanced", "near_collinear", "near_opposite"))
def test_weighted_balance_solves_its_system_on_hard_cases(seed, family):
  # Task scales 1 to 1e4, nearly collinear and nearly opposite gradients: x_i (G x)_i^2 = p_i
  # to 1e-8 relative, in float64 (SciPy's least_squares stalls on several of these).
  from ntkmtl_jax.methods.weighted_allocation import weighted_balance

  rng = np.random.default_rng([seed, 5])
  for k in (3, 5):
    case = cases.make_case(family, k, seed, dim=30)
    priorities = numpy_priorities(rng.uniform(0.0, 100.0, k))
    with enable_x64():
      result = weighted_balance(jnp.asarray(case.gram), jnp.asarray(priorities))
      x = np.asarray(result.x)
    assert bool(result.converged), case.name
    np.testing.assert_allclose(x * (case.gram @ x) ** 2, priorities, rtol=1e-7, err_msg=case.name)


def test_pivrg_refuses_bad_hyperparameters():
  with pytest.raises(ValueError, match="bound"):
    methods.get("pivrg", 3, bound=1.0)
  with pytest.raises(ValueError, match="scores"):
    methods.get("pivrg", 3, scores="accuracy")


def test_pivrg_a_zero_first_loss_stays_finite():
  rng = np.random.default_rng(0)
  jac = random_jacobian(rng, k=3, p=20)
  agg = methods.get("pivrg", 3)
  _, state = run_gram_weighting(agg, gram32(jac), losses=jnp.asarray([0.0, 1.0, 2.0]))
  weights, state = run_gram_weighting(
    agg, gram32(jac), losses=jnp.asarray([0.5, 1.0, 2.0]), state=state
  )
  assert np.all(np.isfinite(weights)) and np.all(weights > 0)
  priorities = np.asarray(state.priorities)
  np.testing.assert_allclose(priorities.max() / priorities.min(), 2.0, rtol=1e-4)
