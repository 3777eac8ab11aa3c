"""Properties of multi-task methods, checked on hard cases: what every method must do, and
what each registered method claims (`ntkmtl_jax.methods.claims`).

    from ntkmtl_jax.testing import properties
    properties.check_claim("mgda", "non_conflicting")      # raises AssertionError if false
    properties.check_jit_matches_eager("mgda")
    for name in ntkmtl_jax.methods.names():
      for claim in ntkmtl_jax.methods.claims(name):
        properties.check_claim(name, claim)

In the manner of torchjd's aggregator tests. A method is run through its optax aggregator,
`method.update(task_grads, state, params, losses=..., key=...)`, on a sequence of steps
(stateful methods carry their state), with the task gradients J (k, P) of the hard cases
(`cases`: task scales 1 to 1e4, nearly collinear and nearly opposite gradients, duplicated
tasks), slightly perturbed from step to step. Claims are checked in float64, where they
hold to rounding; what every method must do (finite, jit equals eager, stable state) in
float32, what users run. Methods that need more than the task gradients get them from J:
the Gram matrix at the representation is J J^T (MGDA-UB) and the kernel eigenvalues are
the squared norms ||g_i||^2 (NTKMTL-SR, NTKMTL with chunks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntkmtl_jax import methods
from ntkmtl_jax.testing import cases as hard

# Families on which the claims are checked (a zero gradient or a hull through 0 leaves some
# methods without a unique answer; those go to `check_finite_on_degenerate`).
CLAIM_FAMILIES = ("mild", "imbalanced", "near_collinear", "near_opposite", "duplicated")
CLAIM_TASKS = (2, 3, 5)
STEPS = 3
# Relative tolerance of the float64 claims: solvers certify 1e-6 and reach about 1e-9.
RTOL = 1e-6


@dataclasses.dataclass(frozen=True)
class Trajectory:
  """What a method did over a sequence of steps (float64 NumPy).

  Attributes:
    directions: (T, P) the shared update at each step.
    weights: (T, k) the state's `weights` at each step.
    states: the state after each step.
  """

  directions: np.ndarray
  weights: np.ndarray
  states: list


def _extra_args(method, jac, losses, key):
  extra = dict(losses=losses, key=key)
  kind = method.needs.kind
  if kind == "representation_gram":
    extra["gram"] = jac @ jac.T
  elif kind in ("representation", "kernel"):
    extra["eigenvalues"] = jnp.sum(jac**2, axis=1)
  return extra


_BUILT: dict = {}


def method_of(name: str, num_tasks: int, hparams: dict | None = None):
  """(method, its jitted update), built once per name, k and hyper-parameters, so that a
  sequence of checks compiles each method once per shape."""
  key = (name, num_tasks, repr(sorted((hparams or {}).items())))
  if key not in _BUILT:
    method = methods.get(name, num_tasks, **(hparams or {}))
    _BUILT[key] = (method, jax.jit(method.update))
  return _BUILT[key]


def run(
  method,
  jacobians: np.ndarray,
  losses: np.ndarray,
  *,
  seed: int = 0,
  jit: bool = True,
  dtype=None,
  update=None,
) -> Trajectory:
  """Runs `method` on T steps of task gradients (T, k, P) and losses (T, k).

  The shared parameters are one leaf of P entries; the key of step t is
  `fold_in(key(seed), t)`, so that two runs see the same randomness. `update` is a
  jitted `method.update` to reuse (`method_of`).
  """
  dtype = dtype or (jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
  jacobians = np.asarray(jacobians)
  params = {"w": jnp.zeros(jacobians.shape[-1], dtype)}
  if update is None:
    update = jax.jit(method.update) if jit else method.update
  state = method.init(params)
  directions, weights, states = [], [], []
  for t, (jac, loss) in enumerate(zip(jacobians, losses)):
    jac = jnp.asarray(jac, dtype)
    key = jax.random.fold_in(jax.random.key(seed), t)
    out, state = update(
      {"w": jac}, state, params, **_extra_args(method, jac, jnp.asarray(loss, dtype), key)
    )
    directions.append(np.asarray(out["w"], np.float64))
    weights.append(np.asarray(state.weights, np.float64))
    states.append(state)
  return Trajectory(np.stack(directions), np.stack(weights), states)


def steps_of(case: hard.HardCase, steps: int = STEPS) -> tuple[np.ndarray, np.ndarray]:
  """T steps around a hard case: its Jacobian and losses, perturbed by 5 % (elementwise,
  relative) from step 2 on, so that stateful methods see changing inputs."""
  rng = np.random.default_rng([case.seed, case.num_tasks, 7])
  jacs = [case.jacobian] + [
    case.jacobian * (1 + 0.05 * rng.normal(size=case.jacobian.shape)) for _ in range(steps - 1)
  ]
  losses = [case.losses] + [
    case.losses * rng.uniform(0.9, 1.1, case.num_tasks) for _ in range(steps - 1)
  ]
  return np.stack(jacs), np.stack(losses)


def claim_cases(seeds: Sequence[int] = (0, 1)) -> list[hard.HardCase]:
  """The hard cases the claims are checked on."""
  return list(hard.hard_cases(CLAIM_FAMILIES, CLAIM_TASKS, seeds))


def _floor(jacobians):
  return 1e-6 * float(np.max(np.linalg.norm(jacobians, axis=-1)))


def _assert_close(actual, desired, scale_of, what, rtol=RTOL):
  """||a - d|| <= rtol max(||d||, floor) per step (the `relative_error` measure)."""
  for t, (a, d) in enumerate(zip(actual, desired)):
    scale = max(float(np.linalg.norm(d)), scale_of)
    error = float(np.linalg.norm(a - d)) / max(scale, np.finfo(float).tiny)
    assert error <= rtol, f"{what}, step {t}: relative difference {error:.2e} > {rtol:.0e}"


def _enable_x64():
  """64-bit numbers on, with `jax.enable_x64` or, on older jax, its experimental twin."""
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64

  return enable_x64(True)


def _x64(fn):
  def wrapped(*args, **kwargs):
    with _enable_x64():
      return fn(*args, **kwargs)

  wrapped.__name__ = fn.__name__
  wrapped.__doc__ = fn.__doc__
  return wrapped


# ---------------------------------------------------------------------------- the claims


def _run(name, hparams, jacs, losses):
  method, update = method_of(name, jacs.shape[1], hparams)
  return run(method, jacs, losses, update=update)


def _solved(trajectory) -> bool:
  """Whether every step's solver converged (a method that reports a failure, e.g. Nash-MTL
  where no solution exists or IMTL-G on a singular system, has no answer to check)."""
  return all(int(getattr(s, "solver_failures", 0)) == 0 for s in trajectory.states)


# Loss scale factors of the scale checks, on top of the cases' own spread of 1e4 (NTKMTL floors
# an eigenvalue below 1e-12 of their sum, i.e. a gradient 1e6 smaller than the others).
SCALE_FACTORS = (0.1, 10.0)


@_x64
def check_permutation_equivariant(name: str, hparams: dict, case: hard.HardCase) -> None:
  """Permuting the tasks permutes the weights and leaves the update unchanged."""
  k = case.num_tasks
  jacs, losses = steps_of(case)
  perm = np.random.default_rng(case.seed).permutation(k)
  base = _run(name, hparams, jacs, losses)
  if not _solved(base):
    return
  permuted = _run(name, hparams, jacs[:, perm], losses[:, perm])
  _assert_close(permuted.directions, base.directions, _floor(jacs), f"{name} on {case.name}")
  if case.family != "duplicated":  # duplicated tasks may share their weight in any way
    scale = float(np.max(np.abs(base.weights)))
    _assert_close(
      permuted.weights, base.weights[:, perm], 1e-6 * scale, f"{name}'s weights on {case.name}"
    )


def _scaled(jacs, losses, task, factor):
  jacs, losses = jacs.copy(), losses.copy()
  jacs[:, task] *= factor
  losses[:, task] *= factor
  return jacs, losses


def _check_scalings(name, hparams, case, view, what):
  """`view` of the update (the update itself, or its direction) is the same whatever one
  task's loss scale, for every task and every factor of `SCALE_FACTORS`."""
  jacs, losses = steps_of(case)
  base = _run(name, hparams, jacs, losses)
  if not _solved(base):
    return
  floor = _floor(jacs) if what == "update" else 1e-300
  for task in range(case.num_tasks):
    for factor in SCALE_FACTORS:
      other = _run(name, hparams, *_scaled(jacs, losses, task, factor))
      _assert_close(
        view(other.directions),
        view(base.directions),
        floor,
        f"{name}'s {what} on {case.name}, task {task} x {factor:g}",
      )


