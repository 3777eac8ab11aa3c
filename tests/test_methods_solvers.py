"""Exact where it is hard: every method with an inner problem against an independent float64
reference on the hard cases, and the solvers' certificates.

The cases (`ntkmtl_jax.testing.cases`): task scales from 1 to 1e4, nearly collinear and
nearly opposite gradients, a zero and a duplicated gradient, more tasks than directions;
k = 2, 3, 5, 10, 40. The references (`ntkmtl_jax.testing.references`) are NumPy/SciPy
solves by other algorithms (NNLS, face enumeration, Brent's method, MINPACK, closed forms
written from the papers). Everything here runs in float64 at full matmul precision; what
float32 gets is in tests/test_default_precision.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkmtl_jax import methods
from ntkmtl_jax.method import TaskStats
from ntkmtl_jax.methods import solvers
from ntkmtl_jax.testing import cases, references

from conftest import SEEDS, enable_x64

# The solvers certify a relative error of 1e-6; the references agree to about 1e-9.
TOLERANCE = 1e-6
# (`references.NOT_EXACT`: MGDA's Frank-Wolfe and projected-gradient options, which say so
# when they cannot certify, test_unconverged_solvers_say_so; SDMGrad's published iteration,
# compared step by step with a NumPy replica in test_methods_min_norm.py.) MGDA-UB runs MGDA's
# weighting on another Gram matrix: test_methods_min_norm.py checks that the two agree.
EXACT_ROWS = [
  row for row in references.REFERENCES if row not in references.NOT_EXACT + ("mgda_ub",)
]


@pytest.fixture(autouse=True)
def float64():
  with enable_x64(True):
    yield


def stats_of(case):
  return TaskStats(
    losses=jnp.asarray(case.losses), gram=jnp.asarray(case.gram), key=jax.random.key(0)
  )


def weighting(row, k):
  """(method, jitted weights) of a REFERENCES row."""
  name, hparams = references.method_of(row)
  method = methods.get(name, k, **hparams)
  return method, jax.jit(method.weights)


@pytest.mark.parametrize("row", EXACT_ROWS)
def test_first_step_matches_the_reference_on_every_hard_case(row):
  # Every seed in one test, so that each method compiles once per k.
  worst, uncertified, total = {}, [], 0
  for k in cases.NUM_TASKS:
    method, weights_fn = weighting(row, k)
    for case in cases.hard_cases(ks=(k,), seeds=SEEDS):
      total += 1
      try:
        expected = references.reference_direction(row, case)
      except references.ReferenceError:  # SciPy could not certify its own answer here
        uncertified.append(case.name)
        continue
      if expected is None:  # no unique answer (IMTL-G's singular system)
        continue
      weights, _ = weights_fn(stats_of(case), method.init(None))
      direction = np.asarray(weights) @ case.jacobian
      worst[case.name] = cases.relative_error(direction, expected, case.jacobian)
  assert worst, row
  assert len(uncertified) <= total // 10, f"{row}: no certified reference on {uncertified}"
  bad = {name: f"{e:.1e}" for name, e in worst.items() if not e <= TOLERANCE}
  assert not bad, f"{row}: relative error above {TOLERANCE:.0e} on {bad}"


@pytest.mark.parametrize("family", cases.FAMILIES)
def test_min_norm_point_agrees_with_face_enumeration(seed, family):
  solve = jax.jit(solvers.min_norm_point)
  for k in (2, 3, 5):
    case = cases.make_case(family, k, seed)
    result = solve(jnp.asarray(case.gram))
    by_faces = references.min_norm_weights_by_faces(case.gram) @ case.jacobian
    error = cases.relative_error(np.asarray(result.x) @ case.jacobian, by_faces, case.jacobian)
    assert error <= TOLERANCE and bool(result.converged), (case.name, error)
    # The two references agree with each other too.
    nnls = references.min_norm_weights(case.jacobian) @ case.jacobian
    assert cases.relative_error(nnls, by_faces, case.jacobian) <= 1e-9, case.name


def test_min_norm_point_of_two_vectors_is_the_closed_form(seed):
  # For k = 2 the minimiser on the segment is w_1 = clip(<g_2 - g_1, g_2> / |g_1 - g_2|^2).
  solve = jax.jit(solvers.min_norm_point)
  for family in cases.FAMILIES:
    case = cases.make_case(family, 2, seed)
    g1, g2 = case.jacobian
    gap = np.sum((g1 - g2) ** 2)
    w1 = np.clip((g2 - g1) @ g2 / gap, 0.0, 1.0) if gap > 0 else 1.0
    expected = w1 * g1 + (1 - w1) * g2
    got = np.asarray(solve(jnp.asarray(case.gram)).x) @ case.jacobian
    assert cases.relative_error(got, expected, case.jacobian) <= 1e-9, case.name


@pytest.mark.parametrize("method", ["active_set", "frank_wolfe", "projected_gradient"])
def test_the_certificate_never_lies(seed, method):
  """Whatever the solver and whether or not it converged, the distance to the min-norm
  point is at most the certified relative error times ||d|| (plus rounding), and a solve
  that says it converged is within its tolerance."""
  solve = jax.jit(lambda g: solvers.min_norm_point(g, method=method))
  for case in cases.hard_cases(ks=(3, 10), seeds=(seed,)):
    result = solve(jnp.asarray(case.gram))
    direction = np.asarray(result.x) @ case.jacobian
    exact = references.min_norm_weights(case.jacobian) @ case.jacobian
    norm = max(
      np.linalg.norm(direction),
      np.sqrt(np.finfo(float).eps) * np.max(np.linalg.norm(case.jacobian, axis=1)),
    )
    rounding = 1e-7 * np.max(np.linalg.norm(case.jacobian, axis=1))
    assert np.linalg.norm(direction - exact) <= float(result.residual) * norm + rounding, (
      case.name,
      float(result.residual),
    )
    if bool(result.converged) and method != "active_set":
      assert cases.relative_error(direction, exact, case.jacobian) <= 1e-5, case.name


def test_unconverged_solvers_say_so():
  # Frank-Wolfe within 500 iterations on task scales 1 to 1e4: the certificate cannot reach
  # 1e-6, and the result says it did not converge instead of returning a wrong answer as
  # converged (the MGDA weighting counts it in `solver_failures`).
  case = cases.make_case("imbalanced", 10, 0)
  result = jax.jit(lambda g: solvers.min_norm_point(g, method="frank_wolfe"))(
    jnp.asarray(case.gram)
  )
  assert not bool(result.converged) and int(result.iterations) == 500
  mgda = methods.get("mgda", 10, solver="frank_wolfe")
  _, state = jax.jit(mgda.weights)(stats_of(case), mgda.init(None))
  assert int(state.solver_failures) == 1
  exact = methods.get("mgda", 10)
  _, state = jax.jit(exact.weights)(stats_of(case), exact.init(None))
  assert int(state.solver_failures) == 0 and int(state.iterations) < 30


def test_cagrad_problem_has_zero_duality_gap_on_hard_cases(seed):
  # The duality gap of min_w <g_w, g0> + r |g_w| is an optimality certificate of its own,
  # independent of any reference solver.
  solve = jax.jit(solvers.min_linear_plus_norm)
  for case in cases.hard_cases(ks=(3, 10), seeds=(seed,)):
    a = case.gram / np.mean(np.diag(case.gram))
    b = a.mean(axis=1)
    radius = 0.4 * np.sqrt(b.mean())
    result = solve(jnp.asarray(a), jnp.asarray(b), radius)
    w = np.asarray(result.x)
    assert bool(result.converged), case.name
    gap = references.linear_plus_norm_gap(a, b, radius, w)
    if np.isfinite(gap):  # (NaN: g_w = 0, the hull-through-0 answer)
      assert gap <= 1e-8, (case.name, gap)


def test_nash_mtl_system_without_solution_fails_fast_and_finite():
  for gram in (
    [[1.0, -1.0], [-1.0, 1.0]],  # two opposite gradients
    [[0.0, 0.0], [0.0, 1.0]],
  ):  # a zero gradient
    result = jax.jit(solvers.power_balance)(jnp.asarray(gram))
    assert not bool(result.converged)
    assert int(result.iterations) < 50 and np.isfinite(float(result.residual))


def test_cagrad_solver_traces_its_inner_solve_once():
  # The root finder runs its inner solves in one loop, so `simplex_qp` (one while loop) is
  # traced once, not once per phase: two loops in all, which keeps the compile short.
  text = str(jax.make_jaxpr(solvers.min_linear_plus_norm)(jnp.eye(3), jnp.ones(3), 0.5))
  assert text.count("while[") == 2, text.count("while[")
