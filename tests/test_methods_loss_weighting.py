"""The loss-based weightings (SI, RLW, DWA, UW, FAMO, STCH, Constant, GLS, RGW, PBI, GO4Align;
methods/loss_weighting.py) against NumPy references of their papers' update rules, on fresh
random losses (the properties every method shares are in test_testing_properties.py)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ntkmtl_jax import methods
from ntkmtl_jax.method import TaskStats

from conftest import NumpyAdam, TanhMLP, assert_close, enable_x64, random_losses
from conftest import run_loss_weighting as run_weighting


def softmax(x):
  e = np.exp(x - np.max(x))
  return e / e.sum()


# ---------------------------------------------------------------------------------- SI


def test_si_weights_are_inverse_losses_and_update_is_grad_of_log_sum(seed):
  rng = np.random.default_rng(seed)
  k = int(rng.integers(2, 6))
  model = TanhMLP(rng, num_tasks=k, task_scales=rng.uniform(0.2, 5.0, k))
  agg = methods.get("si", k, shared=model.shared)
  losses = model.loss_fn(model.params, model.batch)
  grads = jax.jacrev(model.loss_fn)(model.params, model.batch)
  update, state = agg.update(grads, agg.init(model.params), model.params, losses=losses)
  np.testing.assert_allclose(
    state.weights, 1.0 / np.asarray(losses), rtol=1e-6, err_msg=f"seed={seed}"
  )
  expected = jax.grad(lambda p: jnp.sum(jnp.log(model.loss_fn(p, model.batch))))(model.params)
  jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-4, err_msg=f"seed={seed}"), update, expected)


# --------------------------------------------------------------------------------- RLW


def test_rlw_weights_on_simplex_random_per_key_mean_one_over_k(seed):
  rng = np.random.default_rng(seed)
  k = int(rng.integers(2, 7))
  agg = methods.get("rlw", k)
  state = agg.init(None)
  losses = jnp.asarray(rng.uniform(0.1, 3.0, k), jnp.float32)
  keys = jax.random.split(jax.random.key(seed), 4000)
  w = jax.vmap(lambda key: agg.weights(TaskStats(losses=losses, key=key), state)[0])(keys)
  w = np.asarray(w, np.float64)
  assert np.all(w > 0), f"seed={seed}"
  np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-5, err_msg=f"seed={seed}")
  assert len({tuple(np.round(r, 6)) for r in w[:50]}) == 50, f"seed={seed}"
  # E[softmax(z)] = 1/k by exchangeability; each weight's standard deviation is < 0.5.
  np.testing.assert_allclose(w.mean(0), 1.0 / k, atol=0.03, err_msg=f"seed={seed}")
  # Without a key the state's own key advances, so successive steps differ.
  w1, s1 = agg.weights(TaskStats(losses=losses), state)
  w2, s2 = agg.weights(TaskStats(losses=losses), s1)
  assert np.max(np.abs(np.asarray(w1) - np.asarray(w2))) > 1e-6, f"seed={seed}"
  assert int(s2.count) == 2


# --------------------------------------------------------------------------------- DWA


def dwa_reference(losses, temperature, steps_per_epoch):
  k = losses.shape[1]
  epochs, acc, out = [], np.zeros(k), []
  for t, l in enumerate(losses):
    if len(epochs) >= 2:
      e = np.exp(epochs[-1] / epochs[-2] / temperature)
      out.append(k * e / e.sum())
    else:
      out.append(np.ones(k))
    acc = acc + l
    if (t + 1) % steps_per_epoch == 0:
      epochs.append(acc / steps_per_epoch)
      acc = np.zeros(k)
  return np.stack(out)


@pytest.mark.parametrize("steps_per_epoch", [1, 3])
def test_dwa_matches_numpy_reference(seed, steps_per_epoch):
  rng = np.random.default_rng(seed)
  k = int(rng.integers(2, 6))
  losses = random_losses(rng, 4 * steps_per_epoch + 2, k)
  temperature = float(rng.choice([2.0, rng.uniform(0.5, 4.0)]))
  agg = methods.get("dwa", k, temperature=temperature, steps_per_epoch=steps_per_epoch)
  w, _ = run_weighting(agg, losses)
  expected = dwa_reference(losses, temperature, steps_per_epoch)
  np.testing.assert_allclose(w, expected, rtol=1e-5, err_msg=f"seed={seed}")
  np.testing.assert_allclose(w[: 2 * steps_per_epoch], 1.0)


def test_dwa_default_temperature_is_two():
  assert methods.defaults("dwa")["temperature"] == 2.0


# ---------------------------------------------------------------------------------- UW


def test_uw_log_variances_follow_gradient_of_objective(seed):
  rng = np.random.default_rng(seed)
  k = int(rng.integers(2, 6))
  losses = random_losses(rng, 4, k)
  lr = float(rng.uniform(0.01, 0.3))
  # Plain gradient descent: s <- s - lr * d/ds sum_i 0.5 (exp(-s_i) l_i + s_i).
  w, state = run_weighting(methods.get("uw", k, optimizer=optax.sgd(lr)), losses)
  s = np.zeros(k)
  for t, l in enumerate(losses):
    np.testing.assert_allclose(w[t], 0.5 * np.exp(-s), rtol=1e-5, err_msg=f"seed={seed}")
    s = s - lr * 0.5 * (1.0 - np.exp(-s) * l)
  np.testing.assert_allclose(state.log_variances, s, rtol=1e-5, atol=1e-6, err_msg=f"seed={seed}")
  # The default: Adam at the published rate 0.025.
  w, state = run_weighting(methods.get("uw", k), losses)
  adam, s = NumpyAdam(0.025), np.zeros(k)
  for t, l in enumerate(losses):
    np.testing.assert_allclose(w[t], 0.5 * np.exp(-s), rtol=1e-5, err_msg=f"seed={seed}")
    s = adam.step(s, 0.5 * (1.0 - np.exp(-s) * l))
  np.testing.assert_allclose(state.log_variances, s, rtol=1e-4, atol=1e-6, err_msg=f"seed={seed}")


# -------------------------------------------------------------------------------- FAMO


def famo_reference(losses, step_fn, eps=1e-8):
  """FAMO's rule with the logit update applied at the next step (see the docstring)."""
  k = losses.shape[1]
  xi, prev, weights, logits = np.zeros(k), None, [], []
  for l in losses:
    if prev is not None:
      z = softmax(xi)
      jacobian = np.diag(z) - np.outer(z, z)  # d softmax / d xi
      delta = np.log(prev + eps) - np.log(l + eps)
      xi = step_fn(xi, jacobian.T @ delta)
    z = softmax(xi)
    d = l + eps
    weights.append(z / d / np.sum(z / d))
    logits.append(xi.copy())
    prev = l
  return np.stack(weights), np.stack(logits)


