"""The dual-cone methods (UPGrad, DualProj; methods/dual_cone.py) and their non-negative QP
solver: each method's defining property on fresh random Jacobians, float32 against float64
NumPy/SciPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.optimize import minimize

from ntkmtl_jax import methods
from ntkmtl_jax.methods import solvers
from ntkmtl_jax.step import make_train_step

from conftest import TanhMLP, assert_close, gram32, random_wide_jacobian
from conftest import run_gram_weighting as run_weighting


def dual_cone_projection(jac, target):
  """argmin ||v - target||^2 subject to jac v >= 0, by SLSQP in float64 (the primal)."""
  res = minimize(
    lambda v: np.sum((v - target) ** 2),
    target,
    jac=lambda v: 2 * (v - target),
    constraints={"type": "ineq", "fun": lambda v: jac @ v, "jac": lambda v: jac},
    method="SLSQP",
    options=dict(ftol=1e-15, maxiter=2000),
  )
  return res.x


# ------------------------------------------------------------------------ UPGrad, DualProj


def test_nonnegative_qp_matches_scipy(seed):
  rng = np.random.default_rng(seed)
  k = int(rng.integers(2, 9))
  for _ in range(3):
    a = rng.normal(size=(k, k + 2))
    gram = a @ a.T + 0.05 * np.eye(k)
    linear = rng.normal(size=k) * 2.0
    res = jax.jit(solvers.nonnegative_qp)(
      jnp.asarray(gram, jnp.float32), jnp.asarray(linear, jnp.float32)
    )
    ref = minimize(
      lambda z: 0.5 * z @ gram @ z + linear @ z,
      np.zeros(k),
      jac=lambda z: gram @ z + linear,
      bounds=[(0, None)] * k,
      method="L-BFGS-B",
      options=dict(ftol=1e-16, gtol=1e-12, maxiter=5000),
    ).x
    assert bool(res.converged), f"seed={seed}"
    assert_close(res.x, ref, rtol=2e-4, err_msg=f"seed={seed}")


def test_upgrad_is_the_mean_of_the_dual_cone_projections(seed):
  rng = np.random.default_rng(seed)
  jac = random_wide_jacobian(rng)
  k = jac.shape[0]
  # reg_eps -> 0 gives the exact projections (G has full rank here: P >= k).
  weights, state = run_weighting(methods.get("upgrad", k, reg_eps=1e-9), gram32(jac))
  update = weights @ jac
  expected = np.mean([dual_cone_projection(jac, g) for g in jac], axis=0)
  assert_close(update, expected, rtol=1e-3, err_msg=f"seed={seed}")
  assert int(state.solver_failures) == 0
  assert int(state.conflicts) == int(np.sum(np.triu(jac @ jac.T < 0, 1)))


def test_dualproj_projects_the_mean_onto_the_dual_cone(seed):
  rng = np.random.default_rng(seed)
  jac = random_wide_jacobian(rng)
  k = jac.shape[0]
  weights, _ = run_weighting(methods.get("dualproj", k, reg_eps=1e-9), gram32(jac))
  expected = dual_cone_projection(jac, jac.mean(0))
  assert_close(weights @ jac, expected, rtol=1e-3, err_msg=f"seed={seed}")
  assert np.all(weights >= 1.0 / k - 1e-6), f"seed={seed}: the dual weights are w >= u"


@pytest.mark.parametrize("name", ("upgrad", "dualproj"))
def test_dual_cone_methods_conflict_with_no_task_even_rank_deficient(seed, name):
  rng = np.random.default_rng(seed)
  k = int(rng.integers(3, 7))
  for p in (None, 2):  # P = 2 < k: the gradients are dependent
    jac = random_wide_jacobian(rng, k=k, p=p)
    weights, state = run_weighting(methods.get(name, jac.shape[0]), gram32(jac))
    update = weights @ jac
    # Non-negative inner product with every task gradient, up to what the ridge allows:
    # the KKT conditions of min_{w >= u} w^T (G / tr G + eps k diag(G) / tr G) w give
    # <g_j, d> = (G w)_j >= -eps k G_jj w_j (large w_j where G is singular); and rounding.
    norms = np.linalg.norm(jac, axis=1)
    slack = 1e-4 * k * norms**2 * np.maximum(weights, 0.0) * 1.01 + 1e-4 * norms * (
      np.abs(weights) @ norms
    )
    assert np.all(jac @ update >= -slack), f"seed={seed}, p={p}: {jac @ update}"
    assert int(state.solver_failures) == 0, f"seed={seed}"


def test_non_finite_gradients_skip_the_step_and_the_solver_stops(seed):
  rng = np.random.default_rng(seed)
  model = TanhMLP(rng, num_tasks=3)
  agg = methods.get("upgrad", 3, shared=model.shared)
  step = make_train_step(model.loss_fn, agg, optax.sgd(1e-2), strategy="streaming")
  state = step.init(model.params)
  batch = dict(model.batch)
  batch["y"] = batch["y"].at[0, 1].set(jnp.nan)
  new_state, metrics = step(state, batch)  # the active-set loop ends at its bound on NaN
  assert not bool(metrics["finite"]) and int(new_state.skipped) == 1
  jax.tree.map(np.testing.assert_array_equal, new_state.method_state, state.method_state)
