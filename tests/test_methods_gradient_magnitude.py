"""The gradient-magnitude weightings (GradNorm, DB-MTL; methods/gradient_magnitude.py)
against NumPy references of their papers' update rules, on fresh random losses and task
gradients (the properties every method shares are in test_testing_properties.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntkmtl_jax import methods
from ntkmtl_jax.step import make_train_step

from conftest import NumpyAdam, TanhMLP, assert_close, flat_shared, random_losses
from conftest import run_loss_weighting as run_weighting

# ---------------------------------------------------------------------------- GradNorm


def gradnorm_objective(w, norms, target):
  return np.sum(np.abs(np.abs(w) * norms - target))


def test_gradnorm_weight_step_is_gradient_of_l_grad(seed):
  rng = np.random.default_rng(seed)
  k = int(rng.integers(2, 6))
  alpha, lr = 1.5, float(rng.uniform(0.01, 0.1))
  losses = random_losses(rng, 2, k)
  norms = rng.uniform(0.1, 3.0, size=(2, k))
  w, state = run_weighting(
    methods.get("gradnorm", k, alpha=alpha, optimizer=optax.sgd(lr)), losses, sq_norms=norms**2
  )
  # Step 0: w = 1, r = 1; step 1 starts from the renormalised weights of step 0.
  weights = np.ones(k)
  for t in range(2):
    np.testing.assert_allclose(w[t], weights, rtol=1e-5, err_msg=f"seed={seed}")
    rates = losses[t] / losses[0]
    target = np.mean(np.abs(weights) * norms[t]) * (rates / rates.mean()) ** alpha
    h = 1e-6
    grad = np.array(
      [
        (
          gradnorm_objective(weights + h * e, norms[t], target)
          - gradnorm_objective(weights - h * e, norms[t], target)
        )
        / (2 * h)
        for e in np.eye(k)
      ]
    )
    weights = weights - lr * grad
    weights = k * weights / weights.sum()
  np.testing.assert_allclose(state.loss_weights, weights, rtol=1e-4, err_msg=f"seed={seed}")
  np.testing.assert_allclose(np.sum(state.loss_weights), k, rtol=1e-5)
  np.testing.assert_allclose(state.initial_losses, losses[0], rtol=1e-6)


def test_gradnorm_default_adam_and_norms_from_shared_gradients(seed):
  rng = np.random.default_rng(seed)
  k = int(rng.integers(2, 6))
  model = TanhMLP(rng, num_tasks=k, task_scales=rng.uniform(0.2, 5.0, k))
  agg = methods.get("gradnorm", k, shared=model.shared)
  assert agg.needs.kind == "sq_norms" and methods.defaults("gradnorm")["alpha"] == 1.5
  g, heads = model.numpy_task_gradients()
  norms = np.linalg.norm(g, axis=1)
  grads = jax.jacrev(model.loss_fn)(model.params, model.batch)
  state = agg.init(model.params)
  adam, weights, initial = NumpyAdam(0.025), np.ones(k), None
  for step in range(3):
    losses = rng.uniform(0.1, 3.0, k)
    initial = losses if initial is None else initial
    update, state = agg.update(grads, state, model.params, losses=jnp.asarray(losses))
    assert_close(flat_shared(update), weights @ g, err_msg=f"seed={seed}")
    assert_close(update["heads"]["w"], np.tensordot(weights, heads, 1), err_msg=f"seed={seed}")
    grad_norms = np.abs(weights) * norms
    rates = (losses / initial) / np.mean(losses / initial)
    target = grad_norms.mean() * rates**1.5
    weights = adam.step(weights, np.sign(grad_norms - target) * np.sign(weights) * norms)
    weights = k * weights / weights.sum()
    np.testing.assert_allclose(
      state.loss_weights, weights, rtol=1e-4, err_msg=f"seed={seed} step={step}"
    )
    np.testing.assert_allclose(np.sum(state.loss_weights), k, rtol=1e-5)


# ------------------------------------------------------------------------------ DB-MTL


def db_mtl_params(rng, k):
  params = {
    "body": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
    "head": jnp.asarray(rng.normal(size=(3, k)), jnp.float32),
  }
  return params, {"body": True, "head": False}


def test_db_mtl_matches_numpy_reference(seed):
  rng = np.random.default_rng(seed)
  k = int(rng.integers(2, 6))
  beta, beta_sigma = float(rng.uniform(0.5, 0.95)), float(rng.choice([0.0, 0.5]))
  params, mask = db_mtl_params(rng, k)
  agg = methods.get("db-mtl", k, beta=beta, beta_sigma=beta_sigma, shared=mask)
  assert agg.needs.kind == "gradients"
  state = agg.init(params)
  buffer = np.zeros((k, 15))
  for t in range(1, 4):
    # Task gradients of very different sizes: the balancing must undo that.
    body = rng.normal(size=(k, 5, 3)) * rng.uniform(0.01, 10.0, size=(k, 1, 1))
    head = rng.normal(size=(k, 3, k))
    losses = rng.uniform(0.1, 3.0, k)
    grads = {"body": jnp.asarray(body, jnp.float32), "head": jnp.asarray(head, jnp.float32)}
    update, state = agg.update(grads, state, params, losses=jnp.asarray(losses, jnp.float32))
    log_grads = body.reshape(k, -1) / (losses + 1e-8)[:, None]
    buffer = log_grads + beta / t**beta_sigma * (buffer - log_grads)
    norms = np.linalg.norm(buffer, axis=1)
    scales = norms.max() / (norms + 1e-8)
    assert_close(np.asarray(update["body"]).ravel(), scales @ buffer, err_msg=f"seed={seed} t={t}")
    assert_close(
      update["head"], np.tensordot(1 / (losses + 1e-8), head, 1), err_msg=f"seed={seed} t={t}"
    )
    np.testing.assert_allclose(state.weights, scales, rtol=1e-4)
    # Every rescaled buffer has the largest norm.
    np.testing.assert_allclose(
      np.linalg.norm(scales[:, None] * buffer, axis=1), norms.max(), rtol=1e-4
    )


def test_gradnorm_streaming_matches_unrolled_step(seed):
  rng = np.random.default_rng(seed)
  model = TanhMLP(rng, num_tasks=3, task_scales=rng.uniform(0.2, 5.0, 3))
  agg = methods.get("gradnorm", 3, shared=model.shared)
  results = []
  for strategy in ("streaming", "unroll"):
    step = make_train_step(model.loss_fn, agg, optax.sgd(1e-2), strategy=strategy)
    state = step.init(model.params)
    for _ in range(3):
      state, metrics = step(state, model.batch)
    results.append((state.method_state.loss_weights, state.params))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=f"seed={seed}"),
    results[0],
    results[1],
  )
