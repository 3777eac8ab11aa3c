"""Looking at the extended NTK: per-task spectra, task affinity, task groups, and their tracks.

The extended NTK of k tasks over n chunks of a batch has blocks K_ij = J_i J_j^T (see
`ntkmtl_jax.kernel`). NTKMTL reads one number off each diagonal block, its largest
eigenvalue lambda_i. This module gives the rest of the picture:

    spec = spectra.task_spectra(loss_fn, params, batch, num_chunks=8, shared=shared)
    spec.spectra        # (k, n) eigenvalues of each K_ii, largest first
    spec.affinity       # (k, k) cross-task alignment from the blocks K_ij
    spectra.group_tasks(spec.affinity).labels   # e.g. [0, 0, 1]

and `SpectrumTracker`, a callback that records lambda_i, the method's task weights and the
affinity on a fixed probe batch while a model trains.

Everything up to the grouping is pure and jittable; `group_tasks` and the tracker run on
the host (NumPy) because they act on k x k matrices or on a Python training loop.

References:
  Qin, Wang, Liao, Yan, "NTKMTL: Mitigating Task Imbalance in Multi-Task Learning from
  Neural Tangent Kernel Perspective", NeurIPS 2025 (arXiv 2510.18258);
  Cristianini, Shawe-Taylor, Elisseeff, Kandola, "On Kernel-Target Alignment", NIPS 2001.
"""

from __future__ import annotations

from typing import Any, NamedTuple
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ntkmtl_jax import kernel
from ntkmtl_jax._tree import PyTree, SharedSpec
from ntkmtl_jax.kernel import STATISTICS, block_eigenvalues, effective_rank, spectrum_statistic
from ntkmtl_jax.method import check_statistic
from ntkmtl_jax.strategy import Strategy, resolve

AFFINITY_KINDS = ("cosine", "alignment")

__all__ = [
    "AFFINITY_KINDS", "STATISTICS", "SpectrumHistory", "SpectrumTracker", "TaskGroups",
    "TaskSpectra", "all_statistics", "block_eigenvalues", "diagonal_block_eigenvalues",
    "effective_rank", "group_tasks", "imbalance", "spectrum_statistic", "task_affinity",
    "task_spectra",
]


def _diagonal(blocks: jax.Array) -> jax.Array:
  """(k, n, n) diagonal blocks from a (k, k, n, n) stack, or the (k, n, n) stack itself."""
  if blocks.ndim == 4:
    if blocks.shape[0] != blocks.shape[1]:
      raise ValueError(f"Kernel blocks must be (k, k, n, n), got shape {blocks.shape}.")
    return jnp.einsum("iiab->iab", blocks)
  if blocks.ndim == 3:
    return blocks
  raise ValueError("Pass the extended-kernel blocks (k, k, n, n) (`kernel_blocks`) or the "
                   f"diagonal blocks (k, n, n) (`diagonal_blocks`); got shape {blocks.shape}.")


def diagonal_block_eigenvalues(blocks: jax.Array) -> jax.Array:
  """The full spectrum of each task's diagonal block K_ii, shape (k, n), largest first.

  Args:
    blocks: all blocks (k, k, n, n) or only the diagonal ones (k, n, n).

  Returns:
    (k, n) eigenvalues, each row sorted in decreasing order and clipped at zero (the blocks
    are PSD; round-off can make the smallest ones slightly negative).
  """
  return block_eigenvalues(_diagonal(blocks))


def all_statistics(spectra: jax.Array, *, top_r: int = 3) -> dict[str, jax.Array]:
  """Every weighting statistic of `kernel.STATISTICS` for (k, n) spectra, by name."""
  return {name: spectrum_statistic(spectra, name, top_r=top_r) for name in STATISTICS}