def test_famo_logits_follow_the_authors_update(seed):
  rng = np.random.default_rng(seed)
  k = int(rng.integers(2, 6))
  losses = random_losses(rng, 3, k)
  w, state = run_weighting(methods.get("famo", k), losses)
  adam = NumpyAdam(0.025, weight_decay=0.01)  # the published defaults
  expected_w, expected_xi = famo_reference(losses, adam.step)
  np.testing.assert_allclose(
    state.logits, expected_xi[-1], rtol=1e-4, atol=1e-7, err_msg=f"seed={seed}"
  )
  np.testing.assert_allclose(w, expected_w, rtol=1e-4, err_msg=f"seed={seed}")
  np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(w[0], (1 / losses[0]) / np.sum(1 / losses[0]), rtol=1e-5)


def test_famo_paper_rule_with_plain_gradient_step(seed):
  rng = np.random.default_rng(seed)
  k = int(rng.integers(2, 6))
  losses = random_losses(rng, 3, k)
  beta, gamma = float(rng.uniform(0.1, 1.0)), float(rng.uniform(0.0, 0.1))
  tx = optax.chain(optax.add_decayed_weights(gamma), optax.sgd(beta))
  _, state = run_weighting(methods.get("famo", k, optimizer=tx), losses)
  # The paper: xi <- xi - beta (delta + gamma xi), delta = J_softmax^T (log-loss decrease).
  _, expected_xi = famo_reference(losses, lambda xi, g: xi - beta * (g + gamma * xi))
  np.testing.assert_allclose(
    state.logits, expected_xi[-1], rtol=1e-4, atol=1e-6, err_msg=f"seed={seed}"
  )
  assert np.max(np.abs(expected_xi[-1])) > 1e-4  # the check is not vacuous


# -------------------------------------------------------------------------------- STCH


def stch_reference(losses, mu, warmup_epochs, steps_per_epoch, h=1e-7):
  """Weights = d/dl of the scalarised loss, by central differences in float64."""
  k = losses.shape[1]
  record_from = warmup_epochs * steps_per_epoch
  record_until = record_from + steps_per_epoch
  nadir, acc, out = None, np.zeros(k), []
  for t, l in enumerate(losses):
    if t < record_until:
      scalarised = lambda x: np.sum(np.log(x))
      if t >= record_from:
        acc = acc + l
      if t == record_until - 1:
        nadir = acc / steps_per_epoch
    else:

      def scalarised(x, n=nadir):
        u = np.log(x / n) / mu
        return k * mu * (np.max(u) + np.log(np.sum(np.exp(u - np.max(u)))))

    out.append(
      np.array([(scalarised(l + h * e) - scalarised(l - h * e)) / (2 * h) for e in np.eye(k)])
    )
  return np.stack(out), nadir


