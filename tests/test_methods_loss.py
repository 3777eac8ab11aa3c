"""The loss- and norm-based weightings (SI, RLW, DWA, UW, FAMO, GradNorm, DB-MTL, STCH)
against NumPy references of their papers' update rules, on fresh random losses (the
properties every method shares are in test_method_properties.py)."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
import optax

from ntkmtl_jax import methods
from ntkmtl_jax.method import TaskStats
from ntkmtl_jax.step import make_train_step
from conftest import TanhMLP, assert_close, flat_shared



def random_losses(rng, steps, k):
  return rng.uniform(0.1, 3.0, size=(steps, k))


def run_weighting(agg, losses, sq_norms=None, keys=None, jit=False):
  """Runs `agg.weights` over a sequence of steps; returns the weights (steps, k) and state."""
  weighting = jax.jit(agg.weights) if jit else agg.weights
  state = agg.init(None)
  out = []
  for t, l in enumerate(losses):
    stats = TaskStats(losses=jnp.asarray(l, jnp.float32),
                      sq_norms=None if sq_norms is None else jnp.asarray(sq_norms[t], jnp.float32),
                      key=None if keys is None else keys[t])
    w, state = weighting(stats, state)
    out.append(np.asarray(w, np.float64))
  return np.stack(out), state


class NumpyAdam:
  """PyTorch's Adam, with its L2 `weight_decay` added to the gradient, in float64."""

  def __init__(self, lr, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8):
    self.lr, self.wd, self.b1, self.b2, self.eps = lr, weight_decay, b1, b2, eps
    self.m = self.v = 0.0
    self.t = 0

  def step(self, x, g):
    g = g + self.wd * x
    self.t += 1
    self.m = self.b1 * self.m + (1 - self.b1) * g
    self.v = self.b2 * self.v + (1 - self.b2) * g ** 2
    m_hat = self.m / (1 - self.b1 ** self.t)
    v_hat = self.v / (1 - self.b2 ** self.t)
    return x - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


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
  np.testing.assert_allclose(state.weights, 1.0 / np.asarray(losses), rtol=1e-6,
                             err_msg=f"seed={seed}")
  expected = jax.grad(lambda p: jnp.sum(jnp.log(model.loss_fn(p, model.batch))))(model.params)
  jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-4, err_msg=f"seed={seed}"),
               update, expected)


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
  np.testing.assert_allclose(w[:2 * steps_per_epoch], 1.0)


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
  np.testing.assert_allclose(state.log_variances, s, rtol=1e-5, atol=1e-6,
                             err_msg=f"seed={seed}")
  # The default: Adam at the published rate 0.025.
  w, state = run_weighting(methods.get("uw", k), losses)
  adam, s = NumpyAdam(0.025), np.zeros(k)
  for t, l in enumerate(losses):
    np.testing.assert_allclose(w[t], 0.5 * np.exp(-s), rtol=1e-5, err_msg=f"seed={seed}")
    s = adam.step(s, 0.5 * (1.0 - np.exp(-s) * l))
  np.testing.assert_allclose(state.log_variances, s, rtol=1e-4, atol=1e-6,
                             err_msg=f"seed={seed}")


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
  np.testing.assert_allclose(state.logits, expected_xi[-1], rtol=1e-4, atol=1e-7,
                             err_msg=f"seed={seed}")
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
  np.testing.assert_allclose(state.logits, expected_xi[-1], rtol=1e-4, atol=1e-6,
                             err_msg=f"seed={seed}")
  assert np.max(np.abs(expected_xi[-1])) > 1e-4  # the check is not vacuous


# ---------------------------------------------------------------------------- GradNorm

def gradnorm_objective(w, norms, target):
  return np.sum(np.abs(np.abs(w) * norms - target))


