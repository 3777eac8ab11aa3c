"""Task Jacobians, extended NTK blocks, eigen-estimates and the NTKMTL weights.

The extended NTK of k tasks over n chunks of a batch is the kn x kn matrix of blocks
K_ij = J_i J_j^T, where row a of J_i is the gradient of task i's loss on chunk a with respect
to the shared parameters. NTKMTL reads task i's convergence speed off the largest eigenvalue
lambda_i of the diagonal block K_ii and weights the tasks so that they converge together.

References:
  Qin, Wang, Liao, Yan, "NTKMTL: Mitigating Task Imbalance in Multi-Task Learning from
  Neural Tangent Kernel Perspective", NeurIPS 2025 (arXiv 2510.18258).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ntkmtl_jax import _tree
from ntkmtl_jax._tree import PyTree, SharedSpec
# `STATISTICS` and `default_strategy` stay reachable as `kernel.STATISTICS` and
# `kernel.default_strategy` too.
from ntkmtl_jax.method import EIGEN_METHODS, STATISTICS, check_statistic  # noqa: F401
from ntkmtl_jax.strategy import (Passes, Strategy, default_strategy,  # noqa: F401
                                 resolve, run_passes, unit)

NORMALIZATIONS = ("sum", "mean")
# Relative floor on eigenvalues: a task whose kernel is (numerically) zero gets
# lambda_i = EIGENVALUE_FLOOR * sum_j lambda_j, i.e. a large but finite weight, which
# multiplies a zero gradient. See `weights_from_eigenvalues`.
EIGENVALUE_FLOOR = 1e-12
# Kernel blocks feed eigen-solvers: compute them at full precision on TPU/GPU as well.
_HIGHEST = jax.lax.Precision.HIGHEST


def pullback_rows(vjp_fn: Callable, num_rows: int, dtype, *,
                  strategy: Strategy | str = "unroll", chunk_size: int | None = None) -> PyTree:
  """Runs `vjp_fn` on the unit cotangents e_0..e_{m-1}; returns the rows stacked on axis 0.

  `vjp_fn` maps a cotangent of shape (m,) to a pytree (the output of `jax.vjp` with a single
  primal, already unpacked). `strategy` (a `Strategy` or a name, see `ntkmtl_jax.strategy`)
  says how the m backward passes loop; every `Passes` gives the same numbers and differs in
  speed and memory: `VMAP` batches them (memory x m), `UNROLL` runs them one after another
  inside the compiled function, `CHUNKED` vmaps `chunk_size` at a time with `lax.map`,
  `SEQUENTIAL` runs one compiled backward pass m times (`lax.map`). The rows are held, so
  `materialize=False` is refused. `chunk_size`, when given, overrides the strategy's.
  """
  strategy = resolve(strategy, chunk_size=chunk_size, name="pullback_rows")
  return run_passes(strategy, lambda i, after: vjp_fn(unit(i, num_rows, dtype)), num_rows)


def chunk_loss_fn(apply_fn: Callable, batch: PyTree, num_chunks: int,
                  num_tasks: int | None = None, *, has_aux: bool = False) -> Callable:
  """params -> (k * n,) losses of every task on every chunk, task-major (row i*n + a).

  With `has_aux=True`, `apply_fn(params, chunk)` returns `(losses, aux)` and the function
  returns `(flat_losses, (chunk_losses (n, k), aux stacked over chunks))`.
  """
  chunks = _tree.split_batch(batch, num_chunks)
  with_aux = apply_fn if has_aux else (lambda p, c: (apply_fn(p, c), None))

  def losses_on_chunks(params):
    if num_chunks == 1:
      per_chunk, aux = jax.tree.map(lambda x: x[None], with_aux(
          params, jax.tree.map(lambda x: x[0], chunks)))
    else:
      per_chunk, aux = jax.vmap(lambda c: with_aux(params, c))(chunks)  # (n, k)
    _tree.check_losses(per_chunk[0], num_tasks, where="apply_fn")
    flat = per_chunk.T.reshape(-1)
    return (flat, (per_chunk, aux)) if has_aux else flat

  return losses_on_chunks


def task_jacobian(apply_fn: Callable, params: PyTree, batch: PyTree, *, num_chunks: int = 1,
                  shared: SharedSpec = None, strategy: Strategy | str = "auto",
                  chunk_size: int | None = None, has_aux: bool = False):
  """Jacobian of every task's chunk losses with respect to the shared parameters.

  Args:
    apply_fn: the task losses, `apply_fn(params, batch) -> (k,)`; with `has_aux=True`,
      `apply_fn(params, batch) -> ((k,), aux)` (e.g. a model's updated batch statistics).
    params: the parameters.
    batch: a pytree of arrays with a common leading batch axis.
    num_chunks: n, the number of equal chunks the batch is split into.
    shared: which parameters are shared (None: all), a mask pytree or a function of params.
    strategy: a `Strategy` or a name (see `ntkmtl_jax.strategy`): how the k*n backward
      passes loop. `Passes.VMAP` is `jax.vmap(jax.jacrev(apply_fn))` over chunks (the
      reference); the others run one forward, then k*n VJPs unrolled (`UNROLL`), as a
      `lax.map` of vmapped groups (`CHUNKED`) or as a `lax.map` of one VJP (`SEQUENTIAL`);
      "auto" is `default_strategy()`'s passes. The Jacobian is held, so
      `materialize=False` (the "streaming" name) is refused.
    chunk_size: rows per vmapped group with `Passes.CHUNKED`; None: the strategy's (8).
    has_aux: whether `apply_fn` also returns auxiliary data.

  Returns:
    (chunk_losses, jacobian), and with `has_aux` also the aux of every chunk stacked on a
    leading axis of size n: chunk_losses of shape (k, n); jacobian a pytree with the
    structure of the shared parameters (None elsewhere) and leaves of shape (k, n, *leaf).
  """
  strategy = resolve(strategy, chunk_size=chunk_size, name="task_jacobian")
  mask = _tree.resolve_mask(shared, params)
  shared_params, rest = _tree.split(params, mask)
  with_aux = apply_fn if has_aux else (lambda p, b: (apply_fn(p, b), None))

  def of_shared(sp, b):
    return with_aux(_tree.merge(sp, rest, mask), b)

  if strategy.passes is Passes.VMAP:
    chunks = _tree.split_batch(batch, num_chunks)

    def losses_and_aux(sp, c):
      losses, aux = of_shared(sp, c)
      return losses, (losses, aux)

    jac, (losses, aux) = jax.vmap(jax.jacrev(losses_and_aux, has_aux=True),
                                  in_axes=(None, 0))(shared_params, chunks)  # (n, k, ..)
    _tree.check_losses(losses[0], where="apply_fn")
    jac = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), jac)
    return (losses.T, jac, aux) if has_aux else (losses.T, jac)
  fn = chunk_loss_fn(of_shared, batch, num_chunks, has_aux=True)
  flat, vjp_fn, (per_chunk, aux) = jax.vjp(fn, shared_params, has_aux=True)
  k = per_chunk.shape[1]
  rows = pullback_rows(lambda c: vjp_fn(c)[0], flat.shape[0], flat.dtype, strategy=strategy)
  jac = jax.tree.map(lambda x: x.reshape((k, num_chunks) + x.shape[1:]), rows)
  return (per_chunk.T, jac, aux) if has_aux else (per_chunk.T, jac)


def jacobian_matrix(jacobian: PyTree) -> jax.Array:
  """Flattens a task Jacobian pytree (leaves (k, n, ...)) into a (k, n, P) array."""
  leaves = [x for x in jax.tree.leaves(jacobian)]
  k, n = leaves[0].shape[:2]
  return jnp.concatenate([x.reshape(k, n, -1) for x in leaves], axis=2)


def _block_dtype(jacobian: PyTree):
  """At least float32: the eigen-solvers have no float16/bfloat16 kernels, and half-precision
  sums of squares lose the small eigenvalues the weights depend on."""
  return jnp.promote_types(jnp.result_type(*jax.tree.leaves(jacobian)), jnp.float32)


def kernel_blocks(jacobian: PyTree) -> jax.Array:
  """All blocks K_ij = J_i J_j^T of the extended NTK, shape (k, k, n, n)."""
  k, n = jax.tree.leaves(jacobian)[0].shape[:2]
  dtype = _block_dtype(jacobian)
  blocks = jnp.zeros((k, k, n, n), dtype)
  for x in jax.tree.leaves(jacobian):
    x = x.reshape(k, n, -1).astype(dtype)
    blocks = blocks + jnp.einsum("iap,jbp->ijab", x, x, precision=_HIGHEST)
  return blocks


def diagonal_blocks(jacobian: PyTree) -> jax.Array:
  """The diagonal blocks K_ii = J_i J_i^T, shape (k, n, n), without forming the others."""
  leaves = jax.tree.leaves(jacobian)
  k, n = leaves[0].shape[:2]
  dtype = _block_dtype(jacobian)
  blocks = jnp.zeros((k, n, n), dtype)
  for x in leaves:
    x = x.reshape(k, n, -1).astype(dtype)
    blocks = blocks + jnp.einsum("iap,ibp->iab", x, x, precision=_HIGHEST)
  return blocks


def largest_eigenvalue(blocks: jax.Array, *, method: str = "auto",
                       power_iterations: int = 64) -> jax.Array:
  """Largest eigenvalue of each symmetric PSD block in a (k, n, n) stack.

  "eigh" is exact (`jnp.linalg.eigvalsh`); "power" runs a fixed number of power iterations
  from the all-ones vector (converges geometrically in lambda_2 / lambda_1; the estimate is
  a lower bound, exact when the top eigenvalue is well separated). "auto" uses eigh for
  n <= 256.
  """
  if method not in EIGEN_METHODS:
    raise ValueError(f"Unknown eigen method {method!r}: choose one of {EIGEN_METHODS}.")
  n = blocks.shape[-1]
  if n == 1:
    return blocks[..., 0, 0]
  if method == "eigh" or (method == "auto" and n <= 256):
    return jnp.linalg.eigvalsh(blocks)[..., -1]
  return _power_iteration(lambda v: jnp.einsum("...ab,...b->...a", blocks, v),
                          jnp.ones(blocks.shape[:-1], blocks.dtype), power_iterations)


def _power_iteration(matvec: Callable, v0: jax.Array, iterations: int) -> jax.Array:
  def body(_, v):
    w = matvec(v)
    return w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-30)

  v = jax.lax.fori_loop(0, iterations, body, v0 / jnp.linalg.norm(v0, axis=-1, keepdims=True))
  return jnp.sum(v * matvec(v), axis=-1)


def largest_eigenvalue_matrix_free(jacobian: PyTree, *, power_iterations: int = 64) -> jax.Array:
  """Largest eigenvalue of each K_ii = J_i J_i^T by power iteration on J_i, never forming K.

  Costs 2 * iterations products with the (n, P) rows; use it when n is large.
  """
  mat = jacobian_matrix(jacobian).astype(_block_dtype(jacobian))  # (k, n, P)

  def matvec(v):  # (k, n) -> (k, n)
    return jnp.einsum("kap,kp->ka", mat, jnp.einsum("kbp,kb->kp", mat, v))

  return _power_iteration(matvec, jnp.ones(mat.shape[:2], mat.dtype), power_iterations)


def block_eigenvalues(blocks: jax.Array) -> jax.Array:
  """All eigenvalues of each symmetric PSD block in a (..., n, n) stack, largest first.

  Round-off can make the smallest eigenvalues of a PSD block slightly negative; they are
  clipped at zero.
  """
  return jnp.maximum(jnp.linalg.eigvalsh(blocks)[..., ::-1], 0.0)


def effective_rank(spectrum: jax.Array) -> jax.Array:
  """Effective rank exp(H(p)) of each non-negative spectrum on the last axis.

  p_a = mu_a / sum_b mu_b and H is the Shannon entropy (natural log), so the effective rank
  runs from 1 (one direction holds all of the kernel) to n (a flat spectrum). An all-zero
  spectrum has effective rank 1.

  References:
    Roy, Vetterli, "The effective rank: a measure of effective dimensionality", EUSIPCO 2007.
  """
  mu = jnp.maximum(spectrum, 0.0)
  total = jnp.sum(mu, axis=-1, keepdims=True)
  p = mu / jnp.where(total > 0, total, 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
  return jnp.exp(entropy)


def spectrum_statistic(spectrum: jax.Array, statistic: str = "max", *,
                       top_r: int = 3) -> jax.Array:
  """The weighting statistic of each spectrum (last axis, largest eigenvalue first).

  With mu_1 >= ... >= mu_n >= 0 the eigenvalues of a task's block K_ii:

  - "max": mu_1, the paper's lambda_i.
  - "trace": sum_a mu_a = tr K_ii = sum_a ||J_ia||^2.
  - "top_r": (1 / r) sum_{a <= r} mu_a with r = min(top_r, n), the mean of the r largest.
  - "effective_rank": tr K_ii / erank(K_ii), erank = exp(entropy of mu / tr K_ii) (see
    `effective_rank`): the kernel's mass spread over its effective number of directions,
    i.e. the typical eigenvalue among the directions that carry the kernel. It lies between
    the mean eigenvalue tr / n (flat spectrum) and mu_1 (one dominant direction), and
    becomes a weight exactly as mu_1 does.

  For n = 1 every statistic is the block's single entry, ||g_i||^2.
  """
  check_statistic(statistic, top_r, "auto")
  mu = jnp.maximum(spectrum, 0.0)
  if statistic == "max":
    return mu[..., 0]
  if statistic == "trace":
    return jnp.sum(mu, axis=-1)
  if statistic == "top_r":
    return jnp.mean(mu[..., :min(int(top_r), mu.shape[-1])], axis=-1)
  return jnp.sum(mu, axis=-1) / effective_rank(mu)


def block_statistic(blocks: jax.Array, statistic: str = "max", *, top_r: int = 3,
                    eigen_method: str = "auto", power_iterations: int = 64) -> jax.Array:
  """The weighting statistic of each symmetric PSD block in a (k, n, n) stack.

  "max" is `largest_eigenvalue` (with `eigen_method`); "trace" needs no eigendecomposition;
  "top_r" and "effective_rank" take the whole spectrum (`jnp.linalg.eigvalsh`). See
  `spectrum_statistic` for the definitions.
  """
  check_statistic(statistic, top_r, eigen_method)
  if statistic == "max":
    return largest_eigenvalue(blocks, method=eigen_method, power_iterations=power_iterations)
  if statistic == "trace":
    return jnp.trace(blocks, axis1=-2, axis2=-1)
  return spectrum_statistic(block_eigenvalues(blocks), statistic, top_r=top_r)


def check_normalization(normalization: str) -> None:
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"Unknown normalization {normalization!r}: choose 'sum' (official "
                     "code) or 'mean' (paper).")


def weights_from_eigenvalues(eigenvalues: jax.Array, *, exponent: float = 0.5,
                             normalization: str = "sum",
                             floor: float = EIGENVALUE_FLOOR,
                             floored_weight: float | None = None) -> jax.Array:
  """NTKMTL task weights from the largest eigenvalue of each task's kernel block.

  normalization="sum" (the official code, default): w_i = (sum_j l_j / l_i) ** exponent.
  normalization="mean" (the paper): w_i = (mean_j l_j / l_i) ** exponent, exponent 0.5 gives
  the paper's sqrt. The two differ by the constant factor k ** exponent.

  Eigenvalues below `floor * sum_j lambda_j` (a task whose gradient is zero) are raised to
  that floor, so every weight is finite: such a task gets weight (1 / floor) ** exponent,
  which multiplies its zero gradient; `floored_weight` gives such tasks that weight instead
  (NTKMTL-SR uses 1, see `methods.ntkmtl.ntkmtl_sr`). If every eigenvalue is zero all weights
  are equal.
  """
  check_normalization(normalization)
  raw = jnp.asarray(eigenvalues)
  tiny = jnp.finfo(raw.dtype).tiny
  threshold = floor * jnp.sum(jnp.maximum(raw, 0.0))
  lam = jnp.maximum(raw, threshold + tiny)
  reference = jnp.sum(lam) if normalization == "sum" else jnp.mean(lam)
  weights = (reference / lam) ** exponent
  if floored_weight is None:
    return weights
  return jnp.where(raw <= threshold, jnp.asarray(floored_weight, weights.dtype), weights)


class NTKWeights(NamedTuple):
  """What `ntk_weights` returns.

  Attributes:
    weights: (k,) task weights.
    eigenvalues: (k,) largest eigenvalue of each diagonal block K_ii (with another
      `statistic`, that statistic of the block's spectrum: the numbers the weights came from).
    losses: (k, n) loss of each task on each chunk.
    blocks: (k, k, n, n) extended kernel blocks K_ij, when `return_blocks=True`.
    jacobian: pytree of (k, n, ...) rows over the shared parameters, when asked.
  """
  weights: jax.Array
  eigenvalues: jax.Array
  losses: jax.Array
  blocks: jax.Array | None = None
  jacobian: PyTree | None = None


def _check_ntk_arguments(apply_fn, params, shared) -> None:
  """Refuses what `ntk_weights` cannot differentiate, with the fix, before any tracing."""
  if not callable(apply_fn) and hasattr(apply_fn, "losses_at"):
    raise TypeError("ntk_weights takes apply_fn(params, batch) -> (k,), not a TaskFunctions: "
                    "pass fns.losses_at(model_state).")
  if _tree.takes_positional(apply_fn, 2) is False and _tree.takes_positional(apply_fn, 3):
    raise TypeError("ntk_weights calls apply_fn(params, batch), but apply_fn takes (params, "
                    "model_state, batch), a has_state=True loss such as TaskFunctions.loss_fn: "
                    "pass fns.losses_at(model_state), or lambda p, b: loss_fn(p, state, b)[0].")
  _tree.check_float_params(params, "ntk_weights")
  if shared is None:
    _tree.warn_all_shared("ntk_weights", "the kernel blocks, eigenvalues and weights are "
                          "taken over the heads' parameters too", stacklevel=4)


def ntk_weights(apply_fn: Callable, params: PyTree, batch: PyTree, *, num_chunks: int = 1,
                exponent: float = 0.5, normalization: str = "sum", shared: SharedSpec = None,
                strategy: Strategy | str = "auto", eigen_method: str = "auto",
                power_iterations: int = 64, return_blocks: bool = False,
                return_jacobian: bool = False, statistic: str = "max",
                top_r: int = 3) -> NTKWeights:
  """NTKMTL task weights from the extended NTK of a batch split into `num_chunks` chunks.

  Pure and jittable. `apply_fn(params, batch)` returns the k task losses (shape (k,)).

  For num_chunks = 1, K_ii is the scalar ||grad l_i||^2 (the official code's "lambda_i", a
  loss Jacobian rather than the paper's output Jacobian).

  Args:
    apply_fn: task losses `apply_fn(params, batch) -> (k,)`.
    params: the parameters.
    batch: pytree of arrays sharing a leading batch axis divisible by `num_chunks`.
    num_chunks: n, the number of chunks (rows of each J_i).
    exponent: the weight exponent (0.5 by default; 0.75 leans harder toward slow tasks).
    normalization: "sum" (code) or "mean" (paper), see `weights_from_eigenvalues`.
    shared: which parameters are shared: a pytree of bools (or a prefix of the parameters,
      as `optax.masked` takes), a function params -> mask (`shared_mask` builds one from
      parameter paths), True (all); None also means all, with an `AllSharedWarning` (once),
      since the heads' parameters then change the kernel.
    strategy: how the k*n backward passes loop, a `Strategy` or a name (see
      `task_jacobian`): "auto" (the backend's measured default, `default_strategy()`),
      "vmap" (jax.vmap(jax.jacrev), the reference), "unroll", "chunked" or "sequential".
      The Jacobian is held (`materialize=False` is refused).
    eigen_method: "auto", "eigh" (exact) or "power" (matrix-free power iteration on J_i).
    power_iterations: iterations of the power method.
    return_blocks: also return all blocks K_ij (k, k, n, n).
    return_jacobian: also return the Jacobian pytree.
    statistic: what each task's speed is read off its block's spectrum: "max" (the largest
      eigenvalue, the paper), "trace", "top_r" (mean of the `top_r` largest eigenvalues) or
      "effective_rank" (trace / effective rank); see `spectrum_statistic`. The weights are
      `(sum_j s_j / s_i) ** exponent` for any of them. With num_chunks = 1 they all equal
      ||g_i||^2.
    top_r: r for statistic="top_r" (at most n are used).

  Returns:
    An `NTKWeights`.
  """
  check_statistic(statistic, top_r, eigen_method)
  _check_ntk_arguments(apply_fn, params, shared)
  losses, jac = task_jacobian(apply_fn, params, batch, num_chunks=num_chunks, shared=shared,
                              strategy=resolve(strategy, name="ntk_weights"))
  eigenvalues = eigenvalues_from_jacobian(jac, eigen_method=eigen_method,
                                          power_iterations=power_iterations,
                                          statistic=statistic, top_r=top_r)
  weights = weights_from_eigenvalues(eigenvalues, exponent=exponent,
                                     normalization=normalization)
  return NTKWeights(weights=weights, eigenvalues=eigenvalues, losses=losses,
                    blocks=kernel_blocks(jac) if return_blocks else None,
                    jacobian=jac if return_jacobian else None)


def eigenvalues_from_jacobian(jacobian: PyTree, *, eigen_method: str = "auto",
                              power_iterations: int = 64, statistic: str = "max",
                              top_r: int = 3) -> jax.Array:
  """Largest eigenvalue of each diagonal block of the kernel of a (k, n, ...) Jacobian.

  With another `statistic` ("trace", "top_r", "effective_rank"), that statistic of each
  block's spectrum instead (see `spectrum_statistic`).
  """
  check_statistic(statistic, top_r, eigen_method)
  if statistic == "max" and eigen_method == "power":
    return largest_eigenvalue_matrix_free(jacobian, power_iterations=power_iterations)
  if statistic == "trace":  # sum_a ||J_ia||^2, without forming the blocks
    dtype = _block_dtype(jacobian)
    return sum(jnp.sum(x.reshape(x.shape[0], -1).astype(dtype) ** 2, axis=1)
               for x in jax.tree.leaves(jacobian))
  return block_statistic(diagonal_blocks(jacobian), statistic, top_r=top_r,
                         eigen_method=eigen_method, power_iterations=power_iterations)


def representation_eigenvalues(decode: Callable, params: PyTree, z: jax.Array, batch: PyTree,
                               *, num_chunks: int = 4) -> tuple[jax.Array, jax.Array]:
  """Largest eigenvalue of each task's NTK block taken at the shared representation z.

  `decode(params, z, batch) -> (k,)` losses from the representation (the task heads). The
  batch and z are split into `num_chunks` chunks; row a of J_i is d l_i(chunk a) / d z.
  Chunks touch disjoint rows of z, so K_ii(z) is diagonal with entries ||J_ia||^2 and its
  largest eigenvalue is their maximum. Gradients go through the heads only.

  Returns:
    (eigenvalues (k,), chunk_losses (k, n)).
  """
  z_chunks = _tree.split_batch(z, num_chunks)
  b_chunks = _tree.split_batch(batch, num_chunks)

  def chunk(zc, bc):
    losses, vjp_fn = jax.vjp(lambda zz: decode(params, zz, bc), zc)
    _tree.check_losses(losses, where="decode")
    rows = jax.vmap(vjp_fn)(jnp.eye(losses.shape[0], dtype=losses.dtype))
    return losses, jax.tree.map(lambda r: jnp.sum(
        r.reshape(r.shape[0], -1) ** 2, axis=1), rows)

  losses, sq = jax.vmap(chunk)(z_chunks, b_chunks)  # (n, k), pytree of (n, k)
  diag = sum(jax.tree.leaves(sq))  # (n, k): ||J_ia||^2
  return jnp.max(diag, axis=0), losses.T