@_x64
def check_scale_invariant(name: str, hparams: dict, case: hard.HardCase) -> None:
  """Scaling any one task's loss (and gradient) by 0.1 or 10 leaves the update unchanged
  (which implies `check_direction_scale_invariant`)."""
  _check_scalings(name, hparams, case, lambda d: d, "update")


@_x64
def check_direction_scale_invariant(name: str, hparams: dict, case: hard.HardCase) -> None:
  """Scaling any one task's loss (and gradient) leaves the update's direction unchanged."""
  unit = lambda d: d / np.maximum(np.linalg.norm(d, axis=-1, keepdims=True), 1e-300)
  _check_scalings(name, hparams, case, unit, "direction")


@_x64
def check_linear_under_scaling(name: str, hparams: dict, case: hard.HardCase) -> None:
  """d(diag(a c1 + b c2) J) = a d(diag(c1) J) + b d(diag(c2) J) for c1, c2 > 0, a, b >= 0."""
  k = case.num_tasks
  rng = np.random.default_rng([case.seed, 11])
  jacs, losses = steps_of(case)
  c1, c2 = rng.uniform(0.1, 10.0, k), rng.uniform(0.1, 10.0, k)
  a, b = rng.uniform(0.1, 2.0, 2)

  def direction(c):
    return _run(name, hparams, jacs * c[None, :, None], losses * c).directions

  combined = direction(a * c1 + b * c2)
  _assert_close(
    combined, a * direction(c1) + b * direction(c2), _floor(jacs) * 10, f"{name} on {case.name}"
  )


