"""The min-norm methods (MGDA, MGDA-UB, CAGrad, IMGrad, SDMGrad, MoCo; methods/min_norm.py)
and the solvers they call (the simplex projection, the min-norm point): each method's
defining property on fresh random Jacobians, float32 against float64 NumPy/SciPy
references. The hard cases (task scales 1 to 1e4, ...) in float64 are in
test_methods_solvers.py; the properties every method shares (permutations, scaling, jit,
degenerate inputs) in test_testing_properties.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize

from ntkmtl_jax import methods
from ntkmtl_jax.methods import solvers

from conftest import assert_close, enable_x64, gram32, random_jacobian, random_wide_jacobian
from conftest import run_gram_weighting as run_weighting


def simplex_argmin(fun, k, rng, starts=3):
  """Best SLSQP solution over a few starts (float64)."""
  best = None
  for x0 in [np.full(k, 1.0 / k)] + [rng.dirichlet(np.ones(k)) for _ in range(starts)]:
    res = minimize(
      fun,
      x0,
      method="SLSQP",
      bounds=[(0.0, 1.0)] * k,
      constraints={"type": "eq", "fun": lambda w: np.sum(w) - 1.0},
      options=dict(ftol=1e-15, maxiter=2000),
    )
    if best is None or res.fun < best.fun:
      best = res
  return best.x


def scipy_min_norm(gram, rng):
  return simplex_argmin(lambda w: w @ gram @ w, gram.shape[0], rng)


# ------------------------------------------------------------------------------ solvers


def test_project_to_simplex_matches_bisection_reference(seed):
  rng = np.random.default_rng(seed)
  k = int(rng.integers(1, 12))
  vs = rng.normal(size=(5, k)) * rng.uniform(0.1, 10.0, size=(5, 1))
  got = np.asarray(
    jax.jit(jax.vmap(solvers.project_to_simplex))(jnp.asarray(vs, jnp.float32)), np.float64
  )
  for v, g in zip(vs, got):
    # Reference: theta solves sum(max(v - theta, 0)) = 1, found by bisection in float64.
    lo, hi = v.min() - 1.0, v.max()
    for _ in range(200):
      mid = 0.5 * (lo + hi)
      lo, hi = (mid, hi) if np.maximum(v - mid, 0).sum() > 1.0 else (lo, mid)
    expected = np.maximum(v - 0.5 * (lo + hi), 0.0)
    np.testing.assert_allclose(
      g, expected, atol=2e-6 * max(1.0, np.abs(v).max()), err_msg=f"seed={seed}"
    )


@pytest.mark.parametrize("method", ["active_set", "frank_wolfe"])
def test_min_norm_point_matches_scipy_including_rank_deficient(seed, method):
  rng = np.random.default_rng(seed)
  solve = jax.jit(lambda g: solvers.min_norm_point(g, method=method))
  for p in (None, 3):  # P < k: the hull may contain 0
    jac = random_jacobian(rng, k=int(rng.integers(4, 7)) if p else None, p=p)
    result = solve(gram32(jac))
    w = np.asarray(result.x, np.float64)
    assert abs(w.sum() - 1) < 1e-5 and w.min() >= 0, f"seed={seed}"
    exact = scipy_min_norm(jac @ jac.T, rng) @ jac
    error = np.linalg.norm(w @ jac - exact)
    max_norm = np.sqrt(np.max(np.sum(jac**2, axis=1)))
    # The certificate bounds the distance to the minimum-norm point relative to ||d||
    # (float32 rounding on top) ...
    norm = max(np.linalg.norm(w @ jac), np.sqrt(np.finfo(np.float32).eps) * max_norm)
    assert error <= float(result.residual) * norm + 1e-4 * max_norm, f"seed={seed}: {error}"
    if method == "active_set":
      # ... and the active-set method is exact up to float32 rounding.
      assert bool(result.converged) and error <= 1e-4 * max_norm, f"seed={seed}: {error}"


# --------------------------------------------------------------------------------- MGDA


def test_mgda_direction_is_min_norm_point_of_hull(seed):
  rng = np.random.default_rng(seed)
  jac = random_jacobian(rng)
  k = jac.shape[0]
  agg = methods.get("mgda", k)
  update, state = jax.jit(agg.update)({"w": jnp.asarray(jac, jnp.float32)}, agg.init(None))
  expected = k * (scipy_min_norm(jac @ jac.T, rng) @ jac)
  scale = k * np.linalg.norm(jac, axis=1).max()
  np.testing.assert_allclose(update["w"], expected, atol=2e-3 * scale, err_msg=f"seed={seed}")
  np.testing.assert_allclose(state.weights.sum(), k, rtol=1e-5)
  off = (jac @ jac.T)[np.triu_indices(k, 1)]
  assert int(state.conflicts) == int(np.sum(off < 0)), f"seed={seed}"


def test_mgda_l2_normalization_chooses_weights_for_unit_gradients(seed):
  rng = np.random.default_rng(seed)
  jac = random_jacobian(rng)
  k = jac.shape[0]
  weights, _ = run_weighting(
    methods.get("mgda", k, normalization="l2", scale_by_num_tasks=False), gram32(jac)
  )
  unit = jac / np.linalg.norm(jac, axis=1, keepdims=True)
  expected = scipy_min_norm(unit @ unit.T, rng) @ unit
  np.testing.assert_allclose(weights @ unit, expected, atol=2e-3, err_msg=f"seed={seed}")


def test_mgda_ub_takes_representation_gram(seed):
  rng = np.random.default_rng(seed)
  jac = random_jacobian(rng)
  rep = random_jacobian(rng, k=jac.shape[0])
  k = jac.shape[0]
  agg = methods.get("mgda_ub", k)
  assert agg.needs.kind == "representation_gram"
  grads = {"w": jnp.asarray(jac, jnp.float32)}
  with pytest.raises(ValueError, match="representation"):
    agg.update(grads, agg.init(None))
  update, state = agg.update(grads, agg.init(None), gram=gram32(rep))
  expected_w, _ = run_weighting(methods.get("mgda", k), gram32(rep))
  np.testing.assert_allclose(state.weights, expected_w, rtol=1e-5, atol=1e-6)
  assert_close(update["w"], expected_w @ jac, rtol=1e-4, err_msg=f"seed={seed}")


# ------------------------------------------------------------------------------- CAGrad


def test_cagrad_solves_its_subproblem_and_meets_its_constraint(seed):
  rng = np.random.default_rng(seed)
  jac = random_jacobian(rng)
  k, c = jac.shape[0], 0.4
  gram = jac @ jac.T
  weights, state = run_weighting(methods.get("cagrad", k, c=c), gram32(jac))
  assert int(state.solver_failures) == 0, f"seed={seed}"
  d = weights @ jac / (k / (1.0 + c * c))  # undo the reference code's rescale and x k
  g0 = jac.mean(0)
  radius = c * np.linalg.norm(g0)
  # Constraint: d lies on the sphere ||d - g0|| = c ||g0||.
  np.testing.assert_allclose(np.linalg.norm(d - g0), radius, rtol=1e-4, err_msg=f"seed={seed}")
  # Optimality: the worst task improvement matches the SciPy solution of the sub-problem.
  a = gram / np.mean(np.diag(gram))
  b = np.full(k, 1.0 / k)
  objective = lambda w: w @ a @ b + c * np.sqrt(b @ a @ b) * np.sqrt(max(w @ a @ w, 0.0))
  w_ref = simplex_argmin(objective, k, rng)
  gw = w_ref @ jac
  d_ref = g0 + radius / np.linalg.norm(gw) * gw
  worst, worst_ref = np.min(jac @ d), np.min(jac @ d_ref)
  scale = np.linalg.norm(jac, axis=1).max() * np.linalg.norm(g0)
  assert worst >= worst_ref - 1e-4 * scale, f"seed={seed}: {worst} < {worst_ref}"
  np.testing.assert_allclose(
    d, d_ref, atol=2e-3 * np.linalg.norm(g0) * (1 + c), err_msg=f"seed={seed}"
  )


# ------------------------------------------------------------------------------- IMGrad
# (Both variants' sub-problems against their references: tests/test_methods_solvers.py in float64,
# tests/test_default_precision.py in float32.)


def test_imgrad_cosine_is_between_the_mean_and_the_min_norm_direction(seed):
  rng = np.random.default_rng(seed)
  jac = random_jacobian(rng)
  _, state = run_weighting(methods.get("imgrad", jac.shape[0]), gram32(jac))
  gm = scipy_min_norm(jac @ jac.T, rng) @ jac
  g0 = jac.mean(0)
  mu = float(np.clip(gm @ g0 / (np.linalg.norm(gm) * np.linalg.norm(g0)), 0, 1))
  np.testing.assert_allclose(state.cosine, mu, atol=1e-4, err_msg=f"seed={seed}")
  assert int(state.solver_failures) == 0


# -------------------------------------------------------------------------------- SDMGrad


def numpy_project_simplex(v):
  u = np.sort(v)[::-1]
  css = np.cumsum(u) - 1.0
  rho = np.nonzero(u - css / np.arange(1, len(v) + 1) > 0)[0][-1]
  return np.maximum(v - css[rho] / (rho + 1), 0.0)


def test_sdmgrad_matches_the_authors_iteration(seed):
  rng = np.random.default_rng(seed)
  jac = random_wide_jacobian(rng)
  k = jac.shape[0]
  lamda = float(rng.uniform(0.1, 1.0))
  perm = rng.permutation(k)
  agg = methods.get("sdmgrad", k, lamda=lamda)
  # With the authors' step size 10 the projected iteration does not converge and amplifies
  # rounding, so the comparison runs in float64.
  with enable_x64(True):
    state = agg.init(None)
    w = np.full(k, 1.0 / k, np.float32).astype(np.float64)  # as the float32 initial state
    for step in range(2):  # the second step is warm-started from the first
      weights, state = run_weighting(agg, jnp.asarray(jac @ jac.T), state=state)
      gram = jac @ jac.T
      gram = gram / np.mean(np.sqrt(np.diag(gram) + 1e-4)) ** 2
      velocity = np.zeros(k)
      for _ in range(20):
        velocity = 0.5 * velocity + 2 * gram @ w + 2 * lamda * gram.mean(1)
        w = numpy_project_simplex(w - 10.0 * velocity)
      w = w.astype(np.float32).astype(np.float64)  # the state keeps float32 weights
      expected = (w @ jac + lamda * jac.mean(0)) / (1 + lamda)
      assert_close(weights @ jac, expected, rtol=1e-6, err_msg=f"seed={seed}, step={step}")
    permuted, _ = run_weighting(agg, jnp.asarray(jac[perm] @ jac[perm].T))
    first, _ = run_weighting(agg, jnp.asarray(jac @ jac.T))
    np.testing.assert_allclose(permuted, first[perm], rtol=1e-6, atol=1e-9, err_msg=f"seed={seed}")


def test_sdmgrad_with_small_steps_solves_its_subproblem(seed):
  rng = np.random.default_rng(seed)
  jac = random_wide_jacobian(rng)
  k = jac.shape[0]
  lamda = float(rng.uniform(0.1, 1.0))
  gram = jac @ jac.T
  scale = np.mean(np.sqrt(np.diag(gram) + 1e-4)) ** 2
  step = 0.25 * scale / np.linalg.eigvalsh(gram).max()  # 1 / (2 L): a convergent iteration
  agg = methods.get("sdmgrad", k, lamda=lamda, num_iters=3000, learning_rate=step, momentum=0.0)
  weights, _ = run_weighting(agg, gram32(jac))
  # min over the simplex of ||g_w + lamda g0||^2, by SLSQP in float64.
  g0 = jac.mean(0)
  best = min(
    (
      minimize(
        lambda w: np.sum((w @ jac + lamda * g0) ** 2),
        x0,
        method="SLSQP",
        bounds=[(0, 1)] * k,
        constraints={"type": "eq", "fun": lambda w: np.sum(w) - 1},
        options=dict(ftol=1e-15, maxiter=2000),
      )
      for x0 in [np.full(k, 1.0 / k), rng.dirichlet(np.ones(k))]
    ),
    key=lambda r: r.fun,
  )
  expected = (best.x @ jac + lamda * g0) / (1 + lamda)
  assert_close(weights @ jac, expected, rtol=5e-3, err_msg=f"seed={seed}")


# ----------------------------------------------------------------------------------- MoCo


@pytest.mark.parametrize("simplex_map", ("softmax", "projection"))
def test_moco_tracking_matches_numpy_over_steps(seed, simplex_map):
  rng = np.random.default_rng(seed)
  k, p = int(rng.integers(2, 7)), 12
  agg = methods.get("moco", k, simplex_map=simplex_map)
  params = {"w": jnp.zeros((3, 4))}
  state = agg.init(params)
  update_fn = jax.jit(agg.update)
  y, lam = np.zeros((k, p)), np.full(k, 1.0 / k)
  for t in range(1, 4):
    jac = random_wide_jacobian(rng, k=k, p=p)
    losses = rng.uniform(0.1, 3.0, size=k)
    update, state = update_fn(
      {"w": jnp.asarray(jac.reshape(k, 3, 4), jnp.float32)},
      state,
      params,
      losses=jnp.asarray(losses, jnp.float32),
    )
    h = jac / (np.linalg.norm(jac, axis=1, keepdims=True) + 1e-8) * losses[:, None]
    y = y - 0.5 / t**0.5 * (y - h)
    moved = lam - 0.1 / t**0.5 * (y @ y.T) @ lam
    lam = (
      np.exp(moved) / np.exp(moved).sum()
      if simplex_map == "softmax"
      else numpy_project_simplex(moved)
    )
    assert_close(state.tracking, y, rtol=1e-4, err_msg=f"seed={seed}, t={t}")
    np.testing.assert_allclose(
      np.asarray(state.weights), lam, rtol=1e-4, atol=1e-6, err_msg=f"seed={seed}, t={t}"
    )
    assert_close(
      np.asarray(update["w"]).ravel(), y.T @ lam, rtol=1e-4, err_msg=f"seed={seed}, t={t}"
    )


def test_moco_needs_params_and_losses():
  agg = methods.get("moco", 2)
  with pytest.raises(ValueError, match="init"):
    agg.init(None)
  params = {"w": jnp.zeros(3)}
  with pytest.raises(ValueError, match="losses"):
    agg.update({"w": jnp.ones((2, 3))}, agg.init(params), params)
