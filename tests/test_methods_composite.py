"""Methods on transformed losses (methods/composite.py): log_mgda, log_cagrad, log_imtl,
IMTL-L and the hybrid IMTL, against NumPy references (the min-norm point by NNLS, CAGrad by
root finding, IMTL-G from its definition, PyTorch's Adam) applied to the gradients of the
transformed losses, in float64, on hard cases (task scales 1 to 1e4, nearly collinear and
nearly opposite gradients)."""

import jax.numpy as jnp
import numpy as np
import pytest

from ntkmtl_jax import methods
from ntkmtl_jax.methods.composite import log_losses
from ntkmtl_jax.methods.loss_weighting import linear_scalarization
from ntkmtl_jax.testing import cases, properties, references

from conftest import NumpyAdam, enable_x64

HARD = ("mild", "imbalanced", "near_collinear", "near_opposite")


def hard_steps(seed, k, family, steps=1):
  case = cases.make_case(family, k, seed, dim=20)
  return properties.steps_of(case, steps)


def run64(name, jacs, losses, **hparams):
  """The method's float64 trajectory, its jitted update compiled once per name, k and
  hyper-parameters (`properties.method_of`)."""
  with enable_x64():
    method, update = properties.method_of(name, jacs.shape[1], hparams)
    return properties.run(method, jacs, losses, dtype=jnp.float64, update=update)