@_x64
def check_non_conflicting(name: str, hparams: dict, case: hard.HardCase) -> None:
  """<d, g_i> >= 0 for every task, up to rounding (1e-9 of ||d|| ||g_i||)."""
  jacs, losses = steps_of(case)
  out = _run(name, hparams, jacs, losses)
  if not _solved(out):
    return
  for t, (jac, d) in enumerate(zip(jacs, out.directions)):
    products = jac @ d
    slack = 1e-9 * np.linalg.norm(jac, axis=1) * np.linalg.norm(d)
    assert np.all(products >= -slack), (
      f"{name} on {case.name}, step {t}: <d, g_i> = {products} conflicts"
    )


CHECKS = {
  "permutation_equivariant": check_permutation_equivariant,
  "scale_invariant": check_scale_invariant,
  "direction_scale_invariant": check_direction_scale_invariant,
  "linear_under_scaling": check_linear_under_scaling,
  "non_conflicting": check_non_conflicting,
}


def check_claim(name: str, claim: str, cases: Sequence[hard.HardCase] | None = None) -> None:
  """Checks that method `name` has property `claim` on every case (default `claim_cases`)."""
  hparams = methods.claims(name).get(claim, {})
  for case in claim_cases() if cases is None else cases:
    CHECKS[claim](name, hparams, case)


def claims_table() -> str:
  """The registry's claims as a markdown table (docs/methods/index.md holds it; a test
  checks that it is this one)."""
  short = {
    "permutation_equivariant": "permutation",
    "scale_invariant": "scale",
    "direction_scale_invariant": "direction under scale",
    "linear_under_scaling": "linear",
    "non_conflicting": "non-conflicting",
  }
  lines = [
    "| method | " + " | ".join(short[p] for p in methods.PROPERTIES) + " |",
    "|---|" + "---|" * len(methods.PROPERTIES),
  ]
  for name in methods.names():
    claimed = methods.claims(name)
    cells = []
    for prop in methods.PROPERTIES:
      if prop not in claimed:
        cells.append("")
        continue
      under = ", ".join(f"{k}={v}" for k, v in claimed[prop].items())
      cells.append(f"yes ({under})" if under else "yes")
    lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
  return "\n".join(lines)


