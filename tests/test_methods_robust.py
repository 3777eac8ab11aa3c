"""Robust aggregation (Krum, TrimmedMean; methods/robust.py): each method's defining formula
against an independent NumPy/SciPy reference, on random and hard Jacobians."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from ntkmtl_jax import methods
from ntkmtl_jax.testing import cases

from conftest import assert_close, enable_x64, random_jacobian

HARD = ("imbalanced", "near_collinear", "near_opposite")


def numpy_krum(jac, n_byzantine, n_selected):
  """Krum from the distances between the rows themselves (no Gram matrix), with ties at
  the last selected place shared evenly."""
  k = len(jac)
  distances = np.linalg.norm(jac[:, None, :] - jac[None, :, :], axis=-1)
  neighbours = max(min(k - n_byzantine - 2, k - 1), min(1, k - 1))
  scores = np.array([np.sort(np.delete(distances[i], i))[:neighbours].sum() for i in range(k)])
  n = min(n_selected, k)
  threshold = np.sort(scores)[n - 1]
  tol = 1e-9 * np.abs(scores).max()
  below, tied = scores < threshold - tol, np.abs(scores - threshold) <= tol
  return (below + tied * (n - below.sum()) / tied.sum()) / n


def update(method, jac, dtype=jnp.float32):
  params = {"w": jnp.zeros(jac.shape[1], dtype)}
  out, state = jax.jit(method.update)({"w": jnp.asarray(jac, dtype)}, method.init(params), params)
  return np.asarray(out["w"], np.float64), state


@pytest.mark.parametrize("n_byzantine,n_selected", [(0, 1), (1, 3)])
def test_krum_selects_the_lowest_scores(seed, n_byzantine, n_selected):
  rng = np.random.default_rng([seed, n_byzantine, n_selected])
  jac = random_jacobian(rng, k=int(rng.integers(n_byzantine + 3, 8)))
  k = len(jac)
  expected = numpy_krum(jac, n_byzantine, n_selected)
  out, state = update(methods.get("krum", k, n_byzantine=n_byzantine, n_selected=n_selected), jac)
  np.testing.assert_allclose(np.asarray(state.weights), expected, atol=1e-6, err_msg=f"{seed}")
  assert_close(out, expected @ jac, rtol=1e-5)


@pytest.mark.parametrize("family", HARD)
def test_krum_on_hard_cases(seed, family):
  # Task scales 1 to 1e4, nearly collinear and nearly opposite gradients (float64: the
  # distances of nearly collinear gradients cancel to sqrt(eps) of their norms).
  for k in (3, 5):
    case = cases.make_case(family, k, seed, dim=30)
    with enable_x64():
      out, state = update(methods.get("krum", k), case.jacobian, jnp.float64)
    expected = numpy_krum(case.jacobian, 0, 1)
    np.testing.assert_allclose(np.asarray(state.weights), expected, atol=1e-12, err_msg=case.name)
    np.testing.assert_allclose(out, expected @ case.jacobian, rtol=1e-10, atol=1e-12)


def test_krum_few_tasks_and_ties():
  jac = np.array([[1.0, 0.0], [3.0, 0.0]])
  out, _ = update(methods.get("krum", 2), jac)  # two tasks: equal scores, the mean
  np.testing.assert_allclose(out, [2.0, 0.0], rtol=1e-6)
  jac = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
  out, state = update(methods.get("krum", 3), jac)  # the two mutually nearest, averaged
  np.testing.assert_allclose(np.asarray(state.weights), [0.5, 0.5, 0.0])
  # An outlier far from four agreeing tasks is never chosen.
  jac = np.array([[1.0, 0.1], [1.1, 0.0], [0.9, -0.1], [1.0, 0.0], [-50.0, 80.0]])
  _, state = update(methods.get("krum", 5, n_byzantine=1, n_selected=4), jac)
  np.testing.assert_allclose(np.asarray(state.weights), [0.25, 0.25, 0.25, 0.25, 0.0])
  with pytest.raises(ValueError, match="n_selected"):
    methods.get("krum", 3, n_selected=0)


@pytest.mark.parametrize("trim_number", [1, 2])
def test_trimmed_mean_matches_scipy(seed, trim_number):
  rng = np.random.default_rng([seed, trim_number])
  jac = random_jacobian(rng, k=int(rng.integers(2 * trim_number + 1, 9)))
  k = len(jac)
  out, state = update(methods.get("trimmed_mean", k, trim_number=trim_number), jac)
  expected = scipy.stats.trim_mean(jac, (trim_number + 0.5) / k, axis=0)
  assert_close(out, expected, rtol=1e-5)
  np.testing.assert_allclose(float(np.sum(state.weights)), 1.0, rtol=1e-5)


@pytest.mark.parametrize("family", HARD)
def test_trimmed_mean_on_hard_cases(seed, family):
  for k in (3, 5):
    case = cases.make_case(family, k, seed, dim=30)
    out, _ = update(methods.get("trimmed_mean", k), case.jacobian)
    expected = scipy.stats.trim_mean(case.jacobian, 1.5 / k, axis=0)
    assert_close(out, expected, rtol=1e-5, err_msg=case.name)


def test_trimmed_mean_ignores_one_outlier_per_coordinate():
  rng = np.random.default_rng(0)
  jac = 1.0 + 0.01 * rng.normal(size=(5, 8))
  jac[rng.integers(0, 5, 8), np.arange(8)] = 1e4  # one huge value in every coordinate
  out, _ = update(methods.get("trimmed_mean", 5), jac)
  assert np.all(np.abs(out - 1.0) < 0.05)
  out, _ = update(methods.get("trimmed_mean", 2), jac[:2])  # two tasks: nothing trimmed
  assert_close(out, jac[:2].mean(0))


@pytest.mark.parametrize("k", [1, 2, 7, 16, 17])
def test_sort_tasks_sorts_every_column(k):
  from ntkmtl_jax.methods.robust import sort_tasks

  rng = np.random.default_rng(k)
  matrix = rng.normal(size=(k, 50)).astype(np.float32)
  matrix[:, :5] = np.round(matrix[:, :5])  # ties
  np.testing.assert_array_equal(np.asarray(sort_tasks(jnp.asarray(matrix))), np.sort(matrix, 0))