def task_affinity(blocks: jax.Array, kind: str = "cosine") -> jax.Array:
  """The normalised cross-task kernel alignment, a (k, k) task-affinity matrix.

  With J_i the (n, P) chunk Jacobian of task i and K_ij = J_i J_j^T:

  - "cosine" (default, signed, in [-1, 1]):
    A_ij = tr K_ij / sqrt(tr K_ii tr K_jj) = <J_i, J_j>_F / (||J_i||_F ||J_j||_F),
    the cosine between the two tasks' chunk gradients taken together. Negative means the
    tasks pull the shared parameters in opposing directions on the same chunks. With n = 1
    it is the cosine between the task gradients.
  - "alignment" (unsigned, in [0, 1]):
    A_ij = ||K_ij||_F^2 / (||K_ii||_F ||K_jj||_F), the kernel alignment of the two tasks'
    parameter-space kernels J_i^T J_i and J_j^T J_j (||K_ij||_F^2 = <J_i^T J_i, J_j^T J_j>_F):
    1 when the tasks move the same parameter directions in the same proportions, 0 when
    their gradients are orthogonal, whatever the signs. With n = 1 it is the squared cosine.

  Both have ones on the diagonal; a task whose kernel is zero gets a zero row and column.

  Args:
    blocks: the extended-kernel blocks (..., k, k, n, n) (`kernel.kernel_blocks`, or
      `ntk_weights(..., return_blocks=True).blocks`); leading axes (e.g. the records of a
      `SpectrumHistory`) are kept.
    kind: "cosine" or "alignment".

  Returns:
    (..., k, k) symmetric affinity.

  References:
    Cristianini et al., "On Kernel-Target Alignment", NIPS 2001 (the alignment).
  """
  if kind not in AFFINITY_KINDS:
    raise ValueError(f"Unknown affinity kind {kind!r}: choose one of {AFFINITY_KINDS}.")
  blocks = jnp.asarray(blocks)
  if blocks.ndim < 4 or blocks.shape[-4] != blocks.shape[-3]:
    raise ValueError("task_affinity needs all blocks K_ij, shape (k, k, n, n) "
                     f"(`kernel_blocks` or `ntk_weights(..., return_blocks=True)`); got "
                     f"{blocks.shape}.")
  if kind == "cosine":
    cross = jnp.trace(blocks, axis1=-2, axis2=-1)  # (..., k, k): tr K_ij
    scale = jnp.sqrt(jnp.maximum(jnp.diagonal(cross, axis1=-2, axis2=-1), 0.0))
  else:
    cross = jnp.sum(blocks ** 2, axis=(-2, -1))  # ||K_ij||_F^2
    scale = jnp.sqrt(jnp.diagonal(cross, axis1=-2, axis2=-1))  # ||K_ii||_F
  denom = scale[..., :, None] * scale[..., None, :]
  affinity = jnp.where(denom > 0, cross / jnp.where(denom > 0, denom, 1.0), 0.0)
  # Round-off can push |A_ij| a hair past 1.
  lower = -1.0 if kind == "cosine" else 0.0
  return jnp.clip(0.5 * (affinity + jnp.swapaxes(affinity, -1, -2)), lower, 1.0)


def imbalance(values: jax.Array) -> jax.Array:
  """max_i / min_i over the last axis: how far apart the tasks' speeds are (1 = balanced)."""
  values = jnp.asarray(values)
  return jnp.max(values, axis=-1) / jnp.maximum(jnp.min(values, axis=-1),
                                                jnp.finfo(values.dtype).tiny)


class TaskSpectra(NamedTuple):
  """What `task_spectra` returns.

  Attributes:
    spectra: (k, n) eigenvalues of each diagonal block K_ii, largest first.
    eigenvalues: (k,) the largest of them, NTKMTL's lambda_i.
    affinity: (k, k) `task_affinity` of the blocks.
    losses: (k, n) loss of each task on each chunk.
    blocks: (k, k, n, n) the extended-kernel blocks.
  """
  spectra: jax.Array
  eigenvalues: jax.Array
  affinity: jax.Array
  losses: jax.Array
  blocks: jax.Array


def task_spectra(apply_fn: Callable, params: PyTree, batch: PyTree, *, num_chunks: int = 8,
                 shared: SharedSpec = None, strategy: Strategy | str = "auto",
                 affinity: str = "cosine") -> TaskSpectra:
  """Spectra of the task blocks and the task affinity of the extended NTK on one batch.

  Pure and jittable (with `apply_fn`, `num_chunks`, `shared`, `strategy`, `affinity`
  static).

  Args:
    apply_fn: `apply_fn(params, batch) -> (k,)` task losses.
    params: the parameters.
    batch: a pytree of arrays whose leading axis is divisible by `num_chunks`.
    num_chunks: n, the rows of each task's Jacobian (and the length of each spectrum).
    shared: which parameters are shared (None: all), a mask pytree or a function of params.
    strategy: how the k * n backward passes loop, a `Strategy` or a name (see
      `kernel.task_jacobian`); every block K_ij needs the whole Jacobian, so
      `materialize=False` is refused.
    affinity: the `task_affinity` kind.

  Returns:
    A `TaskSpectra`.
  """
  losses, jac = kernel.task_jacobian(apply_fn, params, batch, num_chunks=num_chunks,
                                     shared=shared,
                                     strategy=resolve(strategy, name="task_spectra"))
  blocks = kernel.kernel_blocks(jac)
  spectra = diagonal_block_eigenvalues(blocks)
  return TaskSpectra(spectra=spectra, eigenvalues=spectra[:, 0],
                     affinity=task_affinity(blocks, affinity), losses=losses, blocks=blocks)