# ---------------------------------------------------------------- what every method must do


def degenerate_inputs(num_tasks: int, dim: int = 20) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Task gradients (k, P) and losses on which no method may return a non-finite update:
  one zero gradient, all tasks identical, two exactly opposite gradients, every gradient
  zero (a stationary point)."""
  rng = np.random.default_rng(num_tasks)
  jac = rng.normal(size=(num_tasks, dim)) * hard.task_scales(rng, num_tasks)[:, None]
  losses = rng.uniform(0.5, 2.0, num_tasks)
  zero = jac.copy()
  zero[0] = 0.0
  identical = np.repeat(jac[:1], num_tasks, axis=0)
  opposite = jac.copy()
  if num_tasks > 1:
    opposite[1] = -opposite[0]
  out = {"zero_gradient": zero, "identical": identical, "all_zero": np.zeros_like(jac)}
  if num_tasks > 1:
    out["opposite"] = opposite
  return {name: (j, losses) for name, j in out.items()}


def _finite(tree) -> bool:
  return all(
    bool(np.all(np.isfinite(np.asarray(x))))
    for x in jax.tree.leaves(tree)
    if jnp.issubdtype(np.asarray(x).dtype, jnp.inexact)
  )


def check_finite_on_degenerate(name: str, num_tasks: int) -> None:
  """Finite updates and states on `degenerate_inputs`, over three steps, in float32."""
  method, update = method_of(name, num_tasks)
  for what, (jac, losses) in degenerate_inputs(num_tasks).items():
    out = run(
      method,
      np.repeat(jac[None], STEPS, 0),
      np.repeat(losses[None], STEPS, 0),
      dtype=jnp.float32,
      update=update,
    )
    assert np.all(np.isfinite(out.directions)), f"{name}, {what}: non-finite update"
    for t, state in enumerate(out.states):
      assert _finite(state), f"{name}, {what}, step {t}: non-finite state {state}"


def _signature(state) -> Any:
  return jax.tree.map(lambda x: (np.shape(x), jnp.result_type(x)), state)


def check_state_stable(name: str, num_tasks: int = 3) -> None:
  """The state keeps its tree structure, shapes and dtypes from `init` through updates (so
  that it can live in `lax.scan` carries and checkpoints), in float32."""
  method, update = method_of(name, num_tasks)
  case = hard.make_case("imbalanced", max(num_tasks, 2), 0, dim=20)
  jacs, losses = steps_of(case)
  jacs, losses = jacs[:, :num_tasks], losses[:, :num_tasks]
  params = {"w": jnp.zeros(jacs.shape[-1], jnp.float32)}
  initial = _signature(method.init(params))
  out = run(method, jacs, losses, dtype=jnp.float32, update=update)
  for t, state in enumerate(out.states):
    got = _signature(state)
    assert jax.tree.structure(got) == jax.tree.structure(initial), (
      f"{name}, step {t}: state structure changed"
    )
    assert got == initial, f"{name}, step {t}: state {got} differs from init's {initial}"


def check_jit_matches_eager(name: str, num_tasks: int = 3) -> None:
  """The jitted and the eager update agree on an imbalanced case (float32, 1e-5)."""
  case = hard.make_case("imbalanced", num_tasks, 0, dim=20)
  jacs, losses = steps_of(case, steps=1)
  method, update = method_of(name, num_tasks)
  jitted = run(method, jacs, losses, dtype=jnp.float32, update=update)
  eager = run(method, jacs, losses, jit=False, dtype=jnp.float32)
  floor = 1e-5 * float(np.max(np.abs(eager.directions)))
  np.testing.assert_allclose(
    jitted.directions,
    eager.directions,
    rtol=1e-5,
    atol=floor,
    err_msg=f"{name}: jit and eager updates differ",
  )
  np.testing.assert_allclose(
    jitted.weights,
    eager.weights,
    rtol=1e-5,
    atol=1e-6 * float(np.max(np.abs(eager.weights))),
    err_msg=f"{name}: jit and eager weights differ",
  )
