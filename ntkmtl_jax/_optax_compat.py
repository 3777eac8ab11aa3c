"""What ntkmtl-jax takes from optax releases newer than its floor (optax 0.2.5).

`Aggregator` is `optax.experimental.aggregating.Aggregator` where optax has it (0.2.7 and
later); on older optax it is this module's class of the same shape: a
`GradientTransformationExtraArgs` subclass with nothing added, as optax's is. Requiring the
newer optax for one empty subclass would make pip replace a user's installed optax.
"""

from __future__ import annotations

import optax


class Aggregator(optax.GradientTransformationExtraArgs):
  """A pair of pure functions that turn per-task gradients into one update.

  The same shape as `optax.experimental.aggregating.Aggregator` (optax >= 0.2.7): `init(params)
  -> state`, and `update(per_task_grads, state, params=None, **extra_args) -> (update, state)`,
  where the gradients are stacked on a leading axis and the update has the parameters'
  structure.
  """


# This module's class under its own name too, so that tests can compare it with optax's.
LocalAggregator = Aggregator

try:  # optax >= 0.2.7 (`aggregating` is an attribute there, not an importable submodule)
  from optax.experimental import aggregating
except ImportError:  # older optax: the class above
  pass
else:
  Aggregator = aggregating.Aggregator