def relative(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("family", HARD)
@pytest.mark.parametrize("k", [3])
def test_log_mgda_is_the_min_norm_point_of_the_log_gradients(seed, family, k):
  jacs, losses = hard_steps(seed, k, family)
  out = run64("log_mgda", jacs, losses)
  log_jac = jacs[0] / (losses[0] + 1e-8)[:, None]
  sol = references.min_norm_weights(log_jac)
  w = sol / (losses[0] + 1e-8)
  w = w / w.sum()  # the authors' division by c = sum_i sol_i / (l_i + eps)
  np.testing.assert_allclose(out.weights[0], w, rtol=1e-6, atol=1e-9, err_msg=family)
  assert relative(out.directions[0], w @ jacs[0]) < 1e-6
  # No task conflicts with it, however different the loss scales.
  assert np.all(
    jacs[0] @ out.directions[0]
    >= -1e-9 * np.linalg.norm(out.directions[0]) * np.linalg.norm(jacs[0], axis=1)
  )


@pytest.mark.parametrize("family", HARD)
def test_log_cagrad_is_cagrad_of_the_log_gradients(seed, family):
  k = 3
  jacs, losses = hard_steps(seed, k, family)
  out = run64("log_cagrad", jacs, losses)
  log_jac = jacs[0] / losses[0][:, None]  # the authors take log l_i, no eps
  expected = k / (1 + 0.4**2) * references._cagrad_like(log_jac, 0.4)
  assert relative(out.directions[0], expected) < 1e-5, family
  # Scale-invariant: one loss (and its gradient) times 1e3 gives the same update.
  jacs2, losses2 = jacs.copy(), losses.copy()
  jacs2[:, 1] *= 1e3
  losses2[:, 1] *= 1e3
  assert relative(run64("log_cagrad", jacs2, losses2).directions[0], out.directions[0]) < 1e-6


@pytest.mark.parametrize("family", HARD)
@pytest.mark.parametrize("k", [2, 4])
def test_log_imtl_is_imtl_g_of_the_log_gradients(seed, family, k):
  jacs, losses = hard_steps(seed, k, family)
  log_jac = jacs[0] / (losses[0] + 1e-8)[:, None]
  alpha = references.imtl_g_weights(log_jac)
  if alpha is None:  # singular: no unique answer
    return
  out = run64("log_imtl", jacs, losses)
  np.testing.assert_allclose(
    out.weights[0], alpha / (losses[0] + 1e-8), rtol=1e-6, atol=1e-9 * np.abs(out.weights[0]).max()
  )
  # Equal projections on every unit gradient, whatever the loss scales.
  units = jacs[0] / np.linalg.norm(jacs[0], axis=1, keepdims=True)
  projections = units @ out.directions[0]
  np.testing.assert_allclose(projections, projections[0], rtol=1e-6)
  scaled = jacs * np.logspace(0, 4, k)[None, :, None]
  out2 = run64("log_imtl", scaled, losses * np.logspace(0, 4, k), eps=0.0)
  out0 = run64("log_imtl", jacs, losses, eps=0.0)
  assert relative(out2.directions[0], out0.directions[0]) < 1e-6


def test_log_losses_of_ls_is_si(seed):
  # d/dtheta sum_i log l_i = sum_i g_i / l_i: LS on log losses is SI.
  rng = np.random.default_rng(seed)
  losses = rng.uniform(0.1, 3.0, 4) * np.logspace(0, 4, 4)
  jacs = rng.normal(size=(1, 4, 7))
  with enable_x64():
    composite = log_losses(linear_scalarization(4), 4, eps=0.0)
    a = properties.run(composite, jacs, losses[None], dtype=jnp.float64)
    b = properties.run(methods.get("si", 4), jacs, losses[None], dtype=jnp.float64)
  np.testing.assert_allclose(a.directions, b.directions, rtol=1e-12)
  assert a.weights[0] == pytest.approx(1 / losses, rel=1e-6)  # stored in float32


def test_log_losses_composes_with_a_gradient_rule(seed):
  # GradDrop keeps or drops each coordinate's positive or negative part; on log losses its
  # kept parts are those of g_i / l_i, so scaling a task's loss changes nothing.
  rng = np.random.default_rng(seed)
  jacs = rng.normal(size=(1, 3, 9))
  losses = rng.uniform(0.5, 2.0, (1, 3))
  with enable_x64():
    method = log_losses(methods.get("graddrop", 3), 3, eps=0.0)
    a = properties.run(method, jacs, losses, seed=seed, dtype=jnp.float64)
    jacs2, losses2 = jacs * np.array([1.0, 1e3, 1e-2])[None, :, None], losses * [1.0, 1e3, 1e-2]
    b = properties.run(method, jacs2, losses2, seed=seed, dtype=jnp.float64)
    inner = properties.run(
      methods.get("graddrop", 3), jacs / losses[..., None], losses, seed=seed, dtype=jnp.float64
    )
  assert method.needs.kind == "gradients"
  np.testing.assert_allclose(a.directions, b.directions, rtol=1e-10)
  np.testing.assert_allclose(a.directions, inner.directions, rtol=1e-10)


# ------------------------------------------------------------------------------ IMTL(-L)


def numpy_imtl(jacs, losses, lr, hybrid):
  """IMTL-L's scales by PyTorch's Adam on d/ds (e^s l - s); the update sum_i e^{s_i} g_i, or
  (hybrid) IMTL-G's weights for the scaled gradients e^{s_i} g_i."""
  k = jacs.shape[1]
  s, adam = np.zeros(k), NumpyAdam(lr)
  weights, directions = [], []
  for jac, l in zip(jacs, losses):
    scale = np.exp(s)
    alpha = references.imtl_g_weights(scale[:, None] * jac) if hybrid else np.ones(k)
    w = alpha * scale
    weights.append(w)
    directions.append(w @ jac)
    s = adam.step(s, scale * l - 1.0)
  return np.array(weights), np.array(directions)


@pytest.mark.parametrize("family", ["mild", "imbalanced", "near_opposite"])
@pytest.mark.parametrize("name", ["imtl_l", "imtl"])
def test_imtl_follows_the_scaled_losses(seed, name, family):
  k, steps = 3, 6
  jacs, losses = hard_steps(seed, k, family, steps)
  out = run64(name, jacs, losses)
  weights, directions = numpy_imtl(jacs, losses, 0.025, hybrid=(name == "imtl"))
  # The scales live in float32 (the state), so agreement is to float32 rounding.
  np.testing.assert_allclose(out.weights, weights, rtol=2e-6, err_msg=family)
  for t in range(steps):
    assert relative(out.directions[t], directions[t]) < 2e-6, (family, t)
  # The scales move toward -log l (scaled losses toward 1) for losses far from 1.
  s = np.asarray(out.states[-1].transform.log_scales)
  far = np.abs(np.log(losses[-1])) > 0.5
  np.testing.assert_array_equal(np.sign(s[far]), -np.sign(np.log(losses[-1][far])))


def test_imtl_l_is_twice_uw_with_the_sign_of_s_flipped(seed):
  rng = np.random.default_rng(seed)
  losses = rng.uniform(0.1, 3.0, (8, 4)) * np.logspace(0, 3, 4)
  jacs = rng.normal(size=(8, 4, 5))
  a, b = run64("imtl_l", jacs, losses), run64("uw", jacs, losses)
  np.testing.assert_allclose(a.weights, 2 * b.weights, rtol=1e-5)


def test_imtl_starts_as_imtl_g_and_needs_the_gram_only(seed):
  jacs, losses = hard_steps(seed, 4, "imbalanced")
  assert methods.get("imtl", 4).needs.kind == "gram"
  assert methods.get("imtl_l", 4).needs.kind == "losses"
  assert methods.get("log_mgda", 4).needs.kind == "gram"
  np.testing.assert_allclose(
    run64("imtl", jacs, losses).directions, run64("imtl_g", jacs, losses).directions, rtol=1e-12
  )
