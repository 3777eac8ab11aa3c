"""Impartial closed forms: updates that treat every task direction alike, from the Gram matrix.

IMTL-G makes the update's projections on every unit task gradient equal; ConFIG makes its
cosine with every task gradient equal (the pseudo-inverse of the unit gradients);
Aligned-MTL sums the task gradients after aligning them to orthogonal directions of equal
norm (condition number one). Each is a closed form (a k x k linear solve, pseudo-inverse
or eigen-decomposition) read off the Gram matrix G_ij = <g_i, g_j> (`Needs("gram")`), so the
train step can use the "streaming" strategy; all run at full matmul precision.
"""

from __future__ import annotations

from typing import NamedTuple
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from ntkmtl_jax._tree import SharedSpec
from ntkmtl_jax.methods import register
from ntkmtl_jax.methods._common import (EPS, check_num_tasks, conflicting_pairs, full_precision,
                                        gram_of, initial_state, normalized, preference_vector)
from ntkmtl_jax.method import Needs, TaskStats, Weighting

# --------------------------------------------------------------------------------- IMTL-G


class IMTLGState(NamedTuple):
  """State of `imtl_g`.

  Attributes:
    count: number of updates made.
    weights: the last weights applied to the task gradients.
    conflicts: conflicting pairs (G_ij < 0, i < j) at the last step.
    solver_failures: steps so far whose linear system was singular to working precision
      (smallest singular value below sqrt(eps) of the largest; solved with a 1e-8 ridge
      instead, as the reference code does).
  """
  count: jax.Array
  weights: jax.Array
  conflicts: jax.Array
  solver_failures: jax.Array


