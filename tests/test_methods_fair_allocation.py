"""The fair-allocation methods (Nash-MTL, FairGrad; methods/fair_allocation.py): their
weights solve their systems on fresh random Jacobians, float32 against float64, and a
system without a solution keeps the previous weights without skipping the step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ntkmtl_jax import methods
from ntkmtl_jax.step import make_train_step

from conftest import TanhMLP, gram32, random_jacobian
from conftest import run_gram_weighting as run_weighting

# ----------------------------------------------------------------------- Nash-MTL, FairGrad


def test_nash_mtl_weights_solve_the_bargaining_system(seed):
  rng = np.random.default_rng(seed)
  jac = random_jacobian(rng)
  k = jac.shape[0]
  weights, state = run_weighting(methods.get("nash_mtl", k), gram32(jac))
  assert int(state.solver_failures) == 0 and np.all(weights > 0), f"seed={seed}"
  np.testing.assert_allclose(
    (jac @ jac.T) @ weights, 1.0 / weights, rtol=1e-3, err_msg=f"seed={seed}"
  )
  # Warm-started from those weights, the next step on new gradients solves its system too.
  jac2 = jac + 0.1 * random_jacobian(rng, k=k, p=jac.shape[1])
  weights2, state2 = run_weighting(methods.get("nash_mtl", k), gram32(jac2), state=state)
  np.testing.assert_allclose(
    (jac2 @ jac2.T) @ weights2, 1.0 / weights2, rtol=1e-3, err_msg=f"seed={seed}"
  )
  assert int(state2.count) == 2


def test_nash_mtl_keeps_previous_weights_and_counts_failure_without_solution(seed):
  rng = np.random.default_rng(seed)
  g = rng.normal(size=(1, 7))
  jac = np.concatenate([g, -2.0 * g, rng.normal(size=(1, 7))])  # 0 is in the hull
  agg = methods.get("nash_mtl", 3)
  previous = agg.init(None)._replace(
    weights=jnp.asarray([0.5, 1.5, 2.0], jnp.float32), count=jnp.asarray(4, jnp.int32)
  )
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
  np.testing.assert_allclose(
    (jac @ jac.T) @ w, w ** (-1.0 / alpha), rtol=1e-3, err_msg=f"seed={seed}"
  )


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
  jax.tree.map(np.testing.assert_array_equal, new_state.method_state, state.method_state)


@pytest.mark.parametrize("name", ["nash_mtl", "fairgrad"])
def test_exactly_opposite_tasks_train_instead_of_skipping_every_step(seed, name):
  # Task 1's loss is minus task 0's (plus a head of its own): the shared gradients are
  # exactly opposite, G [1, 1] = 0 and the system has no solution. The previous weights are
  # kept and the failure counted; the step itself is applied (its residual, kept in the
  # state, is finite), so the heads still train.
  rng = np.random.default_rng(seed)
  params = {
    "shared": jnp.asarray(rng.normal(size=4), jnp.float32),
    "heads": jnp.asarray(rng.normal(size=2), jnp.float32),
  }
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
