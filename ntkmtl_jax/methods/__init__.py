"""The registry of multi-task methods: every one a `Weighting` or a `GradientRule`.

    agg = ntkmtl_jax.methods.get("ntkmtl", num_tasks=3, exponent=0.5)
    ntkmtl_jax.methods.names()  # every registered name

Each entry is a factory `factory(num_tasks, **hparams) -> Weighting | GradientRule` whose
keyword defaults are the published hyper-parameters.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

from ntkmtl_jax.weighting import Method

_REGISTRY: dict[str, Callable[..., Method]] = {}


def register(name: str, factory: Callable[..., Method] | None = None):
  """Registers `factory` under `name` (usable as a decorator)."""

  def do(f):
    if name in _REGISTRY and _REGISTRY[name] is not f:
      raise ValueError(f"A method named {name!r} is already registered.")
    _REGISTRY[name] = f
    return f

  return do if factory is None else do(factory)


def names() -> list[str]:
  """Registered method names, sorted."""
  return sorted(_REGISTRY)


def get(name: str, num_tasks: int, **hparams) -> Method:
  """Builds the method `name` for `num_tasks` tasks with the given hyper-parameters."""
  key = name.lower().replace("-", "_")
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
  factory = _REGISTRY[name.lower().replace("-", "_")]
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