class TaskGroups(NamedTuple):
  """What `group_tasks` returns.

  Attributes:
    labels: (k,) group of each task, numbered 0, 1, ... in order of each group's first task.
    merges: the merges made, in order: (tasks of one group, tasks of the other, their
      average affinity when merged).
  """
  labels: np.ndarray
  merges: list[tuple[tuple[int, ...], tuple[int, ...], float]]

  @property
  def groups(self) -> list[list[int]]:
    """The groups as lists of task indices."""
    return [np.flatnonzero(self.labels == g).tolist() for g in range(self.labels.max() + 1)]


def group_tasks(affinity, num_groups: int | None = None, *,
                threshold: float = 0.0) -> TaskGroups:
  """Groups tasks by average-linkage agglomerative clustering of a task affinity.

  Start with every task alone; repeatedly merge the two groups whose average pairwise
  affinity (the mean of A_ij over i in one group and j in the other) is largest. Stop when
  `num_groups` groups are left or, when `num_groups` is None, when no two groups have an
  average affinity above `threshold`. This is UPGMA on the distance 1 - A, so it matches
  `scipy.cluster.hierarchy.linkage(..., "average")` cut into `num_groups` clusters. Ties
  are broken toward the pair with the smallest task indices.

  With the signed "cosine" affinity the default threshold 0 groups the tasks whose
  gradients agree on average and keeps conflicting tasks apart; with the unsigned
  "alignment" pick a threshold in (0, 1).

  Runs in NumPy on the host (O(k^3), for the tens of tasks of a multi-task model).

  Args:
    affinity: (k, k) symmetric affinity (e.g. `task_affinity`).
    num_groups: the number of groups wanted, or None to stop at `threshold`.
    threshold: with `num_groups=None`, merge only above this average affinity.

  Returns:
    A `TaskGroups`.
  """
  a = np.asarray(affinity, np.float64)
  if a.ndim != 2 or a.shape[0] != a.shape[1]:
    raise ValueError(f"affinity must be a square (k, k) matrix, got shape {a.shape}.")
  if not np.all(np.isfinite(a)):
    raise ValueError("affinity has non-finite entries.")
  if not np.allclose(a, a.T, rtol=1e-5, atol=1e-6):
    raise ValueError("affinity must be symmetric.")
  k = a.shape[0]
  if num_groups is not None and not 1 <= num_groups <= k:
    raise ValueError(f"num_groups must be between 1 and the number of tasks ({k}), got "
                     f"{num_groups}.")
  groups = [[i] for i in range(k)]
  merges = []
  target = 1 if num_groups is None else num_groups
  while len(groups) > target:
    best, pair = -np.inf, None
    for x in range(len(groups)):
      for y in range(x + 1, len(groups)):
        value = a[np.ix_(groups[x], groups[y])].mean()
        if value > best:
          best, pair = value, (x, y)
    if num_groups is None and best <= threshold:
      break
    x, y = pair
    merges.append((tuple(groups[x]), tuple(groups[y]), float(best)))
    groups[x] = sorted(groups[x] + groups[y])
    del groups[y]
  labels = np.empty(k, np.int64)
  for g, members in enumerate(sorted(groups, key=min)):
    labels[members] = g
  return TaskGroups(labels=labels, merges=merges)


class SpectrumHistory(NamedTuple):
  """What a `SpectrumTracker` recorded, as NumPy arrays (R records, k tasks, n chunks).

  Attributes:
    steps: (R,) the step of each record (0 = before training).
    spectra: (R, k, n) eigenvalues of each task block on the probe batch, largest first.
    eigenvalues: (R, k) lambda_i, the largest of them.
    statistic: (R, k) the tracker's weighting statistic of each spectrum.
    weights: (R, k) the method's task weights at that step (NaN where not given).
    affinity: (R, k, k) the task affinity on the probe batch.
    losses: (R, k) task losses on the probe batch (mean over chunks).
    blocks: (R, k, k, n, n) the extended-kernel blocks (for another `task_affinity` kind).
  """
  steps: np.ndarray
  spectra: np.ndarray
  eigenvalues: np.ndarray
  statistic: np.ndarray
  weights: np.ndarray
  affinity: np.ndarray
  losses: np.ndarray
  blocks: np.ndarray


_PROBES: dict[tuple, Callable] = {}


def _cache_key(loss_fn, num_chunks, shared, *settings) -> tuple | None:
  """A key for the compiled probe, or None when one of the pieces is not hashable (a mask
  pytree for `shared`)."""
  if shared is not None and not callable(shared):
    return None
  key = (loss_fn, num_chunks, shared) + settings
  try:
    hash(key)
  except TypeError:
    return None
  return key