def imtl_g_weights(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
  """IMTL-G's closed form on the Gram matrix; returns (weights summing to 1, singular).

  With u_i = g_i / ||g_i||, D the rows g_1 - g_i and U the rows u_1 - u_i (i = 2..k), the
  weights are a_{2:k} = g_1 U^T (D U^T)^{-1}, a_1 = 1 - sum a_{2:k}; then d = sum a_i g_i
  has equal projections on every u_i. Every inner product is read off G.
  """
  k = gram.shape[0]
  if k == 1:
    return jnp.ones(1, gram.dtype), jnp.array(False)
  a = normalized(gram)
  # A zero gradient has no unit vector (u_j = 0 there; the system is then singular).
  diag = jnp.diagonal(a)
  norms = jnp.sqrt(jnp.where(diag > 0, diag, 1.0))
  g_u = jnp.where(diag[None, :] > 0, a / norms[None, :], 0.0)  # g_u[i, j] = <g_i, u_j>
  first = g_u[0, 0] - g_u[0, 1:]  # <g_1, u_1 - u_j>
  # <g_1 - g_i, u_1 - u_j>
  system = (g_u[0, 0] - g_u[0, 1:][None, :] - g_u[1:, 0][:, None] + g_u[1:, 1:])
  rest = jnp.linalg.solve(system.T, first)
  # Singular to working precision (a zero, duplicated or dependent gradient: D U^T has a
  # zero row or column, and the solve returns large finite garbage rather than inf): the
  # smallest singular value below sqrt(eps) of the system's scale, the largest singular value
  # or the largest gradient norm (its entries are <g, u> ~ ||g||); with two tasks the system
  # is 1 x 1 and only the norm tells a near-parallel pair, where it is ~ ||g|| angle^2.
  singular_values = jnp.linalg.svd(system, compute_uv=False)
  scale = jnp.maximum(singular_values[0], jnp.max(norms))
  singular = ((singular_values[-1] <= jnp.sqrt(jnp.finfo(a.dtype).eps) * scale)
              | ~jnp.all(jnp.isfinite(rest)))
  ridge = jnp.linalg.solve(system.T + EPS * jnp.eye(k - 1, dtype=a.dtype), first)
  rest = jnp.where(singular, ridge, rest)
  return jnp.concatenate([1.0 - jnp.sum(rest, keepdims=True), rest]), singular


@register("imtl_g", properties=("permutation_equivariant",))
def imtl_g(num_tasks: int, *, shared: SharedSpec = None,
           head_gradients: str = "weighted") -> Weighting:
  """IMTL-G: the update whose projections on every unit task gradient are equal.

  Closed form (`imtl_g_weights`), weights summing to one, from the Gram matrix.

  Args:
    num_tasks: k.
    shared: which parameters are shared.
    head_gradients: "weighted" (the backward of the weighted loss, as the reference code)
      or "sum".

  Returns:
    A `Weighting` (needs "gram") with state `IMTLGState`.

  References:
    Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, "Towards Impartial Multi-task Learning",
    ICLR 2021.
  """
  check_num_tasks(num_tasks)

  @full_precision
  def weighting(stats: TaskStats, state: IMTLGState):
    gram = gram_of(stats, "imtl_g", num_tasks)
    weights, singular = imtl_g_weights(gram)
    return weights, IMTLGState(state.count + 1, weights.astype(jnp.float32),
                               conflicting_pairs(gram),
                               state.solver_failures + singular.astype(jnp.int32))

  init = lambda params: initial_state(IMTLGState, num_tasks)
  return Weighting(name="imtl_g", needs=Needs("gram"), init=init, weights=weighting,
                   shared=shared, head_gradients=head_gradients)


# ---------------------------------------------------------------------------- Aligned-MTL

_ALIGNED_SCALES = ("min", "median", "rmse")


class AlignedMTLState(NamedTuple):
  """State of `aligned_mtl`.

  Attributes:
    count: number of updates made.
    weights: the last weights applied to the task gradients.
    conflicts: conflicting pairs (G_ij < 0, i < j) at the last step.
    condition_number: sqrt(lambda_max / lambda_min) of the Gram matrix on its numerical
      range at the last step (the condition number of the gradient matrix, which the
      alignment brings to 1).
    rank: numerical rank of the Gram matrix at the last step.
  """
  count: jax.Array
  weights: jax.Array
  conflicts: jax.Array
  condition_number: jax.Array
  rank: jax.Array


@full_precision
def aligned_mtl_transform(gram: jax.Array, scale_mode: str = "min",
                          rcond: float | None = None
                          ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Aligned-MTL's balance matrix B, from the Gram matrix; returns (B, condition, rank).

  With G = V diag(lambda) V^T restricted to the eigenvalues above lambda_max times `rcond`
  (the numerical rank r; default k times float32's eps, the authors' code, which takes the
  eigenvalues of G cast to float32, whatever the dtype here: a cutoff at k times float64's
  eps would sit at the rounding of the eigenvalues, and the rank, with the answer, would
  change with the last bits of G), B = sqrt(s) V diag(lambda)^(-1/2) V^T, s the smallest
  kept eigenvalue
  ("min"), their lower median ("median") or their mean ("rmse"). The aligned gradients
  J^T B (column i: sum_l B_li g_l) are orthogonal with equal norms sqrt(s): their Gram
  matrix is B G B = s V V^T. When every eigenvalue is below the threshold (G = 0), B is the
  identity, as the authors' code.
  """
  k = gram.shape[0]
  a = normalized(gram)  # B does not change when G is scaled
  eigenvalues, vectors = jnp.linalg.eigh(0.5 * (a + a.T))
  if rcond is None:
    rcond = k * float(jnp.finfo(jnp.float32).eps)
  threshold = jnp.max(eigenvalues) * rcond
  keep = eigenvalues > threshold
  rank = jnp.sum(keep).astype(jnp.int32)
  kept = jnp.where(keep, eigenvalues, jnp.inf)
  if scale_mode == "min":
    scale = jnp.min(kept)
  elif scale_mode == "median":
    # Sorted, the r kept eigenvalues come first (the others are inf): the lower median.
    scale = jnp.sort(kept)[jnp.clip((rank - 1) // 2, 0, k - 1)]
  else:
    scale = jnp.sum(jnp.where(keep, eigenvalues, 0.0)) / jnp.maximum(rank, 1)
  inv_sqrt = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, eigenvalues, 1.0)), 0.0)
  balance = jnp.sqrt(scale) * (vectors * inv_sqrt[None, :]) @ vectors.T
  balance = jnp.where(rank > 0, balance, jnp.eye(k, dtype=a.dtype))
  condition = jnp.sqrt(jnp.max(eigenvalues) / jnp.min(kept))
  return balance, condition, rank


@register("aligned_mtl", properties=("permutation_equivariant",))
def aligned_mtl(num_tasks: int, *, scale_mode: str = "min",
                pref_vector: Sequence[float] | None = None, rcond: float | None = None,
                shared: SharedSpec = None, head_gradients: str = "sum") -> Weighting:
  """Aligned-MTL: sums the task gradients after aligning them to condition number one.

  The gradient matrix is replaced by its nearest (Procrustes) matrix with orthogonal
  columns of equal norm, computed from the eigen-decomposition of the Gram matrix
  (`aligned_mtl_transform`), and the aligned gradients are summed with the preference
  weights (ones, as the authors' code; torchjd uses 1/k): the weights of the original task
  gradients are B u.

  Args:
    num_tasks: k.
    scale_mode: the common norm of the aligned gradients: sqrt of the smallest eigenvalue
      ("min", the paper and the authors' default), of the median one or of their mean
      ("rmse").
    pref_vector: the weights u of the aligned gradients (default ones).
    rcond: eigenvalues of G below rcond times the largest are dropped (default k times
      float32's eps, as the authors' code; see `aligned_mtl_transform`).
    shared: which parameters are shared.
    head_gradients: "sum" (task-specific parameters get their plain gradients, as the
      authors' code by default) or "weighted".

  Returns:
    A `Weighting` (needs "gram") with state `AlignedMTLState`.

  References:
    Senushkin, Patakin, Kuznetsov, Konushin, "Independent Component Alignment for
    Multi-Task Learning", CVPR 2023.
  """
  check_num_tasks(num_tasks)
  if scale_mode not in _ALIGNED_SCALES:
    raise ValueError(f"scale_mode must be one of {_ALIGNED_SCALES}, got {scale_mode!r}.")
  if rcond is not None and not 0 < rcond < 1:
    raise ValueError(f"rcond must lie in (0, 1) or be None, got {rcond}.")
  preference = preference_vector(pref_vector, num_tasks, 1.0)

  @full_precision
  def weighting(stats: TaskStats, state: AlignedMTLState):
    gram = gram_of(stats, "aligned_mtl", num_tasks)
    balance, condition, rank = aligned_mtl_transform(gram, scale_mode, rcond)
    weights = balance @ jnp.asarray(preference, balance.dtype)
    return weights, AlignedMTLState(state.count + 1, weights.astype(jnp.float32),
                                    conflicting_pairs(gram), condition.astype(jnp.float32),
                                    rank)

  init = lambda params: initial_state(AlignedMTLState, num_tasks,
                                      condition_number=jnp.ones([], jnp.float32))
  return Weighting(name="aligned_mtl", needs=Needs("gram"), init=init, weights=weighting,
                   shared=shared, head_gradients=head_gradients,
                   hparams=dict(scale_mode=scale_mode, rcond=rcond))


# --------------------------------------------------------------------------------- ConFIG


class ConFIGState(NamedTuple):
  """State of `config`.

  Attributes:
    count: number of updates made.
    weights: the last weights applied to the task gradients.
    conflicts: conflicting pairs (G_ij < 0, i < j) at the last step.
    cosine: the smallest cosine between the update and a (nonzero) task gradient at the
      last step; all are equal when the unit gradients are linearly independent.
    rank: numerical rank of the matrix of unit gradients at the last step.
  """
  count: jax.Array
  weights: jax.Array
  conflicts: jax.Array
  cosine: jax.Array
  rank: jax.Array


@full_precision
def config_weights(gram: jax.Array, rcond: float | None = None
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """ConFIG's update as coefficients of the task gradients; returns (weights, cosine, rank).

  With U the unit task gradients, the direction is g_v = pinv(U^T) 1 = U pinv(C) 1, C the
  cosine matrix U^T U: the minimum-norm vector with <g_v, u_i> = 1 for every i, so its
  cosine with every task gradient is the same positive number. Its unit vector e is then
  scaled by sum_i <g_i, e> (ConFIG's default projection length). pinv(C) keeps the
  eigenvalues of C above `rcond` times the largest (default sqrt(eps) of the dtype: 1.5e-8
  in float64, 3.5e-4 in float32); those of C are the squared singular values of U, so
  gradient directions dependent to about sqrt(rcond) (1.2e-4, 1.9e-2) are treated as
  dependent. The cutoff sits well above the rounding of C (about k eps): at k eps, as
  before, the numerical rank of exactly dependent gradients, and with it the answer,
  changed with the last bits of G.
  """
  dtype = gram.dtype
  a = normalized(gram)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(a), 0.0))
  nonzero = norms > 0
  safe = jnp.where(nonzero, norms, 1.0)
  cosines = jnp.where(nonzero[:, None] & nonzero[None, :], a / jnp.outer(safe, safe), 0.0)
  eigenvalues, vectors = jnp.linalg.eigh(0.5 * (cosines + cosines.T))
  cutoff = (jnp.sqrt(jnp.finfo(dtype).eps) if rcond is None else rcond) * jnp.max(eigenvalues)
  keep = eigenvalues > cutoff
  inverse = jnp.where(keep, 1.0 / jnp.where(keep, eigenvalues, 1.0), 0.0)
  alpha = vectors @ (inverse * (vectors.T @ jnp.where(nonzero, 1.0, 0.0)))
  # ||g_v|| >= 1 where the unit gradients admit <g_v, u_i> = 1 for all i; a least-squares
  # g_v of norm below sqrt(eps) is rounding (e.g. two opposite gradients: pinv gives 0,
  # there is no direction to take), and the update is 0.
  norm = jnp.sqrt(jnp.maximum(alpha @ (cosines @ alpha), 0.0))
  resolved = norm > jnp.sqrt(jnp.finfo(dtype).eps)
  inv_norm = jnp.where(resolved, 1.0 / jnp.where(resolved, norm, 1.0), 0.0)
  unit = jnp.where(nonzero, alpha / safe, 0.0) * inv_norm
  # sum_i <g_i, e> on the original scale: G = a * mean diagonal.
  length = jnp.sum(gram @ unit) / jnp.maximum(jnp.mean(jnp.diagonal(gram)),
                                              jnp.finfo(dtype).tiny)
  projections = (cosines @ alpha) * inv_norm
  # (0 where every gradient is zero: there is no cosine to take.)
  cosine = jnp.where(jnp.any(nonzero), jnp.min(jnp.where(nonzero, projections, jnp.inf)), 0.0)
  return length * unit, cosine, jnp.sum(keep).astype(jnp.int32)


@register("config", properties=("permutation_equivariant", "direction_scale_invariant",
                               "linear_under_scaling", "non_conflicting"))
def config(num_tasks: int, *, rcond: float | None = None, shared: SharedSpec = None,
           head_gradients: str = "sum") -> Weighting:
  """ConFIG: the conflict-free update with equal cosine to every task gradient.

  The direction solves <d, g_i / ||g_i||> = 1 for every task in the least-norm sense (the
  pseudo-inverse of the unit gradients), so it makes the same positive angle with every
  task gradient; its length is the sum of the task gradients' projections on it
  (`config_weights`). The pseudo-inverse is a combination of the unit gradients read off
  the Gram matrix (U pinv(U^T U) 1), so the method needs only G, where the authors' code
  calls a least-squares solver on the gradients.

  Args:
    num_tasks: k.
    rcond: relative cutoff on the eigenvalues of the cosine matrix (default sqrt(eps) of
      the dtype; see `config_weights`).
    shared: which parameters are shared.
    head_gradients: "sum" (task-specific parameters get their plain gradients) or
      "weighted".

  Returns:
    A `Weighting` (needs "gram") with state `ConFIGState`.

  References:
    Liu, Chu, Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural
    Networks", ICLR 2025.
  """
  check_num_tasks(num_tasks)
  if rcond is not None and not 0 < rcond < 1:
    raise ValueError(f"rcond must lie in (0, 1) or be None, got {rcond}.")

  @full_precision
  def weighting(stats: TaskStats, state: ConFIGState):
    gram = gram_of(stats, "config", num_tasks)
    weights, cosine, rank = config_weights(gram, rcond)
    return weights, ConFIGState(state.count + 1, weights.astype(jnp.float32),
                                conflicting_pairs(gram), cosine.astype(jnp.float32), rank)

  init = lambda params: initial_state(ConFIGState, num_tasks, cosine=jnp.ones([], jnp.float32))
  return Weighting(name="config", needs=Needs("gram"), init=init, weights=weighting,
                   shared=shared, head_gradients=head_gradients, hparams=dict(rcond=rcond))
