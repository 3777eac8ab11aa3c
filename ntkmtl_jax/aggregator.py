"""The shape every multi-task method takes: an optax Aggregator that knows what it needs.

A multi-task method turns per-task information (losses, the Gram matrix of the task
gradients, kernel eigenvalues, or the task gradients themselves) into one update. Each
method here is a `TaskAggregator`: an `optax.experimental.aggregating.Aggregator` whose
`update` takes the task gradients stacked on axis 0 (leading axis = tasks) and returns one
update with the structure of the parameters, so it composes in `optax.chain`. Extra
information rides along as keyword arguments (`losses=`, `eigenvalues=`, `gram=`, `key=`).

It also carries, as attributes, what the train step needs to know to build only what the
method uses:

- `needs`: "losses" (one backward pass), "sq_norms" (the diagonal of the task Gram),
  "gram" (the k x k Gram of the shared task gradients), "gradients" (the stacked task
  gradients themselves), "kernel" (the extended NTK over `num_chunks` chunks), or
  "representation" (the NTK at the shared representation, NTKMTL-SR).
- `weighting`: for methods whose update is a weighted sum of task gradients, the pure rule
  `weighting(stats, state) -> (weights, new_state)`; the step can then compute the weights
  from cheap statistics and run one weighted backward pass instead of holding k gradients.
- `head_gradients`: "sum" (task-specific parameters get the plain sum of task gradients,
  as the official NTKMTL step does) or "weighted" (they get the weighted sum, as the
  backward pass of a weighted loss gives).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from optax.experimental import aggregating

from ntkmtl_jax import _tree
from ntkmtl_jax._tree import PyTree, SharedSpec

NEEDS = ("losses", "sq_norms", "gram", "gradients", "kernel", "representation")
HEAD_GRADIENTS = ("sum", "weighted")


class TaskStats(NamedTuple):
  """Per-task statistics a weighting rule may read; fields a method does not need are None.

  Attributes:
    losses: (k,) task losses on the batch.
    sq_norms: (k,) squared norms of the shared task gradients.
    gram: (k, k) Gram matrix of the shared task gradients.
    eigenvalues: (k,) largest eigenvalue of each task's NTK block.
    key: a PRNG key for stochastic methods.
  """
  losses: jax.Array | None = None
  sq_norms: jax.Array | None = None
  gram: jax.Array | None = None
  eigenvalues: jax.Array | None = None
  key: jax.Array | None = None


Weighting = Callable[[TaskStats, Any], tuple[jax.Array, Any]]


class TaskAggregator(aggregating.Aggregator):
  """An optax Aggregator for k task gradients, with what the train step needs to know.

  Build one with `weighted_aggregator` or `gradient_aggregator`; see the module docstring.
  """

  name: str
  needs: str
  weighting: Weighting | None
  shared: SharedSpec
  head_gradients: str
  num_chunks: int
  options: dict


def _annotate(agg: TaskAggregator, **attrs) -> TaskAggregator:
  for key, value in attrs.items():
    object.__setattr__(agg, key, value)
  return agg


def combine(task_grads: PyTree, weights: jax.Array, mask: PyTree,
            head_gradients: str = "sum") -> PyTree:
  """sum_i w_i g_i on shared leaves; on the others the plain or weighted sum over tasks."""

  def leaf(m, g):
    w = weights if (m or head_gradients == "weighted") else jnp.ones_like(weights)
    return jnp.tensordot(w.astype(g.dtype), g, axes=1)

  return jax.tree.map(leaf, mask, task_grads)


def _mask_for(shared: SharedSpec, task_grads: PyTree, params: PyTree | None) -> PyTree:
  like = params if params is not None else jax.tree.map(lambda g: g[0], task_grads)
  return _tree.resolve_mask(shared, like)


def _num_tasks(task_grads: PyTree) -> int:
  leaves = jax.tree.leaves(task_grads)
  if not leaves:
    raise ValueError("The task gradients are empty.")
  k = leaves[0].shape[0] if leaves[0].ndim else None
  if k is None or any(x.ndim == 0 or x.shape[0] != k for x in leaves):
    raise ValueError("Task gradients must be stacked on a leading task axis shared by "
                     f"every leaf; got shapes {[x.shape for x in leaves]}.")
  return k


def stats_from_gradients(needs: str, task_grads: PyTree, mask: PyTree, *,
                         losses=None, gram=None, sq_norms=None, eigenvalues=None,
                         key=None) -> TaskStats:
  """The statistics a method needs, from stacked task gradients unless already given."""
  if needs == "gram" and gram is None:
    gram = _tree.stacked_gram(task_grads, mask)
  if needs == "sq_norms" and sq_norms is None:
    sq_norms = (jnp.diagonal(gram) if gram is not None else
                sum(jnp.sum(x.reshape(x.shape[0], -1) ** 2, axis=1)
                    for x in _tree.masked_leaves(task_grads, mask)))
  return TaskStats(losses=losses, sq_norms=sq_norms, gram=gram, eigenvalues=eigenvalues,
                   key=key)


def weighted_aggregator(name: str, needs: str, weighting: Weighting, init: Callable, *,
                        shared: SharedSpec = None, head_gradients: str = "weighted",
                        num_chunks: int = 1, **options) -> TaskAggregator:
  """A method whose update is sum_i w_i g_i with weights from `weighting(stats, state)`.

  Args:
    name: the method's registry name.
    needs: what the weights are computed from (see the module docstring).
    weighting: `weighting(TaskStats, state) -> (weights (k,), new_state)`, pure.
    init: `init(params) -> state`.
    shared: which parameters are shared (None: all).
    head_gradients: "sum" or "weighted", for the non-shared parameters.
    num_chunks: chunks of the batch for "kernel" and "representation" methods.
    **options: recorded for reports.
  """
  if needs not in NEEDS:
    raise ValueError(f"Unknown needs {needs!r}: one of {NEEDS}.")
  if head_gradients not in HEAD_GRADIENTS:
    raise ValueError(f"head_gradients must be one of {HEAD_GRADIENTS}, got {head_gradients!r}.")

  def update_fn(task_grads, state, params=None, *, losses=None, gram=None, sq_norms=None,
                eigenvalues=None, key=None, **unused_extra_args):
    k = _num_tasks(task_grads)
    mask = _mask_for(shared, task_grads, params)
    if needs in ("kernel", "representation") and eigenvalues is None:
      raise ValueError(
          f"{name} with needs={needs!r} takes the kernel eigenvalues as an extra argument: "
          "update(task_grads, state, params, eigenvalues=ntk_weights(...).eigenvalues).")
    if needs == "losses" and losses is None:
      raise ValueError(f"{name} computes its weights from the task losses: pass them as "
                       "update(task_grads, state, params, losses=losses).")
    stats = stats_from_gradients(needs, task_grads, mask, losses=losses, gram=gram,
                                 sq_norms=sq_norms, eigenvalues=eigenvalues, key=key)
    weights, new_state = weighting(stats, state)
    if weights.shape != (k,):
      raise ValueError(f"{name}: weights of shape {weights.shape} for {k} tasks.")
    return combine(task_grads, weights, mask, head_gradients), new_state

  agg = TaskAggregator(init, update_fn)
  return _annotate(agg, name=name, needs=needs, weighting=weighting, shared=shared,
                   head_gradients=head_gradients, num_chunks=num_chunks, options=options)


def gradient_aggregator(name: str, init: Callable, aggregate: Callable, *,
                        shared: SharedSpec = None, head_gradients: str = "sum",
                        **options) -> TaskAggregator:
  """A method that needs the task gradients themselves (not only their Gram).

  `aggregate(shared_matrix (k, P), state, stats) -> (direction (P,), weights (k,), new_state)`
  runs on the flattened shared task gradients; non-shared parameters get the plain sum of
  task gradients ("sum") or the weighted sum with the returned weights ("weighted").
  """

  def update_fn(task_grads, state, params=None, *, losses=None, key=None, **unused_extra_args):
    _num_tasks(task_grads)
    mask = _mask_for(shared, task_grads, params)
    matrix = _tree.stacked_matrix(task_grads, mask)
    direction, weights, new_state = aggregate(matrix, state,
                                              TaskStats(losses=losses, key=key))
    shared_leaves = _tree.masked_leaves(task_grads, mask)
    sizes = [x[0].size for x in shared_leaves]
    pieces = jnp.split(direction, np.cumsum(sizes)[:-1].tolist())
    it = iter(p.reshape(x.shape[1:]).astype(x.dtype) for p, x in zip(pieces, shared_leaves))
    w = weights if head_gradients == "weighted" else jnp.ones_like(weights)
    return jax.tree.map(lambda m, g: next(it) if m else jnp.tensordot(w.astype(g.dtype), g, 1),
                        mask, task_grads), new_state

  agg = TaskAggregator(init, update_fn)
  return _annotate(agg, name=name, needs="gradients", weighting=None, shared=shared,
                   head_gradients=head_gradients, num_chunks=1, options=options)
