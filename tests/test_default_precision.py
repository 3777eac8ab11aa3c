"""What users get at the backend's default matmul precision: ntk_weights and the directions
of the Gram-based methods, float32 against float64 references, per-backend tolerances.

Every other test pins float32 matmuls to "highest" (tests/conftest.py), so that a float64
comparison measures the code. These tests do not: on NVIDIA GPUs a float32 matmul or
convolution defaults to TF32 (10-bit mantissa, unit roundoff 2**-11), on TPUs to one pass
of bfloat16 (7-bit mantissa), on CPUs to full float32. The tolerances below say how far
the results may move from float64 because of that, relative to the largest entry.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkmtl_jax as nm
from ntkmtl_jax import methods
from ntkmtl_jax.method import TaskStats
from ntkmtl_jax.testing import cases, references

from conftest import SEEDS, TanhMLP, assert_close, enable_x64

pytestmark = pytest.mark.default_precision

# Relative tolerances per backend. cpu: float32 rounding, and for MGDA the Frank-Wolfe
# solver's own stopping tolerance (seen with these seeds: 4e-7 for ntk_weights, 7e-5 for
# MGDA's direction, at most 2e-6 for the other methods).
# gpu: TF32; seen on an H200: 4e-4 for ntk_weights, 8e-5 for the solvers' directions.
# tpu: one bfloat16 pass per matmul (unit roundoff 2**-8); not yet measured, set from the
# mantissa width.
TOLERANCES = {
  "cpu": {"ntk_weights": 2e-4, "direction": 3e-4},
  "gpu": {"ntk_weights": 2e-3, "direction": 1e-3},
  "tpu": {"ntk_weights": 3e-2, "direction": 3e-2},
}
# Methods whose weights are chosen from the Gram matrix of the task gradients (or its
# diagonal): the Gram is a float32 matmul, the rest is k x k.
GRAM_BASED = tuple(
  n for n in methods.names() if methods.get(n, 2).needs.kind in ("gram", "sq_norms")
)
# SDMGrad's default iteration does not converge and turns rounding differences into
# different weights; small steps make it a contraction (as in test_methods_min_norm.py).
HPARAMS = {"sdmgrad": dict(learning_rate=0.05, momentum=0.0)}


def tolerance(what):
  return TOLERANCES.get(jax.default_backend(), TOLERANCES["gpu"])[what]


@pytest.fixture(autouse=True)
def backend_default_precision():
  # Explicitly the backend default, even where JAX_DEFAULT_MATMUL_PRECISION is set.
  with jax.default_matmul_precision("default"):
    yield


def test_gram_based_methods_are_found():
  assert {"mgda", "nash_mtl", "imtl_g", "cagrad", "ntkmtl", "upgrad"} <= set(GRAM_BASED)


@pytest.mark.parametrize("num_chunks", [1, 2])
def test_ntk_weights_at_default_precision(seed, num_chunks):
  rng = np.random.default_rng(seed)
  k = 4
  model = TanhMLP(
    rng, num_tasks=k, in_dim=32, hidden=64, batch=16, task_scales=rng.uniform(0.2, 5.0, k)
  )
  jac = model.numpy_chunk_jacobian(num_chunks)  # (k, n, P) float64
  blocks = np.einsum("iap,jbp->ijab", jac, jac)
  eigs = np.array([np.linalg.eigvalsh(blocks[i, i])[-1] for i in range(k)])
  expected = (eigs.sum() / eigs) ** 0.5
  out = jax.jit(
    lambda p, b: nm.ntk_weights(model.loss_fn, p, b, num_chunks=num_chunks, shared=model.shared)
  )(model.params, model.batch)
  assert_close(
    out.eigenvalues,
    eigs,
    rtol=tolerance("ntk_weights"),
    err_msg=f"{jax.default_backend()} seed={seed}",
  )
  assert_close(
    out.weights,
    expected,
    rtol=tolerance("ntk_weights"),
    err_msg=f"{jax.default_backend()} seed={seed}",
  )


@pytest.mark.parametrize("name", GRAM_BASED)
def test_gram_method_direction_at_default_precision(name):
  """The update from float32 task gradients == the same rule in float64: the Gram and the
  weighted sum in NumPy float64, the k x k weighting rule run with jax in float64."""
  k, p = 5, 2000
  agg = methods.get(name, k, **HPARAMS.get(name, {}))
  update_fn = jax.jit(agg.update)
  with enable_x64(True), jax.default_matmul_precision("highest"):
    agg64 = methods.get(name, k, **HPARAMS.get(name, {}))
    weights_fn = jax.jit(agg64.weights)
  for seed in SEEDS:  # in one test: each method compiles once
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(k, p)) * rng.uniform(0.2, 5.0, size=(k, 1))
    losses = rng.uniform(0.5, 2.0, k)
    key = jax.random.key(seed)
    update, _ = update_fn(
      {"w": jnp.asarray(jac, jnp.float32)},
      agg.init(None),
      losses=jnp.asarray(losses, jnp.float32),
      key=key,
    )
    gram = jac @ jac.T
    with enable_x64(True), jax.default_matmul_precision("highest"):
      stats = TaskStats(
        losses=jnp.asarray(losses),
        sq_norms=jnp.asarray(np.diag(gram)),
        gram=jnp.asarray(gram),
        key=key,
      )
      weights, _ = weights_fn(stats, agg64.init(None))
      weights = np.asarray(weights)
    assert weights.dtype == np.float64
    assert_close(
      update["w"],
      weights @ jac,
      rtol=tolerance("direction"),
      err_msg=f"{name} on {jax.default_backend()} seed={seed}",
    )


# --------------------------------------------------------------- the hard cases in float32

# What float32 task gradients get on the hard cases, against the float64 references
# (`ntkmtl_jax.testing`), as `relative_error` (relative to the answer, floored at 1e-6 of the
# largest gradient), on the families float32 can resolve: equal scales, scales 1 to 1e4,
# nearly collinear and duplicated tasks (k = 3 and 10, every seed). Seen on CPU with these
# seeds: at most 1e-5 for every method below but UPGrad and DualProj (1e-4: their ridge on a
# task 1e4 times smaller sits at float32's resolution of G / tr G), Aligned-MTL (7e-3: as
# the authors' code, it drops eigenvalues below k float32 eps of the largest, which is the
# rounding level of float32 eigenvalues), IMTL-G (7e-4) and ConFIG (3e-4 on nearly
# collinear tasks, whose cosine matrix is ill-conditioned). Nearly opposite tasks, a zero
# gradient and a hull through 0 leave a direction of 1e-3 of the gradients or less, which
# float32 does not resolve; they are checked in float64 only (tests/test_methods_solvers.py).
FLOAT32_TOLERANCE = {
  "upgrad": 5e-4,
  "dualproj": 5e-4,
  "aligned_mtl": 3e-2,
  "imtl_g": 3e-3,
  "config": 1e-3,
}
FLOAT32_DEFAULT = 5e-5
FLOAT32_FAMILIES = ("mild", "imbalanced", "near_collinear", "duplicated")


@pytest.mark.parametrize(
  "row", [r for r in references.REFERENCES if r not in references.NOT_EXACT + ("mgda_ub",)]
)
def test_solvers_on_hard_cases_in_float32(row):
  name, hparams = references.method_of(row)
  tolerance = FLOAT32_TOLERANCE.get(name, FLOAT32_DEFAULT)
  for k in (3, 10):
    method = methods.get(name, k, **hparams)
    update = jax.jit(method.update)
    for case in cases.hard_cases(FLOAT32_FAMILIES, (k,), SEEDS):
      expected = references.reference_direction(row, case)
      if expected is None:
        continue
      out, _ = update(
        {"w": jnp.asarray(case.jacobian, jnp.float32)},
        method.init(None),
        losses=jnp.asarray(case.losses, jnp.float32),
        key=jax.random.key(0),
      )
      error = cases.relative_error(np.asarray(out["w"], np.float64), expected, case.jacobian)
      assert error <= tolerance, f"{row} on {case.name}: {error:.1e} > {tolerance:.0e}"
