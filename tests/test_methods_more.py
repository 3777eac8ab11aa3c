"""UPGrad, DualProj, Aligned-MTL, ConFIG, GradVac, SDMGrad and MoCo: each method's defining
property on fresh random Jacobians, float32 against float64 NumPy/SciPy references."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
import optax
from scipy.optimize import minimize

from ntkmtl_jax import methods
from ntkmtl_jax.method import TaskStats
from ntkmtl_jax.methods import alignment, conflict, solvers
from ntkmtl_jax.step import make_train_step
from conftest import TanhMLP, assert_close, enable_x64


def random_jacobian(rng, k=None, p=None):
  """Task gradients (k, P) of different sizes, k in 2..6 and P in k+2..40 unless given."""
  k = int(rng.integers(2, 7)) if k is None else k
  p = int(rng.integers(k + 2, 41)) if p is None else p
  return rng.normal(size=(k, p)) * rng.uniform(0.2, 5.0, size=(k, 1))


def gram32(jac):
  return jnp.asarray(jac @ jac.T, jnp.float32)


def run_weighting(agg, gram, key=None, state=None):
  state = agg.init(None) if state is None else state
  weights, state = jax.jit(agg.weights)(TaskStats(gram=gram, key=key), state)
  return np.asarray(weights, np.float64), state


def dual_cone_projection(jac, target):
  """argmin ||v - target||^2 subject to jac v >= 0, by SLSQP in float64 (the primal)."""
  res = minimize(lambda v: np.sum((v - target) ** 2), target, jac=lambda v: 2 * (v - target),
                 constraints={"type": "ineq", "fun": lambda v: jac @ v, "jac": lambda v: jac},
                 method="SLSQP", options=dict(ftol=1e-15, maxiter=2000))
  return res.x


# ------------------------------------------------------------------------ UPGrad, DualProj

def test_nonnegative_qp_matches_scipy(seed):
  rng = np.random.default_rng(seed)
  k = int(rng.integers(2, 9))
  for _ in range(3):
    a = rng.normal(size=(k, k + 2))
    gram = a @ a.T + 0.05 * np.eye(k)
    linear = rng.normal(size=k) * 2.0
    res = jax.jit(solvers.nonnegative_qp)(jnp.asarray(gram, jnp.float32),
                                     jnp.asarray(linear, jnp.float32))
    ref = minimize(lambda z: 0.5 * z @ gram @ z + linear @ z, np.zeros(k),
                   jac=lambda z: gram @ z + linear, bounds=[(0, None)] * k,
                   method="L-BFGS-B", options=dict(ftol=1e-16, gtol=1e-12, maxiter=5000)).x
    assert bool(res.converged), f"seed={seed}"
    assert_close(res.x, ref, rtol=2e-4, err_msg=f"seed={seed}")


def test_upgrad_is_the_mean_of_the_dual_cone_projections(seed):
  rng = np.random.default_rng(seed)
  jac = random_jacobian(rng)
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
  jac = random_jacobian(rng)
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
    jac = random_jacobian(rng, k=k, p=p)
    weights, state = run_weighting(methods.get(name, jac.shape[0]), gram32(jac))
    update = weights @ jac
    # Non-negative inner product with every task gradient, up to what the ridge allows:
    # the KKT conditions of min_{w >= u} w^T (G / tr G + eps k diag(G) / tr G) w give
    # <g_j, d> = (G w)_j >= -eps k G_jj w_j (large w_j where G is singular); and rounding.
    norms = np.linalg.norm(jac, axis=1)
    slack = (1e-4 * k * norms ** 2 * np.maximum(weights, 0.0) * 1.01
             + 1e-4 * norms * (np.abs(weights) @ norms))
    assert np.all(jac @ update >= -slack), f"seed={seed}, p={p}: {jac @ update}"
    assert int(state.solver_failures) == 0, f"seed={seed}"


# ---------------------------------------------------------------------------- Aligned-MTL

def numpy_aligned_balance(gram, scale_mode):
  lam, vec = np.linalg.eigh(gram)
  keep = lam > lam.max() * len(gram) * np.finfo(np.float32).eps
  lam, vec = lam[keep], vec[:, keep]
  scale = {"min": lam.min(), "median": np.sort(lam)[(len(lam) - 1) // 2],
           "rmse": lam.mean()}[scale_mode]
  return np.sqrt(scale) * vec @ np.diag(lam ** -0.5) @ vec.T, scale


@pytest.mark.parametrize("scale_mode", ("min", "median", "rmse"))
def test_aligned_mtl_aligns_to_equal_singular_values(seed, scale_mode):
  rng = np.random.default_rng(seed)
  jac = random_jacobian(rng)
  k = jac.shape[0]
  agg = methods.get("aligned_mtl", k, scale_mode=scale_mode)
  weights, state = run_weighting(agg, gram32(jac))
  balance, scale = numpy_aligned_balance(jac @ jac.T, scale_mode)
  assert_close(weights, balance.sum(axis=1), rtol=1e-3, err_msg=f"seed={seed}")
  # The aligned gradients (columns of J^T B) have k equal singular values sqrt(scale).
  aligned_balance, _, rank = alignment.aligned_mtl_transform(gram32(jac), scale_mode)
  singular = np.linalg.svd(jac.T @ np.asarray(aligned_balance, np.float64), compute_uv=False)
  np.testing.assert_allclose(singular / singular.max(), np.ones(k), rtol=1e-3,
                             err_msg=f"seed={seed}")
  assert int(rank) == k
  lam = np.linalg.eigvalsh(jac @ jac.T)
  np.testing.assert_allclose(float(state.condition_number), np.sqrt(lam.max() / lam.min()),
                             rtol=1e-2, err_msg=f"seed={seed}")


def test_aligned_mtl_rank_deficient_keeps_the_range(seed):
  rng = np.random.default_rng(seed)
  jac = random_jacobian(rng, k=int(rng.integers(4, 7)), p=3)
  weights, state = run_weighting(methods.get("aligned_mtl", jac.shape[0]), gram32(jac))
  balance, _ = numpy_aligned_balance(jac @ jac.T, "min")
  assert int(state.rank) == 3, f"seed={seed}"
  assert_close(weights @ jac, balance.sum(axis=1) @ jac, rtol=1e-2, err_msg=f"seed={seed}")


# --------------------------------------------------------------------------------- ConFIG

def test_config_has_equal_cosines_and_the_projection_length(seed):
  rng = np.random.default_rng(seed)
  jac = random_jacobian(rng)
  k = jac.shape[0]
  weights, state = run_weighting(methods.get("config", k), gram32(jac))
  update = weights @ jac
  cosines = jac @ update / (np.linalg.norm(jac, axis=1) * np.linalg.norm(update))
  np.testing.assert_allclose(cosines, np.full(k, cosines.mean()), rtol=1e-3,
                             err_msg=f"seed={seed}")
  assert cosines.min() > 0, f"seed={seed}"
  np.testing.assert_allclose(float(state.cosine), cosines.mean(), rtol=1e-3)
  # The paper's direction: the least-squares solution of U^T d = 1 (U the unit gradients),
  # scaled by the sum of the projections of the gradients on its unit vector.
  unit_grads = jac / np.linalg.norm(jac, axis=1, keepdims=True)
  direction = np.linalg.lstsq(unit_grads, np.ones(k), rcond=None)[0]
  direction /= np.linalg.norm(direction)
  assert_close(update, np.sum(jac @ direction) * direction, rtol=1e-3, err_msg=f"seed={seed}")


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
        w = (np.linalg.norm(pcs[i]) * (t * np.sqrt(1 - phi ** 2) - phi * np.sqrt(1 - t ** 2))
             / (np.linalg.norm(jac[j]) * np.sqrt(1 - t ** 2)))
        pcs[i] = pcs[i] + w * jac[j]
      targets[i, j] = (1 - beta) * targets[i, j] + beta * phi
  return pcs.sum(0), targets, pcs


def test_gradvac_matches_the_papers_algorithm(seed):
  rng = np.random.default_rng(seed)
  jac = random_jacobian(rng)
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
  np.testing.assert_allclose(np.asarray(new_state.targets), new_targets, atol=2e-4,
                             err_msg=f"seed={seed}")


def test_gradvac_two_tasks_reach_their_targets(seed):
  rng = np.random.default_rng(seed)
  jac = random_jacobian(rng, k=2)
  targets = rng.uniform(-0.3, 0.9, size=(2, 2))
  agg = methods.get("gradvac", 2)
  state = agg.init(None)._replace(targets=jnp.asarray(targets, jnp.float32))
  coeffs, _, adjusted = conflict.gradvac_coefficients(gram32(jac), jnp.array([[0, 1], [1, 0]]),
                                                      state.targets, 0.01)
  corrected = np.asarray(coeffs, np.float64) @ jac
  phi = jac[0] @ jac[1] / np.prod(np.linalg.norm(jac, axis=1))
  for i, j in ((0, 1), (1, 0)):
    cosine = corrected[i] @ jac[j] / (np.linalg.norm(corrected[i]) * np.linalg.norm(jac[j]))
    # Raised exactly to the target where below it, untouched otherwise.
    np.testing.assert_allclose(cosine, max(phi, targets[i, j]), atol=1e-4,
                               err_msg=f"seed={seed}")
  assert int(adjusted) == int(np.sum(phi < targets[[0, 1], [1, 0]]))


# -------------------------------------------------------------------------------- SDMGrad

def numpy_project_simplex(v):
  u = np.sort(v)[::-1]
  css = np.cumsum(u) - 1.0
  rho = np.nonzero(u - css / np.arange(1, len(v) + 1) > 0)[0][-1]
  return np.maximum(v - css[rho] / (rho + 1), 0.0)


def test_sdmgrad_matches_the_authors_iteration(seed):
  rng = np.random.default_rng(seed)
  jac = random_jacobian(rng)
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
    np.testing.assert_allclose(permuted, first[perm], rtol=1e-6, atol=1e-9,
                               err_msg=f"seed={seed}")


def test_sdmgrad_with_small_steps_solves_its_subproblem(seed):
  rng = np.random.default_rng(seed)
  jac = random_jacobian(rng)
  k = jac.shape[0]
  lamda = float(rng.uniform(0.1, 1.0))
  gram = jac @ jac.T
  scale = np.mean(np.sqrt(np.diag(gram) + 1e-4)) ** 2
  step = 0.25 * scale / np.linalg.eigvalsh(gram).max()  # 1 / (2 L): a convergent iteration
  agg = methods.get("sdmgrad", k, lamda=lamda, num_iters=3000, learning_rate=step,
                    momentum=0.0)
  weights, _ = run_weighting(agg, gram32(jac))
  # min over the simplex of ||g_w + lamda g0||^2, by SLSQP in float64.
  g0 = jac.mean(0)
  best = min((minimize(lambda w: np.sum((w @ jac + lamda * g0) ** 2), x0, method="SLSQP",
                       bounds=[(0, 1)] * k,
                       constraints={"type": "eq", "fun": lambda w: np.sum(w) - 1},
                       options=dict(ftol=1e-15, maxiter=2000))
              for x0 in [np.full(k, 1.0 / k), rng.dirichlet(np.ones(k))]),
             key=lambda r: r.fun)
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
    jac = random_jacobian(rng, k=k, p=p)
    losses = rng.uniform(0.1, 3.0, size=k)
    update, state = update_fn({"w": jnp.asarray(jac.reshape(k, 3, 4), jnp.float32)}, state,
                              params, losses=jnp.asarray(losses, jnp.float32))
    h = jac / (np.linalg.norm(jac, axis=1, keepdims=True) + 1e-8) * losses[:, None]
    y = y - 0.5 / t ** 0.5 * (y - h)
    moved = lam - 0.1 / t ** 0.5 * (y @ y.T) @ lam
    lam = (np.exp(moved) / np.exp(moved).sum() if simplex_map == "softmax"
           else numpy_project_simplex(moved))
    assert_close(state.tracking, y, rtol=1e-4, err_msg=f"seed={seed}, t={t}")
    np.testing.assert_allclose(np.asarray(state.weights), lam, rtol=1e-4, atol=1e-6,
                               err_msg=f"seed={seed}, t={t}")
    assert_close(np.asarray(update["w"]).ravel(), y.T @ lam, rtol=1e-4,
                 err_msg=f"seed={seed}, t={t}")


def test_moco_needs_params_and_losses():
  agg = methods.get("moco", 2)
  with pytest.raises(ValueError, match="init"):
    agg.init(None)
  params = {"w": jnp.zeros(3)}
  with pytest.raises(ValueError, match="losses"):
    agg.update({"w": jnp.ones((2, 3))}, agg.init(params), params)


# ------------------------------------------------------------------------ registration

def test_registered_with_published_defaults():
  assert {"upgrad", "dualproj", "aligned_mtl", "config", "gradvac", "sdmgrad",
          "moco"} <= set(methods.names())
  assert methods.defaults("gradvac")["beta"] == 0.01
  assert methods.defaults("aligned_mtl")["scale_mode"] == "min"
  assert methods.defaults("upgrad")["reg_eps"] == 1e-4
  assert methods.defaults("moco")["gamma"] == 0.1
  assert methods.defaults("sdmgrad")["lamda"] == 0.3
  assert methods.defaults("sdmgrad")["solver"] == "authors"
  assert methods.get("moco", 2).needs.kind == "gradients"


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
  jax.tree.map(np.testing.assert_array_equal, new_state.method_state,
               state.method_state)


def test_gradvac_leaves_zero_gradients_alone(seed):
  rng = np.random.default_rng(seed)
  jac = random_jacobian(rng, k=3)
  jac[1] = 0.0
  agg = methods.get("gradvac", 3)
  state = agg.init(None)._replace(targets=jnp.full((3, 3), 0.5, jnp.float32))
  weights, _ = run_weighting(agg, gram32(jac), key=jax.random.key(seed), state=state)
  assert np.all(np.isfinite(weights)) and np.abs(weights).max() < 1e3, f"seed={seed}"


def assert_products_at_full_precision(lowered):
  dots = [line for line in lowered.as_text().splitlines() if "dot_general" in line]
  assert dots and all("HIGHEST" in line for line in dots), [d for d in dots
                                                            if "HIGHEST" not in d][:2]


# Every registered weighting of the Gram matrix but IMTL-G (a linear solve) and PCGrad
# (elementwise sums), which form no matrix product.
GRAM_PRODUCTS = tuple(n for n in methods.names() if n not in ("imtl_g", "pcgrad") and
                      methods.get(n, 3).needs.kind in ("gram", "representation_gram"))


@pytest.mark.parametrize("name", GRAM_PRODUCTS)
def test_solver_products_run_at_full_precision(name):
  # TPUs (bf16 passes) and TF32 GPUs would otherwise round the k x k products far above
  # the solvers' tolerances.
  agg = methods.get(name, 3)
  stats = TaskStats(gram=jnp.eye(3), key=jax.random.key(0))
  assert_products_at_full_precision(jax.jit(agg.weights).lower(stats, agg.init(None)))


@pytest.mark.parametrize("solve", [
    solvers.min_norm_point,
    lambda g: solvers.simplex_minimize(lambda w: w @ (g @ w), jnp.full(3, 1.0 / 3)),
    solvers.power_balance,
    lambda g: solvers.nonnegative_qp(g, jnp.ones(3)),
])
def test_solvers_run_at_full_precision_wherever_called(solve):
  assert_products_at_full_precision(jax.jit(solve).lower(jnp.eye(3)))