def test_gradnorm_weight_step_is_gradient_of_l_grad(seed):
  rng = np.random.default_rng(seed)
  k = int(rng.integers(2, 6))
  alpha, lr = 1.5, float(rng.uniform(0.01, 0.1))
  losses = random_losses(rng, 2, k)
  norms = rng.uniform(0.1, 3.0, size=(2, k))
  w, state = run_weighting(methods.get("gradnorm", k, alpha=alpha, optimizer=optax.sgd(lr)),
                           losses, sq_norms=norms ** 2)
  # Step 0: w = 1, r = 1; step 1 starts from the renormalised weights of step 0.
  weights = np.ones(k)
  for t in range(2):
    np.testing.assert_allclose(w[t], weights, rtol=1e-5, err_msg=f"seed={seed}")
    rates = losses[t] / losses[0]
    target = np.mean(np.abs(weights) * norms[t]) * (rates / rates.mean()) ** alpha
    h = 1e-6
    grad = np.array([(gradnorm_objective(weights + h * e, norms[t], target)
                      - gradnorm_objective(weights - h * e, norms[t], target)) / (2 * h)
                     for e in np.eye(k)])
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
    target = grad_norms.mean() * rates ** 1.5
    weights = adam.step(weights, np.sign(grad_norms - target) * np.sign(weights) * norms)
    weights = k * weights / weights.sum()
    np.testing.assert_allclose(state.loss_weights, weights, rtol=1e-4,
                               err_msg=f"seed={seed} step={step}")
    np.testing.assert_allclose(np.sum(state.loss_weights), k, rtol=1e-5)


# ------------------------------------------------------------------------------ DB-MTL

def db_mtl_params(rng, k):
  params = {"body": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
            "head": jnp.asarray(rng.normal(size=(3, k)), jnp.float32)}
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
    buffer = log_grads + beta / t ** beta_sigma * (buffer - log_grads)
    norms = np.linalg.norm(buffer, axis=1)
    scales = norms.max() / (norms + 1e-8)
    assert_close(np.asarray(update["body"]).ravel(), scales @ buffer,
                 err_msg=f"seed={seed} t={t}")
    assert_close(update["head"], np.tensordot(1 / (losses + 1e-8), head, 1),
                 err_msg=f"seed={seed} t={t}")
    np.testing.assert_allclose(state.weights, scales, rtol=1e-4)
    # Every rescaled buffer has the largest norm.
    np.testing.assert_allclose(np.linalg.norm(scales[:, None] * buffer, axis=1), norms.max(),
                               rtol=1e-4)


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
    out.append(np.array([(scalarised(l + h * e) - scalarised(l - h * e)) / (2 * h)
                         for e in np.eye(k)]))
  return np.stack(out), nadir


def test_stch_matches_numpy_reference(seed):
  rng = np.random.default_rng(seed)
  k = int(rng.integers(2, 6))
  mu = float(rng.choice([1.0, rng.uniform(0.2, 2.0)]))
  warmup_epochs, steps_per_epoch = int(rng.integers(0, 3)), int(rng.integers(1, 3))
  steps = (warmup_epochs + 1) * steps_per_epoch + 3
  losses = random_losses(rng, steps, k)
  agg = methods.get("stch", k, mu=mu, warmup_epochs=warmup_epochs,
                    steps_per_epoch=steps_per_epoch)
  w, state = run_weighting(agg, losses)
  expected, nadir = stch_reference(losses, mu, warmup_epochs, steps_per_epoch)
  np.testing.assert_allclose(w, expected, rtol=1e-4, err_msg=f"seed={seed}")
  np.testing.assert_allclose(state.nadir, nadir, rtol=1e-5, err_msg=f"seed={seed}")


def test_published_defaults():
  assert methods.defaults("famo")["learning_rate"] == 0.025
  assert methods.defaults("famo")["gamma"] == 0.01
  assert methods.defaults("uw")["learning_rate"] == 0.025
  assert methods.defaults("stch")["mu"] == 1.0 and methods.defaults("stch")["warmup_epochs"] == 4
  assert methods.defaults("db_mtl")["beta"] == 0.9


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
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6,
                                                       err_msg=f"seed={seed}"),
               results[0], results[1])
