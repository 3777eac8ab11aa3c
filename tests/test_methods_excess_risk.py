"""ExcessMTL (methods/excess_risk.py) against a NumPy transcription of its update (LibMTL's
`ExcessMTL`: AdaGrad-style excess risks, relative to the first step's, in an exponentiated
gradient step), on hard Jacobians (task scales 1 to 1e4, nearly collinear or opposite)."""

import jax.numpy as jnp
import numpy as np
import pytest

from ntkmtl_jax import methods
from ntkmtl_jax.testing import cases, properties

from conftest import enable_x64


def numpy_excess_mtl(jacs, eta, eps=1e-7):
  k = jacs.shape[1]
  weights, sq_sum, baseline, out = np.ones(k), np.zeros_like(jacs[0]), None, []
  for jac in jacs:
    sq_sum = sq_sum + jac**2
    excess = np.array([jac[i] / np.sqrt(sq_sum[i] + eps) @ jac[i] for i in range(k)])
    if baseline is None:
      baseline = excess
    else:
      weights = weights * np.exp(eta * excess / baseline)
      weights = weights / weights.sum() * k
    out.append(weights.copy())
  return np.array(out)


@pytest.mark.parametrize("family", ["imbalanced", "near_collinear", "near_opposite"])
def test_excess_mtl_matches_its_update_rule(seed, family):
  case = cases.make_case(family, 4, seed, dim=20)
  jacs, losses = properties.steps_of(case, steps=5)
  # Steps with different sizes (a task converging, another not), so that the weights move.
  jacs = jacs * np.linspace(1.0, 0.2, 5)[:, None, None] ** np.arange(4)[None, :, None]
  eta = 0.5
  with enable_x64():
    out = properties.run(
      methods.get("excess_mtl", 4, robust_step_size=eta), jacs, losses, dtype=jnp.float64
    )
  expected = numpy_excess_mtl(jacs, eta)
  # The state's statistics are float32.
  np.testing.assert_allclose(out.weights, expected, rtol=1e-5, err_msg=family)
  np.testing.assert_allclose(
    out.directions,
    np.einsum("tk,tkp->tp", expected, jacs),
    rtol=1e-5,
    atol=1e-5 * np.abs(out.directions).max(),
  )
  # The task whose gradients shrink least keeps the most weight.
  assert np.argmax(out.weights[-1]) == 0
  assert methods.get("excess_mtl", 4).needs.kind == "gradients"


def test_excess_mtl_state_is_per_shared_parameter():
  method = methods.get("excess_mtl", 3, shared={"body": True, "head": False})
  state = method.init({"body": jnp.zeros((4, 5)), "head": jnp.zeros(7)})
  assert state.sq_grad_sum.shape == (3, 20)
  with pytest.raises(ValueError, match="init\\(params\\)"):
    method.init(None)
