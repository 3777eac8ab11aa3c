"""The registry of multi-task methods: every one a `Weighting` or a `GradientRule`.

    agg = ntkmtl_jax.methods.get("ntkmtl", num_tasks=3, exponent=0.5)
    ntkmtl_jax.methods.names()  # every registered name

Each entry is a factory `factory(num_tasks, **hparams) -> Weighting | GradientRule` whose
keyword defaults are the published hyper-parameters, registered with the properties the
method claims (`PROPERTIES`); `ntkmtl_jax.testing.properties` checks every claim of every
registered method, and the properties every method must have, on hard cases.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

from ntkmtl_jax._names import canonical
from ntkmtl_jax.method import Method

_REGISTRY: dict[str, Callable[..., Method]] = {}
_CLAIMS: dict[str, dict[str, dict]] = {}

# What a method may claim of its update d(J, losses) (J the task gradients, one per row).
PROPERTIES = {
    "permutation_equivariant":
        "permuting the tasks (and their losses) permutes the weights and leaves the update "
        "unchanged",
    "scale_invariant":
        "multiplying one task's loss, and so its gradient, by c > 0 leaves the update "
        "unchanged",
    "direction_scale_invariant":
        "multiplying one task's loss, and so its gradient, by c > 0 leaves the update's "
        "direction unchanged (its length may change)",
    "linear_under_scaling":
        "the update of diag(c) J is linear in c >= 0: d(diag(a c1 + b c2) J) = "
        "a d(diag(c1) J) + b d(diag(c2) J)",
    "non_conflicting":
        "the update conflicts with no task: <d, g_i> >= 0 for every i",
}


def register(name: str, factory: Callable[..., Method] | None = None, *,
             properties: tuple[str, ...] | dict[str, dict] = ()):
  """Registers `factory` under `name` (usable as a decorator).

  Args:
    name: the registry name.
    factory: `factory(num_tasks, **hparams) -> Method`; omit to use as a decorator.
    properties: the `PROPERTIES` the method claims: names, or a dict from name to the
      hyper-parameters under which the claim is exact (e.g. a vanishing ridge,
      `{"non_conflicting": {"reg_eps": 1e-10}}`); the defaults otherwise.
  """
  claims = dict(properties) if isinstance(properties, dict) else {p: {} for p in properties}
  unknown = [p for p in claims if p not in PROPERTIES]
  if unknown:
    raise ValueError(f"{name}: unknown properties {unknown}; known: {list(PROPERTIES)}.")

  def do(f):
    if name in _REGISTRY and _REGISTRY[name] is not f:
      raise ValueError(f"A method named {name!r} is already registered.")
    _REGISTRY[name] = f
    _CLAIMS[name] = claims
    return f

  return do if factory is None else do(factory)


def claims(name: str) -> dict[str, dict]:
  """The properties method `name` claims, each with the hyper-parameters it holds under."""
  return dict(_CLAIMS[canonical(name)])


def names() -> list[str]:
  """Registered method names, sorted."""
  return sorted(_REGISTRY)


def get(name: str, num_tasks: int, **hparams) -> Method:
  """Builds the method `name` for `num_tasks` tasks with the given hyper-parameters."""
  key = canonical(name)
  if key not in _REGISTRY:
    raise ValueError(f"Unknown method {name!r}. Known methods: {', '.join(names())}.")
  factory = _REGISTRY[key]
  params = inspect.signature(factory).parameters
  unknown = [h for h in hparams if h not in params]
  if unknown and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
    raise ValueError(f"Method {name!r} has no hyper-parameter(s) {unknown}; it takes "
                     f"{[p for p in params if p != 'num_tasks']}.")
  for hp, value in hparams.items():
    values = value if isinstance(value, (list, tuple)) else [value]
    if any(isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v)
           for v in values):
      raise ValueError(f"Method {name!r}: hyper-parameter {hp}={value!r} must be finite.")
  return factory(num_tasks, **hparams)


def defaults(name: str) -> dict:
  """The published default hyper-parameters of a method."""
  factory = _REGISTRY[canonical(name)]
  return {p.name: p.default for p in inspect.signature(factory).parameters.values()
          if p.default is not inspect.Parameter.empty}


# Registration happens on import of the method families.
from ntkmtl_jax.methods import loss_weighting as _loss_weighting  # noqa: E402,F401
from ntkmtl_jax.methods import ntkmtl as _ntkmtl  # noqa: E402,F401
from ntkmtl_jax.methods import gradient_magnitude as _gradient_magnitude  # noqa: E402,F401
from ntkmtl_jax.methods import min_norm as _min_norm  # noqa: E402,F401
from ntkmtl_jax.methods import fair_allocation as _fair_allocation  # noqa: E402,F401
from ntkmtl_jax.methods import dual_cone as _dual_cone  # noqa: E402,F401
from ntkmtl_jax.methods import alignment as _alignment  # noqa: E402,F401
from ntkmtl_jax.methods import conflict as _conflict  # noqa: E402,F401
from ntkmtl_jax.methods import robust as _robust  # noqa: E402,F401
from ntkmtl_jax.methods import composite as _composite  # noqa: E402,F401
from ntkmtl_jax.methods import excess_risk as _excess_risk  # noqa: E402,F401
from ntkmtl_jax.methods import weighted_allocation as _weighted_allocation  # noqa: E402,F401
from ntkmtl_jax.methods import stochastic as _stochastic  # noqa: E402,F401
