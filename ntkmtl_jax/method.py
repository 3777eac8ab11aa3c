"""The shape of every multi-task method: what it needs, and the rule that turns it into one update.

A multi-task method turns per-task information into one update of the parameters. Two
kinds cover every method in the library (torchjd's Weighting -> Aggregator split):

- `Weighting`: the update is `sum_i w_i g_i`, with weights from a pure rule
  `weights(stats, state) -> (w (k,), new_state)` over cheap statistics (losses, squared
  norms, the Gram matrix of the task gradients, kernel eigenvalues). The train step can
  then compute only those statistics and run one weighted backward pass.
- `GradientRule`: the update is built from the (k, P) matrix of the shared task gradients
  themselves (PCGrad-style projections coordinate by coordinate, GradDrop, ...).

Each carries a typed `Needs` record that says what the train step must compute for it, and
nothing the step reads hides anywhere else. Both derive a plain optax
`optax.experimental.aggregating.Aggregator` (`method.aggregator`): its `update` takes the
task gradients stacked on axis 0 (leading axis = tasks) and returns one update with the
parameters' structure, so it composes in `optax.chain`. Extra information rides along as
keyword arguments (`losses=`, `eigenvalues=`, `gram=`, `key=`). For convenience a method's
own `init`/`update` are that aggregator's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ntkmtl_jax import _tree
from ntkmtl_jax._optax_compat import Aggregator  # optax's, or the same shape on optax < 0.2.7
from ntkmtl_jax._tree import PyTree, SharedSpec

# What a method's update is computed from (see `Needs`).
KINDS = ("losses", "sq_norms", "gram", "gradients", "kernel", "representation",
         "representation_gram")
HEAD_GRADIENTS = ("sum", "weighted")
EIGEN_METHODS = ("auto", "eigh", "power")
# What is read off each task's kernel block spectrum; see `kernel.spectrum_statistic`.
STATISTICS = ("max", "trace", "top_r", "effective_rank")


class TaskStats(NamedTuple):
  """Per-task statistics a weighting rule may read; fields a method does not need are None.

  Attributes:
    losses: (k,) task losses on the batch.
    sq_norms: (k,) squared norms of the shared task gradients.
    gram: (k, k) Gram matrix of the shared task gradients (for "representation_gram", of
      the task gradients with respect to the shared representation).
    eigenvalues: (k,) largest eigenvalue (or another `Needs.statistic`) of each task's
      NTK block.
    key: a PRNG key for stochastic methods.
  """
  losses: jax.Array | None = None
  sq_norms: jax.Array | None = None
  gram: jax.Array | None = None
  eigenvalues: jax.Array | None = None
  key: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Needs:
  """What the train step computes for a method, and how.

  Attributes:
    kind: "losses" (the task losses; one backward pass), "sq_norms" (squared norms of the
      shared task gradients), "gram" (their k x k Gram matrix), "gradients" (the stacked
      shared task gradients), "kernel" (the largest eigenvalue of each task's extended-NTK
      block over `num_chunks` chunks of the batch), "representation" (the same at the
      shared representation z, NTKMTL-SR) or "representation_gram" (the Gram of the task
      gradients with respect to z, MGDA-UB).
    num_chunks: n, the chunks of the batch for "kernel" and "representation".
    eigen_method: "auto", "eigh" or "power", for the kernel blocks.
    statistic: what is read off each block's spectrum: "max" (the paper), "trace",
      "top_r" or "effective_rank" (see `kernel.spectrum_statistic`).
    top_r: r for statistic="top_r".
    power_iterations: iterations of the power method.
  """
  kind: str
  num_chunks: int = 1
  eigen_method: str = "auto"
  statistic: str = "max"
  top_r: int = 3
  power_iterations: int = 64

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Unknown needs kind {self.kind!r}: one of {KINDS}.")
    if isinstance(self.num_chunks, bool) or int(self.num_chunks) != self.num_chunks or \
        self.num_chunks < 1:
      raise ValueError(f"num_chunks must be a positive integer, got {self.num_chunks!r}.")
    if self.num_chunks > 1 and self.kind not in ("kernel", "representation"):
      raise ValueError(f"num_chunks={self.num_chunks} only applies to the 'kernel' and "
                       f"'representation' kinds, not {self.kind!r}.")
    if self.eigen_method not in EIGEN_METHODS:
      raise ValueError(f"Unknown eigen method {self.eigen_method!r}: choose one of "
                       f"{EIGEN_METHODS}.")
    check_statistic(self.statistic, self.top_r, self.eigen_method)
    if int(self.power_iterations) != self.power_iterations or self.power_iterations < 1:
      raise ValueError("power_iterations must be a positive integer, got "
                       f"{self.power_iterations!r}.")

  @property
  def task_gradients(self) -> bool:
    """Whether the step runs a backward pass per task (and chunk) over the shared parameters."""
    return self.kind in ("sq_norms", "gram", "gradients", "kernel")

  @property
  def uses_representation(self) -> bool:
    """Whether the step needs the model split into `encode` and `decode`."""
    return self.kind in ("representation", "representation_gram")


def check_statistic(statistic: str, top_r: int, eigen_method: str) -> None:
  """Raises a ValueError naming the fix for an unknown or inapplicable spectrum statistic."""
  if statistic not in STATISTICS:
    raise ValueError(f"Unknown statistic {statistic!r}: choose one of {STATISTICS}.")
  if statistic == "top_r" and (isinstance(top_r, bool) or int(top_r) != top_r or top_r < 1):
    raise ValueError(f"top_r must be a positive integer, got {top_r!r}.")
  if eigen_method == "power" and statistic in ("top_r", "effective_rank"):
    raise ValueError(f"statistic={statistic!r} needs the whole spectrum of each block, which "
                     "the power method does not give: use eigen_method='auto' or 'eigh'.")


def combine(task_grads: PyTree, weights: jax.Array, mask: PyTree,
            head_gradients: str = "sum") -> PyTree:
  """sum_i w_i g_i on shared leaves; on the others the plain or weighted sum over tasks."""

  def leaf(m, g):
    w = weights if (m or head_gradients == "weighted") else jnp.ones_like(weights)
    return jnp.tensordot(w.astype(g.dtype), g, axes=1)

  return jax.tree.map(leaf, mask, task_grads)


def num_tasks_of(task_grads: PyTree) -> int:
  """k, the leading axis shared by every leaf of stacked task gradients."""
  leaves = jax.tree.leaves(task_grads)
  if not leaves:
    raise ValueError("The task gradients are empty.")
  k = leaves[0].shape[0] if leaves[0].ndim else None
  if k is None or any(x.ndim == 0 or x.shape[0] != k for x in leaves):
    raise ValueError("Task gradients must be stacked on a leading task axis shared by "
                     f"every leaf; got shapes {[x.shape for x in leaves]}.")
  return k


def stats_from_gradients(kind: str, task_grads: PyTree, mask: PyTree, **given) -> TaskStats:
  """The statistics a method of `kind` reads, from stacked task gradients unless given."""
  stats = TaskStats(**given)
  if kind == "gram" and stats.gram is None:
    stats = stats._replace(gram=_tree.stacked_gram(task_grads, mask))
  if kind == "sq_norms" and stats.sq_norms is None:
    stats = stats._replace(sq_norms=(
        jnp.diagonal(stats.gram) if stats.gram is not None else
        sum(jnp.sum(x.reshape(x.shape[0], -1) ** 2, axis=1)
            for x in _tree.masked_leaves(task_grads, mask))))
  return stats


def check_weights(name: str, weights: jax.Array, num_tasks: int) -> None:
  if weights.shape != (num_tasks,):
    raise ValueError(f"{name}: weights of shape {weights.shape} for {num_tasks} tasks.")


_EXTRA_ARG = {"losses": "losses", "kernel": "eigenvalues", "representation": "eigenvalues",
              "representation_gram": "gram"}


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class Weighting:
  """A method whose update is sum_i w_i g_i, with the weights from `weights(stats, state)`.

  Attributes:
    name: the method's registry name.
    needs: what the weights are computed from (`Needs`).
    init: `init(params) -> state`.
    weights: `weights(TaskStats, state) -> (weights (k,), new_state)`, pure and jittable.
    shared: which parameters are shared: None (all), a pytree of bools or a function of
      the parameters.
    head_gradients: what the non-shared parameters get: "weighted" (sum_i w_i g_i, the
      backward pass of the weighted loss) or "sum" (the plain sum of task gradients).
    hparams: the hyper-parameters the method was built with, for reports; nothing reads it.
  """
  name: str
  needs: Needs
  init: Callable[[PyTree], Any]
  weights: Callable[[TaskStats, Any], tuple[jax.Array, Any]]
  shared: SharedSpec = None
  head_gradients: str = "weighted"
  hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    _check_common(self)

  def update(self, task_grads: PyTree, state: Any, params: PyTree | None = None, *,
             losses=None, sq_norms=None, gram=None, eigenvalues=None, key=None,
             **unused_extra_args) -> tuple[PyTree, Any]:
    """`sum_i w_i g_i` of task gradients stacked on axis 0 (optax `Aggregator.update`)."""
    k = num_tasks_of(task_grads)
    mask = _mask_for(self.shared, task_grads, params)
    given = dict(losses=losses, sq_norms=sq_norms, gram=gram, eigenvalues=eigenvalues, key=key)
    required = _EXTRA_ARG.get(self.needs.kind)
    if required is not None and given[required] is None:
      raise ValueError(
          f"{self.name} (needs {self.needs.kind!r}) takes {required} as an extra argument: "
          f"update(task_grads, state, params, {required}=...); make_train_step passes it.")
    stats = stats_from_gradients(self.needs.kind, task_grads, mask, **given)
    weights, new_state = self.weights(stats, state)
    check_weights(self.name, weights, k)
    return combine(task_grads, weights, mask, self.head_gradients), new_state

  @property
  def aggregator(self) -> Aggregator:
    """The method as a plain optax Aggregator, for `optax.chain` and hand-written steps."""
    return Aggregator(self.init, self.update)


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class GradientRule:
  """A method that needs the shared task gradients themselves, not only their statistics.

  Attributes:
    name: the method's registry name.
    init: `init(params) -> state`.
    rule: `rule(matrix (k, P), state, TaskStats) -> (direction (P,), weights (k,),
      new_state)` on the flattened shared task gradients, pure and jittable.
    shared: which parameters are shared (see `Weighting`).
    head_gradients: non-shared parameters get the plain sum of task gradients ("sum") or
      the sum weighted by the returned weights ("weighted").
    hparams: the hyper-parameters, for reports.
    needs: always `Needs("gradients")`.
  """
  name: str
  init: Callable[[PyTree], Any]
  rule: Callable[[jax.Array, Any, TaskStats], tuple[jax.Array, jax.Array, Any]]
  shared: SharedSpec = None
  head_gradients: str = "sum"
  hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  needs: Needs = Needs("gradients")

  def __post_init__(self):
    _check_common(self)
    if self.needs.kind != "gradients":
      raise ValueError(f"A GradientRule needs the task gradients, not {self.needs.kind!r}.")

  def update(self, task_grads: PyTree, state: Any, params: PyTree | None = None, *,
             losses=None, key=None, **unused_extra_args) -> tuple[PyTree, Any]:
    """The rule's update from task gradients stacked on axis 0 (optax `Aggregator.update`)."""
    num_tasks_of(task_grads)
    mask = _mask_for(self.shared, task_grads, params)
    matrix = _tree.stacked_matrix(task_grads, mask)
    direction, weights, new_state = self.rule(matrix, state, TaskStats(losses=losses, key=key))
    shared_leaves = _tree.masked_leaves(task_grads, mask)
    sizes = [x[0].size for x in shared_leaves]
    pieces = jnp.split(direction, np.cumsum(sizes)[:-1].tolist())
    it = iter(p.reshape(x.shape[1:]).astype(x.dtype) for p, x in zip(pieces, shared_leaves))
    w = weights if self.head_gradients == "weighted" else jnp.ones_like(weights)
    return jax.tree.map(lambda m, g: next(it) if m else jnp.tensordot(w.astype(g.dtype), g, 1),
                        mask, task_grads), new_state

  @property
  def aggregator(self) -> Aggregator:
    """The method as a plain optax Aggregator, for `optax.chain` and hand-written steps."""
    return Aggregator(self.init, self.update)


# Every multi-task method is one of these two.
Method = Weighting | GradientRule


def is_method(value: Any) -> bool:
  """Whether `value` is a multi-task method (`Weighting` or `GradientRule`)."""
  return isinstance(value, (Weighting, GradientRule))


def _check_common(method) -> None:
  if not isinstance(method.needs, Needs):
    raise TypeError(f"{method.name}: needs must be a Needs record, got {method.needs!r}.")
  if method.head_gradients not in HEAD_GRADIENTS:
    raise ValueError(f"head_gradients must be one of {HEAD_GRADIENTS}, got "
                     f"{method.head_gradients!r}.")


def _mask_for(shared: SharedSpec, task_grads: PyTree, params: PyTree | None) -> PyTree:
  like = params if params is not None else jax.tree.map(lambda g: g[0], task_grads)
  return _tree.resolve_mask(shared, like)