class SpectrumTracker:
  """Records lambda_i, task weights and task affinity over training, on a fixed probe batch.

  A callback for a plain Python training loop around a `TrainStep`:

      tracker = SpectrumTracker(loss_fn, probe_batch, num_chunks=8, every=25, shared=shared)
      tracker.record(0, state.params)                # at initialisation
      for t in range(1, steps + 1):
        state, metrics = step(state, next(batches))
        tracker(t, state, metrics)                   # records when t % every == 0
      history = tracker.history()

  Each record runs one jitted `task_spectra` on the probe batch (k * n backward passes), so
  the cost is that of an NTKMTL step with n chunks every `every` steps. The probe batch is
  fixed so that changes come from the parameters, not from the data.

  Args:
    loss_fn: `loss_fn(params, batch) -> (k,)` losses, or with `has_state=True`
      `loss_fn(params, model_state, batch) -> ((k,), model_state)` (the `TaskFunctions`
      convention); the returned model state is discarded.
    probe_batch: the batch the kernel is taken on (leading axis divisible by num_chunks).
    num_chunks: n, the length of each spectrum.
    every: record every `every` steps when called as a callback.
    shared: which parameters are shared (None: all).
    has_state: whether `loss_fn` takes and returns a model state.
    statistic: the weighting statistic also recorded (see `kernel.spectrum_statistic`).
    top_r: r for statistic="top_r".
    affinity: the `task_affinity` kind.
    strategy: how the backward passes loop, a `Strategy` or a name (see `task_spectra`).
  """

  def __init__(self, loss_fn: Callable, probe_batch: PyTree, *, num_chunks: int = 8,
               every: int = 10, shared: SharedSpec = None, has_state: bool = False,
               statistic: str = "max", top_r: int = 3, affinity: str = "cosine",
               strategy: Strategy | str = "auto"):
    if every < 1:
      raise ValueError(f"every must be a positive number of steps, got {every}.")
    check_statistic(statistic, top_r, "auto")
    if affinity not in AFFINITY_KINDS:
      raise ValueError(f"Unknown affinity kind {affinity!r}: choose one of {AFFINITY_KINDS}.")
    resolve(strategy, name="SpectrumTracker")  # a bad strategy fails here, not when recording
    self.every = every
    self._batch = probe_batch
    self._records: list[dict[str, Any]] = []
    # Trackers with the same settings share one compiled probe (one run per method).
    settings = _cache_key(loss_fn, num_chunks, shared, has_state, statistic, top_r, affinity,
                          strategy)
    if settings is not None and settings in _PROBES:
      self._probe = _PROBES[settings]
      return

    def probe(params, model_state, batch):
      if has_state:
        fn = lambda p, b: loss_fn(p, model_state, b)[0]
      else:
        fn = loss_fn
      spec = task_spectra(fn, params, batch, num_chunks=num_chunks, shared=shared,
                          strategy=strategy, affinity=affinity)
      return dict(spectra=spec.spectra, eigenvalues=spec.eigenvalues,
                  statistic=spectrum_statistic(spec.spectra, statistic, top_r=top_r),
                  affinity=spec.affinity, losses=jnp.mean(spec.losses, axis=1),
                  blocks=spec.blocks)

    self._probe = jax.jit(probe)
    if settings is not None:
      _PROBES[settings] = self._probe

  def record(self, step: int, params: PyTree, model_state: PyTree = None,
             weights=None) -> None:
    """Takes one record now (whatever `every` says)."""
    out = jax.device_get(self._probe(params, model_state, self._batch))
    k = out["eigenvalues"].shape[0]
    out["weights"] = (np.full(k, np.nan) if weights is None
                      else np.asarray(jax.device_get(weights), np.float64))
    out["step"] = int(step)
    self._records.append(out)

  def __call__(self, step: int, state, metrics: dict | None = None) -> None:
    """The callback: records when `step % every == 0`.

    Args:
      step: the number of steps taken so far (1 after the first step).
      state: the `TrainState` after the step (its `params` and `model_state` are used).
      metrics: the step's metrics; their `weights` (the method's task weights) are kept.
    """
    if int(step) % self.every:
      return
    weights = None if metrics is None else metrics.get("weights")
    self.record(step, state.params, getattr(state, "model_state", None), weights)

  def history(self) -> SpectrumHistory:
    """Everything recorded so far."""
    if not self._records:
      raise ValueError("Nothing recorded yet: call the tracker after train steps, or "
                       "record(step, params) at initialisation.")
    stack = lambda key: np.stack([np.asarray(r[key], np.float64) for r in self._records])
    return SpectrumHistory(steps=np.asarray([r["step"] for r in self._records], np.int64),
                           spectra=stack("spectra"), eigenvalues=stack("eigenvalues"),
                           statistic=stack("statistic"), weights=stack("weights"),
                           affinity=stack("affinity"), losses=stack("losses"),
                           blocks=stack("blocks"))
