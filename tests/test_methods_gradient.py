"""The gradient methods (MGDA, PCGrad, GradDrop, CAGrad, IMTL-G, Nash-MTL, FairGrad, IMGrad)
and their solvers: each method's defining property on fresh random Jacobians, float32
against float64 NumPy/SciPy references. The hard cases (task scales 1 to 1e4, ...) in
float64 are in test_solvers.py; the properties every method shares (permutations, scaling,
jit, degenerate inputs) in test_method_properties.py."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
import optax
from scipy.optimize import minimize

from ntkmtl_jax import methods
from ntkmtl_jax.method import TaskStats
from ntkmtl_jax.methods import conflict
from ntkmtl_jax.methods import solvers
from ntkmtl_jax.step import make_train_step
from conftest import TanhMLP, assert_close


def random_jacobian(rng, k=None, p=None):
  """Task gradients (k, P) of different sizes, k in 2..6 and P in 5..50 unless given."""
  k = int(rng.integers(2, 7)) if k is None else k
  p = int(rng.integers(5, 51)) if p is None else p
  return rng.normal(size=(k, p)) * rng.uniform(0.2, 5.0, size=(k, 1))


def gram32(jac):
  return jnp.asarray(jac @ jac.T, jnp.float32)


def run_weighting(agg, gram, key=None, losses=None, state=None):
  state = agg.init(None) if state is None else state
  stats = TaskStats(gram=gram, losses=losses, key=key)
  weights, state = jax.jit(agg.weights)(stats, state)
  return np.asarray(weights, np.float64), state


def simplex_argmin(fun, k, rng, starts=3):
  """Best SLSQP solution over a few starts (float64)."""
  best = None
  for x0 in [np.full(k, 1.0 / k)] + [rng.dirichlet(np.ones(k)) for _ in range(starts)]:
    res = minimize(fun, x0, method="SLSQP", bounds=[(0.0, 1.0)] * k,
                   constraints={"type": "eq", "fun": lambda w: np.sum(w) - 1.0},
                   options=dict(ftol=1e-15, maxiter=2000))
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
  got = np.asarray(jax.jit(jax.vmap(solvers.project_to_simplex))(jnp.asarray(vs, jnp.float32)),
                   np.float64)
  for v, g in zip(vs, got):
    # Reference: theta solves sum(max(v - theta, 0)) = 1, found by bisection in float64.
    lo, hi = v.min() - 1.0, v.max()
    for _ in range(200):
      mid = 0.5 * (lo + hi)
      lo, hi = (mid, hi) if np.maximum(v - mid, 0).sum() > 1.0 else (lo, mid)
    expected = np.maximum(v - 0.5 * (lo + hi), 0.0)
    np.testing.assert_allclose(g, expected, atol=2e-6 * max(1.0, np.abs(v).max()),
                               err_msg=f"seed={seed}")


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
    max_norm = np.sqrt(np.max(np.sum(jac ** 2, axis=1)))
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
  weights, _ = run_weighting(methods.get("mgda", k, normalization="l2", scale_by_num_tasks=False),
                             gram32(jac))
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
  update, state = jax.jit(agg.update)({"w": jnp.asarray(jac, jnp.float32)}, agg.init(None),
                                      key=key)
  orders_and_coefficients = jax.jit(
      lambda g, kk: (conflict.pcgrad_orders(kk, k),
                     conflict.pcgrad_coefficients(g, conflict.pcgrad_orders(kk, k))))
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
  two[1] -= ((two[1] @ two[0]) + 0.5 * np.linalg.norm(two[1]) * np.linalg.norm(two[0])) / (
      two[0] @ two[0]) * two[0]
  assert two[1] @ two[0] < 0
  c2 = np.asarray(jax.jit(conflict.pcgrad_coefficients)(gram32(two),
                                                       jnp.asarray([[1, 0], [0, 1]])))
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
  update, state = jax.jit(agg.update)({"w": jnp.asarray(jac, jnp.float32)}, agg.init(None),
                                      key=jax.random.key(seed))
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
  direction, _ = jax.jit(conflict.graddrop_direction)(jnp.asarray(jac, jnp.float32),
                                                 jax.random.key(seed), jnp.ones(jac.shape[0]))
  assert_close(direction, jac.sum(0), rtol=1e-5, err_msg=f"seed={seed}")


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
  np.testing.assert_allclose(d, d_ref, atol=2e-3 * np.linalg.norm(g0) * (1 + c),
                             err_msg=f"seed={seed}")


# ------------------------------------------------------------------------------- IMTL-G

def test_imtl_g_projections_on_unit_gradients_are_equal(seed):
  rng = np.random.default_rng(seed)
  jac = random_jacobian(rng)
  k = jac.shape[0]
  weights, state = run_weighting(methods.get("imtl_g", k), gram32(jac))
  np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-5)
  d = weights @ jac
  projections = (jac / np.linalg.norm(jac, axis=1, keepdims=True)) @ d
  np.testing.assert_allclose(projections, projections.mean(), rtol=1e-3,
                             atol=1e-4 * np.abs(projections).max(), err_msg=f"seed={seed}")
  assert int(state.solver_failures) == 0


# ----------------------------------------------------------------------- Nash-MTL, FairGrad

def test_nash_mtl_weights_solve_the_bargaining_system(seed):
  rng = np.random.default_rng(seed)
  jac = random_jacobian(rng)
  k = jac.shape[0]
  weights, state = run_weighting(methods.get("nash_mtl", k), gram32(jac))
  assert int(state.solver_failures) == 0 and np.all(weights > 0), f"seed={seed}"
  np.testing.assert_allclose((jac @ jac.T) @ weights, 1.0 / weights, rtol=1e-3,
                             err_msg=f"seed={seed}")
  # Warm-started from those weights, the next step on new gradients solves its system too.
  jac2 = jac + 0.1 * random_jacobian(rng, k=k, p=jac.shape[1])
  weights2, state2 = run_weighting(methods.get("nash_mtl", k), gram32(jac2), state=state)
  np.testing.assert_allclose((jac2 @ jac2.T) @ weights2, 1.0 / weights2, rtol=1e-3,
                             err_msg=f"seed={seed}")
  assert int(state2.count) == 2


def test_nash_mtl_keeps_previous_weights_and_counts_failure_without_solution(seed):
  rng = np.random.default_rng(seed)
  g = rng.normal(size=(1, 7))
  jac = np.concatenate([g, -2.0 * g, rng.normal(size=(1, 7))])  # 0 is in the hull
  agg = methods.get("nash_mtl", 3)
  previous = agg.init(None)._replace(weights=jnp.asarray([0.5, 1.5, 2.0], jnp.float32),
                                     count=jnp.asarray(4, jnp.int32))
  weights, state = run_weighting(agg, gram32(jac), state=previous)
  np.testing.assert_allclose(weights, [0.5, 1.5, 2.0])
  assert int(state.solver_failures) == 1


def test_nash_mtl_update_weights_every(seed):
  rng = np.random.default_rng(seed)
  agg = methods.get("nash_mtl", 3, update_weights_every=2)
  state = agg.init(None)
  seen = []
  for _ in range(3):
    weights, state = run_weighting(agg, gram32(random_jacobian(rng, k=3, p=20)), state=state)
    seen.append(weights)
  np.testing.assert_array_equal(seen[1], seen[0])
  assert not np.allclose(seen[2], seen[1]), f"seed={seed}"


@pytest.mark.parametrize("alpha", [1.0, 2.0, 5.0])
def test_fairgrad_weights_solve_their_system(seed, alpha):
  rng = np.random.default_rng(seed)
  jac = random_jacobian(rng)
  k = jac.shape[0]
  weights, state = run_weighting(methods.get("fairgrad", k, alpha=alpha), gram32(jac))
  w = weights / k  # the reference code's x k
  assert int(state.solver_failures) == 0 and np.all(w > 0), f"seed={seed}"
  np.testing.assert_allclose((jac @ jac.T) @ w, w ** (-1.0 / alpha), rtol=1e-3,
                             err_msg=f"seed={seed}")


# ------------------------------------------------------------------------------- IMGrad
# (Both variants' sub-problems against their references: tests/test_solvers.py in float64,
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


# ------------------------------------------------------------------------ the train step

def test_non_finite_gradients_skip_the_step(seed):
  rng = np.random.default_rng(seed)
  model = TanhMLP(rng, num_tasks=3)
  agg = methods.get("nash_mtl", 3, shared=model.shared)
  step = make_train_step(model.loss_fn, agg, optax.sgd(1e-2))
  state = step.init(model.params)
  batch = dict(model.batch)
  batch["y"] = batch["y"].at[0, 1].set(jnp.nan)
  new_state, metrics = step(state, batch)
  assert not bool(metrics["finite"]) and int(new_state.skipped) == 1
  jax.tree.map(np.testing.assert_array_equal, new_state.method_state,
               state.method_state)


@pytest.mark.parametrize("name", ["nash_mtl", "fairgrad"])
def test_exactly_opposite_tasks_train_instead_of_skipping_every_step(seed, name):
  # Task 1's loss is minus task 0's (plus a head of its own): the shared gradients are
  # exactly opposite, G [1, 1] = 0 and the system has no solution. The previous weights are
  # kept and the failure counted; the step itself is applied (its residual, kept in the
  # state, is finite), so the heads still train.
  rng = np.random.default_rng(seed)
  params = {"shared": jnp.asarray(rng.normal(size=4), jnp.float32),
            "heads": jnp.asarray(rng.normal(size=2), jnp.float32)}
  x = jnp.asarray(rng.normal(size=4), jnp.float32)

  def loss_fn(p, batch):
    common = jnp.tanh(batch @ p["shared"])
    return jnp.stack([common + p["heads"][0] ** 2, -common + p["heads"][1] ** 2])

  method = methods.get(name, 2, shared={"shared": True, "heads": False})
  step = make_train_step(loss_fn, method, optax.sgd(1e-2))
  state = step.init(params)
  for _ in range(3):
    state, metrics = step(state, x)
    assert bool(metrics["finite"]), f"seed={seed}"
  assert int(state.skipped) == 0 and int(state.method_state.solver_failures) == 3
  assert not np.allclose(state.params["heads"], params["heads"])
