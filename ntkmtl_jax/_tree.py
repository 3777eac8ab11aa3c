"""Small pytree utilities shared by the kernel, the transforms and the train step."""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
# A mask of shared parameters: None (every parameter is shared; the methods whose update
# depends on the mask warn), True (every parameter is shared, said explicitly), a pytree of
# bools with the structure of the parameters or a prefix of it (as `optax.masked` takes), or
# a function params -> such a pytree (the optax idiom).
SharedSpec = None | bool | PyTree | Callable[[PyTree], PyTree]
# A path pattern of `shared_mask`: a key name or "a/b" run of names, a compiled regular
# expression, or a predicate (path, leaf) -> bool.
PathPattern = str | re.Pattern | Callable[[tuple[str, ...], Any], bool]

_MASK_FORMS = (
  "give one bool per parameter array or per subtree (a prefix of the parameters, as "
  "optax.masked takes), a function params -> mask, or build it with "
  "ntkmtl_jax.shared_mask(params, include=...)"
)


class AllSharedWarning(UserWarning):
  """`shared=None` where the mask changes the numbers: every parameter, heads included, is
  treated as shared. Pass a mask, or `shared=True` to say that every parameter is shared."""


_WARNED_ALL_SHARED: set[str] = set()


def warn_all_shared(name: str, consequence: str, stacklevel: int = 3) -> None:
  """Warns once per process and `name` that `shared=None` treats the heads as shared."""
  if name in _WARNED_ALL_SHARED:
    return
  _WARNED_ALL_SHARED.add(name)
  warnings.warn(
    f"{name}: shared=None treats every parameter as shared, the task heads included: "
    f"{consequence}. Pass shared= the mask of the shared parameters (a pytree or prefix of "
    "bools, a function params -> mask, ntkmtl_jax.shared_mask(params, include=...), or a "
    "TaskFunctions' .shared), or shared=True if every parameter really is shared.",
    AllSharedWarning,
    stacklevel=stacklevel,
  )


def key_name(entry) -> str:
  """The name of one key-path entry (a dict key, a sequence index or an attribute name)."""
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _where(path: tuple) -> str:
  return jax.tree_util.keystr(path) if path else "the top level"


def _children(node):
  """(key, child) pairs one level down and the one-level treedef; None for a leaf."""
  pairs, treedef = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
  if node is not None and jax.tree_util.treedef_is_leaf(treedef):
    return None, None
  return [(path[0], child) for path, child in pairs], treedef


def _describe(x) -> str:
  shape = getattr(x, "shape", None)
  if shape is not None:
    return f"an array of shape {tuple(shape)} and dtype {getattr(x, 'dtype', '?')}"
  return f"a {type(x).__name__} ({x!r:.40})"


def _is_flag(m) -> bool:
  if isinstance(m, (bool, int, np.bool_, np.integer)):
    return True
  dtype = getattr(m, "dtype", None)
  return (
    getattr(m, "shape", None) == ()
    and dtype is not None
    and (jnp.issubdtype(dtype, jnp.bool_) or jnp.issubdtype(dtype, jnp.integer))
  )


def _broadcast_mask(mask, params, path: tuple, origin: str):
  """The bools of a full or prefix `mask`, with the structure of `params`."""
  if _is_flag(mask):
    flag = bool(mask)
    return jax.tree.map(lambda _: flag, params)
  mask_children, _ = _children(mask)
  if mask_children is None:
    raise ValueError(
      f"{origin} has {_describe(mask)} at {_where(path)}, where a bool (True: shared) or a "
      f"subtree of bools belongs: {_MASK_FORMS}."
    )
  param_children, param_def = _children(params)
  mask_keys = sorted(key_name(k) for k, _ in mask_children)
  if param_children is None:
    raise ValueError(
      f"{origin} does not match the parameter tree at {_where(path)}: the mask has keys "
      f"{mask_keys} where the parameters have {_describe(params)}; {_MASK_FORMS}."
    )
  by_name = {key_name(k): child for k, child in mask_children}
  param_keys = sorted(key_name(k) for k, _ in param_children)
  if mask_keys != param_keys:
    missing = sorted(set(param_keys) - set(mask_keys))
    extra = sorted(set(mask_keys) - set(param_keys))
    detail = "; ".join(
      part
      for part in (
        f"missing from the mask: {missing}" if missing else "",
        f"not in the parameters: {extra}" if extra else "",
      )
      if part
    )
    raise ValueError(
      f"{origin} does not match the parameter tree at {_where(path)}: the mask has keys "
      f"{mask_keys}, the parameters have keys {param_keys} ({detail}); {_MASK_FORMS}."
    )
  resolved = [
    _broadcast_mask(by_name[key_name(k)], child, path + (k,), origin) for k, child in param_children
  ]
  return param_def.unflatten(resolved)


def resolve_mask(shared: SharedSpec, params: PyTree) -> PyTree:
  """Returns a pytree of Python bools with the structure of `params`.

  `shared` is None or True (every parameter), a pytree of bools with the structure of
  `params` or a prefix of it (`{"params": {"trunk": True, "heads": False}}`: one bool for a
  whole subtree, as `optax.masked` takes), or a function params -> such a pytree. A mask
  that does not fit raises a ValueError naming the first key path where the two trees
  differ and both trees' keys there.
  """
  if shared is None:
    return jax.tree.map(lambda _: True, params)
  from_fn = callable(shared)
  mask = shared(params) if from_fn else shared
  origin = "The mask that `shared(params)` returned" if from_fn else "The `shared` mask"
  treedef = jax.tree.structure(params)
  try:  # the common case, a full mask: one flatten
    mask_leaves = treedef.flatten_up_to(mask)
  except (ValueError, TypeError):
    mask_leaves = None
  if mask_leaves is not None and all(_is_flag(m) for m in mask_leaves):
    result = jax.tree.unflatten(treedef, [bool(m) for m in mask_leaves])
  else:
    result = _broadcast_mask(mask, params, (), origin)
  if not any(jax.tree.leaves(result)):
    raise ValueError(
      f"{origin} selects no parameter: at least one parameter must be shared between tasks."
    )
  return result


