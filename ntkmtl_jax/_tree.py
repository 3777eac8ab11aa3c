"""Small pytree utilities shared by the kernel, the transforms and the train step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
# A mask of shared parameters: None (every parameter is shared), a pytree of bools with the
# structure of the parameters, or a function params -> such a pytree (the optax idiom).
SharedSpec = None | PyTree | Callable[[PyTree], PyTree]


def resolve_mask(shared: SharedSpec, params: PyTree) -> PyTree:
  """Returns a pytree of Python bools with the structure of `params`."""
  if shared is None:
    return jax.tree.map(lambda _: True, params)
  mask = shared(params) if callable(shared) else shared
  leaves, treedef = jax.tree.flatten(params)
  try:
    mask_leaves = treedef.flatten_up_to(mask)
  except (ValueError, TypeError) as e:
    raise ValueError(
      "The `shared` mask does not match the parameter tree: give a pytree of bools with "
      "the same structure as the parameters, or a function params -> mask. "
      f"Parameter structure: {treedef}"
    ) from e
  bools = []
  for m in mask_leaves:
    if not isinstance(m, (bool, int)) and not (hasattr(m, "shape") and m.shape == ()):
      raise ValueError(f"`shared` mask leaves must be Python bools, got {type(m).__name__}.")
    bools.append(bool(m))
  if not any(bools):
    raise ValueError(
      "The `shared` mask selects no parameter: at least one parameter must be shared between tasks."
    )
  del leaves
  return jax.tree.unflatten(treedef, bools)


def split(tree: PyTree, mask: PyTree) -> tuple[PyTree, PyTree]:
  """Splits `tree` into (shared, rest), each with None where the other holds the leaf."""
  shared = jax.tree.map(lambda m, x: x if m else None, mask, tree)
  rest = jax.tree.map(lambda m, x: None if m else x, mask, tree)
  return shared, rest


def merge(shared: PyTree, rest: PyTree, mask: PyTree) -> PyTree:
  """Inverse of `split`."""
  return jax.tree.map(
    lambda m, s, r: s if m else r, mask, shared, rest, is_leaf=lambda x: x is None
  )


def masked_leaves(tree: PyTree, mask: PyTree, shared: bool = True) -> list[jax.Array]:
  """Leaves of `tree` whose mask entry equals `shared`."""
  return [x for m, x in zip(jax.tree.leaves(mask), jax.tree.leaves(tree)) if m == shared]


def stacked_matrix(stacked: PyTree, mask: PyTree, shared: bool = True) -> jax.Array:
  """Flattens the selected leaves of a pytree stacked on axis 0 into a (m, P) matrix."""
  leaves = masked_leaves(stacked, mask, shared)
  m = leaves[0].shape[0]
  return jnp.concatenate([x.reshape(m, -1) for x in leaves], axis=1)


def stacked_gram(stacked: PyTree, mask: PyTree) -> jax.Array:
  """Gram matrix G_ij = <g_i, g_j> over the shared leaves of gradients stacked on axis 0.

  Accumulated leaf by leaf so that no (m, P) copy is made, at full matmul precision: the
  solvers downstream need more than the bf16/TF32 default of TPUs and recent GPUs.
  """
  leaves = masked_leaves(stacked, mask)
  m = leaves[0].shape[0]
  gram = jnp.zeros((m, m), jnp.result_type(*leaves))
  for x in leaves:
    x = x.reshape(m, -1)
    gram = gram + jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST)
  return gram


def sq_norm(tree: PyTree, mask: PyTree | None = None, shared: bool = True) -> jax.Array:
  """Squared Euclidean norm of a pytree (of its shared leaves when a mask is given)."""
  leaves = jax.tree.leaves(tree) if mask is None else masked_leaves(tree, mask, shared)
  return sum(jnp.vdot(x, x).real for x in leaves)


def all_finite(tree: PyTree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.array(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def batch_size(batch: PyTree) -> int:
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError("The batch has no arrays.")
  sizes = {x.shape[0] if getattr(x, "ndim", 0) else None for x in leaves}
  if None in sizes or len(sizes) != 1:
    shapes = [getattr(x, "shape", ()) for x in leaves]
    raise ValueError(
      f"Every array in the batch must share its leading (batch) axis; got shapes {shapes}."
    )
  return sizes.pop()


def split_batch(batch: PyTree, num_chunks: int) -> PyTree:
  """Reshapes every leaf from (B, ...) to (num_chunks, B // num_chunks, ...)."""
  if not isinstance(num_chunks, int) or num_chunks < 1:
    raise ValueError(f"num_chunks must be a positive integer, got {num_chunks!r}.")
  size = batch_size(batch)
  if size % num_chunks:
    raise ValueError(
      f"Batch size {size} is not divisible by num_chunks={num_chunks}: the extended NTK "
      f"splits the batch into equal chunks. Use a batch size that is a multiple of "
      f"{num_chunks}, or a num_chunks that divides {size}."
    )
  return jax.tree.map(lambda x: x.reshape((num_chunks, size // num_chunks) + x.shape[1:]), batch)


def check_losses(losses: jax.Array, num_tasks: int | None = None, where: str = "loss_fn"):
  """Raises a clear error unless `losses` is a vector of task losses."""
  shape = getattr(losses, "shape", None)
  if shape is None or len(shape) != 1 or (num_tasks is not None and shape[0] != num_tasks):
    want = f"({num_tasks},)" if num_tasks is not None else "(num_tasks,)"
    raise ValueError(
      f"{where} must return a vector of task losses of shape {want}, got shape {shape}. "
      "Reduce each task's loss over the batch (e.g. a mean) and stack the k results."
    )