def test_stch_matches_numpy_reference(seed):
  rng = np.random.default_rng(seed)
  k = int(rng.integers(2, 6))
  mu = float(rng.choice([1.0, rng.uniform(0.2, 2.0)]))
  warmup_epochs, steps_per_epoch = int(rng.integers(0, 3)), int(rng.integers(1, 3))
  steps = (warmup_epochs + 1) * steps_per_epoch + 3
  losses = random_losses(rng, steps, k)
  agg = methods.get("stch", k, mu=mu, warmup_epochs=warmup_epochs, steps_per_epoch=steps_per_epoch)
  w, state = run_weighting(agg, losses)
  expected, nadir = stch_reference(losses, mu, warmup_epochs, steps_per_epoch)
  np.testing.assert_allclose(w, expected, rtol=1e-4, err_msg=f"seed={seed}")
  np.testing.assert_allclose(state.nadir, nadir, rtol=1e-5, err_msg=f"seed={seed}")


# ------------------------------------------- Constant, GLS / GeometricMean, RGW, PBI, GO4Align


def hard_losses(rng, k):
  """Losses spread over four decades in a random order (the scales of the hard cases)."""
  return rng.permutation(np.logspace(0, 4, k)) * rng.uniform(0.5, 2.0, k)


def test_constant_applies_its_weights(seed):
  rng = np.random.default_rng(seed)
  k = int(rng.integers(2, 6))
  w = rng.normal(size=k)
  jac = rng.normal(size=(k, 7)) * rng.permutation(np.logspace(0, 4, k))[:, None]
  agg = methods.get("constant", k, weights=w)
  params = {"w": jnp.zeros(7)}
  update, state = agg.update(
    {"w": jnp.asarray(jac, jnp.float32)}, agg.init(params), params, losses=jnp.ones(k)
  )
  assert_close(update["w"], w @ jac, rtol=1e-5)
  np.testing.assert_allclose(state.weights, w, rtol=1e-6)
  with pytest.raises(ValueError, match="finite numbers"):
    methods.get("constant", k, weights=np.ones(k + 1))


@pytest.mark.parametrize("name", ["gls", "geometric_mean"])
def test_gls_is_the_gradient_of_the_geometric_mean(seed, name):
  rng = np.random.default_rng(seed)
  k = int(rng.integers(2, 7))
  losses = hard_losses(rng, k)
  w, _ = run_weighting(methods.get(name, k), losses[None])
  expected = np.prod(losses) ** (1 / k) / (k * losses)  # d (prod l)^(1/k) / d l_i
  np.testing.assert_allclose(w[0], expected, rtol=1e-5, err_msg=f"seed={seed}")
  # Through a model: the update is jax.grad of the geometric mean of its losses.
  model = TanhMLP(rng, num_tasks=k, task_scales=rng.uniform(0.2, 5.0, k))
  agg = methods.get(name, k, shared=model.shared)
  grads = jax.jacrev(model.loss_fn)(model.params, model.batch)
  update, _ = agg.update(
    grads, agg.init(model.params), model.params, losses=model.loss_fn(model.params, model.batch)
  )
  gm = lambda p: jnp.exp(jnp.mean(jnp.log(model.loss_fn(p, model.batch))))
  jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-4), update, jax.grad(gm)(model.params))
  # 40 losses of 1e-12 or 1e12: the product under- or overflows, the log-space weights not.
  tiny, _ = run_weighting(methods.get(name, 40), np.full((1, 40), 1e-12))
  np.testing.assert_allclose(tiny[0], 1 / 40, rtol=1e-5)