def _pattern_matcher(pattern) -> Callable[[tuple[str, ...], Any], bool]:
  if isinstance(pattern, str):
    run = tuple(part for part in re.split(r"[/.]", pattern) if part)
    if not run:
      raise ValueError(f"shared_mask: the pattern {pattern!r} names no key.")
    n = len(run)
    return lambda names, _: any(names[i : i + n] == run for i in range(len(names) - n + 1))
  if isinstance(pattern, re.Pattern):
    return lambda names, _: pattern.search("/".join(names)) is not None
  if callable(pattern):
    return lambda names, leaf: bool(pattern(names, leaf))
  raise TypeError(
    "shared_mask patterns are key names or 'a/b' runs of names (str), compiled regular "
    f"expressions (re.compile) or functions (path, leaf) -> bool; got {type(pattern).__name__}."
  )


def _patterns(value, argument: str) -> list:
  if value is None:
    return []
  if isinstance(value, (str, re.Pattern)) or not isinstance(value, Sequence):
    return [value]  # one pattern (`_pattern_matcher` refuses what is none)
  if not value:
    raise ValueError(
      f"shared_mask: {argument} is empty; give a pattern, a sequence of them, or None."
    )
  return list(value)


def shared_mask(
  params: PyTree = None,
  *,
  include: PathPattern | Sequence[PathPattern] | None = None,
  exclude: PathPattern | Sequence[PathPattern] | None = None,
):
  """The shared-parameter mask from parameter paths (a `shared=` value for every method).

  A parameter's path is the tuple of key names that lead to it, e.g. `("params", "trunk",
  "Dense_0", "kernel")` for a flax linen model, `("encoder", "layers", "0", "kernel")` for
  an NNX one. A pattern is a key name or a run of consecutive names joined by "/" or "."
  ("trunk", "trunk/Dense_0"), matching every path that contains it; a compiled regular
  expression (`re.compile(r"^params/(trunk|stem)/")`), searched in the path joined by "/";
  or a function `(path, leaf) -> bool`. A parameter is shared when it matches an `include`
  pattern (every parameter when `include` is None) and no `exclude` pattern.

    shared = ntkmtl_jax.shared_mask(params, include="trunk")
    shared = ntkmtl_jax.shared_mask(include="trunk")          # a function params -> mask
    shared = ntkmtl_jax.shared_mask(params, exclude=re.compile(r"head_\\d+"))

  Args:
    params: the parameters; None returns a function params -> mask instead.
    include: the pattern(s) of the shared parameters.
    exclude: the pattern(s) of parameters that are not shared (the task heads).

  Returns:
    A pytree of bools with the structure of `params` (or a function making it).

  Raises:
    ValueError: a pattern matches no parameter (a misspelt name; the message lists the
      paths), or no parameter is left shared.
  """
  includes = [(p, _pattern_matcher(p)) for p in _patterns(include, "include")]
  excludes = [(p, _pattern_matcher(p)) for p in _patterns(exclude, "exclude")]
  if params is None:
    return lambda p: shared_mask(p, include=include, exclude=exclude)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [tuple(key_name(e) for e in path) for path, _ in flat]
  leaves = [leaf for _, leaf in flat]

  def matches(matchers):
    hits = [[m(names, leaf) for names, leaf in zip(paths, leaves)] for _, m in matchers]
    for (pattern, _), row in zip(matchers, hits):
      if not any(row):
        shown = ["/".join(names) for names in paths[:8]]
        more = f" and {len(paths) - 8} more" if len(paths) > 8 else ""
        raise ValueError(
          f"shared_mask: the pattern {pattern!r} matches no parameter; the parameter paths "
          f"are {shown}{more}."
        )
    return [any(column) for column in zip(*hits)] if hits else None

  included = matches(includes) or [True] * len(paths)
  excluded = matches(excludes) or [False] * len(paths)
  bools = [i and not e for i, e in zip(included, excluded)]
  if not any(bools):
    raise ValueError(
      f"shared_mask(include={include!r}, exclude={exclude!r}) leaves no parameter shared: at "
      "least one parameter must be shared between tasks."
    )
  return jax.tree.unflatten(treedef, bools)


def takes_positional(fn: Callable, count: int) -> bool | None:
  """Whether `fn` accepts `count` positional arguments (None when its signature is unknown)."""
  try:
    signature = inspect.signature(fn)
  except (TypeError, ValueError):
    return None
  try:
    signature.bind(*([None] * count))
  except TypeError:
    return False
  return True


def check_float_params(params: PyTree, where: str) -> None:
  """Raises a TypeError naming the first parameter that is not floating point."""
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(
        f"{where}: the parameter at {_where(path)} has dtype {dtype}, and only "
        "floating-point parameters have gradients; cast it (x.astype(jnp.float32)) or keep "
        "integer arrays (counts, indices, keys) in the batch or the model state."
      )


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