def test_rgw_draws_rlw_weights_and_leaves_the_heads_unweighted(seed):
  rng = np.random.default_rng(seed)
  k = int(rng.integers(2, 6))
  rgw, rlw = methods.get("rgw", k), methods.get("rlw", k)
  keys = jax.random.split(jax.random.key(seed), 4000)
  losses = jnp.asarray(rng.uniform(0.1, 3.0, k), jnp.float32)
  draw = lambda agg: np.asarray(
    jax.vmap(lambda key: agg.weights(TaskStats(losses=losses, key=key), agg.init(None))[0])(keys)
  )
  w = draw(rgw)
  np.testing.assert_array_equal(w, draw(rlw))  # the same draw for the same key
  np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-5)
  # Softmax of k standard normals: mean 1/k by exchangeability; the largest weight's mean
  # against a Monte Carlo estimate in float64 (its standard error is below 0.005).
  np.testing.assert_allclose(w.mean(0), 1 / k, atol=0.02)
  z = np.random.default_rng(seed + 100).normal(size=(200_000, k))
  ref = np.exp(z) / np.exp(z).sum(1, keepdims=True)
  assert abs(w.max(1).mean() - ref.max(1).mean()) < 0.02
  # Shared parameters get sum_i w_i g_i, the head its plain sum of task gradients.
  grads = {
    "shared": jnp.asarray(rng.normal(size=(k, 4)), jnp.float32),
    "head": jnp.asarray(rng.normal(size=(k, 3)), jnp.float32),
  }
  params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:]), grads)
  agg = methods.get("rgw", k, shared={"shared": True, "head": False})
  update, state = agg.update(grads, agg.init(params), params, losses=losses, key=keys[0])
  assert_close(update["shared"], np.asarray(state.weights) @ np.asarray(grads["shared"]))
  assert_close(update["head"], np.asarray(grads["head"]).sum(0))


def numpy_pbi(f, pref, theta):
  u = pref / np.linalg.norm(pref)
  d1 = f @ u
  return d1 + theta * np.sqrt(np.sum((f - d1 * u) ** 2) + 1e-12)


def test_pbi_weights_are_the_gradient_of_d1_plus_theta_d2(seed):
  rng = np.random.default_rng(seed)
  k = int(rng.integers(2, 6))
  theta = float(rng.uniform(0.5, 10.0))
  pref = rng.uniform(0.1, 1.0, k)
  ref = rng.uniform(0.0, 0.5, k)
  losses = hard_losses(rng, k)
  with enable_x64():
    agg = methods.get("pbi", k, theta=theta, preference=pref, reference=ref)
    w, _ = agg.weights(TaskStats(losses=jnp.asarray(losses)), agg.init(None))
  # Central differences of the scalarisation itself, step relative to each loss.
  numeric = []
  for i in range(k):
    h = 1e-6 * losses[i]
    up, down = losses.copy(), losses.copy()
    up[i] += h
    down[i] -= h
    numeric.append(
      (numpy_pbi(up - ref, pref, theta) - numpy_pbi(down - ref, pref, theta)) / (2 * h)
    )
  np.testing.assert_allclose(np.asarray(w), numeric, rtol=1e-5, atol=1e-7 * theta)
  # On the preference line only d1 pulls: w is the unit preference vector (in float64; in
  # float32 the rounding of f - d1 u, over d2's floor of 1e-6, is amplified by theta).
  with enable_x64():
    on_line = jnp.asarray(ref + 3.0 * pref)
    w_line, _ = agg.weights(TaskStats(losses=on_line), agg.init(None))
  np.testing.assert_allclose(w_line, pref / np.linalg.norm(pref), rtol=1e-6, atol=1e-6)


def brute_force_kmeans(x, groups):
  """Each value replaced by its cluster's mean in the assignment of least within-cluster sum
  of squares, over every assignment of the values to `groups` non-empty clusters."""
  best, out = np.inf, None
  for labels in itertools.product(range(groups), repeat=len(x)):
    labels = np.array(labels)
    if len(set(labels)) < groups:
      continue
    means = np.array([x[labels == g].mean() for g in range(groups)])
    cost = np.sum((x - means[labels]) ** 2)
    if cost < best:
      best, out = cost, means[labels]
  return out


@pytest.mark.parametrize("num_groups", [1, 2, 3, 8])
def test_go4align_matches_the_authors_loop_with_exact_kmeans(seed, num_groups):
  rng = np.random.default_rng([seed, num_groups])
  k, steps, eta = 6, 4, 1e-2
  losses = np.stack([hard_losses(rng, k) * 1e-3 for _ in range(steps)])
  with enable_x64():
    agg = methods.get("go4align", k, num_groups=num_groups, robust_step_size=eta)
    state, got = agg.init(None), []
    for l in losses:
      w, state = agg.weights(TaskStats(losses=jnp.asarray(l)), state)
      got.append(np.asarray(w))
  p = np.full(k, 1 / k)
  for t, l in enumerate(losses):
    p = p * np.exp(-eta * l)
    p = p / p.sum()
    raw = l.sum() / l * p
    expected = brute_force_kmeans(raw, min(num_groups, k))
    np.testing.assert_allclose(got[t], expected, rtol=1e-5, err_msg=f"step {t}")
  if num_groups == 1:
    np.testing.assert_allclose(got[-1], np.mean(raw), rtol=1e-5)
