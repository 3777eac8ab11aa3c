"""What the method families share: argument checks, Gram-matrix helpers, full precision."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntkmtl_jax.method import TaskStats

# Added to norms before dividing by them (the reference implementations use 1e-8 too).
EPS = 1e-8


def full_precision(fn):
  """Traces `fn` with float32 matrix products at full precision.

  By default TPUs multiply float32 matrices in bfloat16 passes and recent GPUs may use
  TF32, both far coarser than the solvers' tolerances; the products here are k x k (or
  k x P once), so full precision costs nothing that matters. Every solver and every
  weights function that reads the Gram matrix is traced under it.
  """

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.default_matmul_precision("highest"):
      return fn(*args, **kwargs)

  return wrapped


def check_num_tasks(num_tasks) -> None:
  """Raises unless the factory argument `num_tasks` is a positive integer."""
  if isinstance(num_tasks, bool) or not isinstance(num_tasks, (int, np.integer)) or \
      num_tasks < 1:
    raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}.")


def check_solver_budget(max_iters, tol) -> None:
  """Raises unless an iterative solver's `max_iters` >= 1 and its tolerance `tol` > 0."""
  if max_iters < 1 or tol <= 0:
    raise ValueError(f"max_iters must be >= 1 and tol > 0, got {max_iters} and {tol}.")


def check_losses(stats: TaskStats, name: str, num_tasks: int) -> None:
  """Raises unless `stats` holds the losses of the `num_tasks` the method was built for."""
  if stats.losses is None:
    raise ValueError(f"{name} uses the task losses: pass them as "
                     "update(task_grads, state, params, losses=losses).")
  if stats.losses.shape != (num_tasks,):
    raise ValueError(f"{name} was built for {num_tasks} tasks but got losses of shape "
                     f"{stats.losses.shape}; build it with num_tasks={stats.losses.shape[0]}.")


def gram_of(stats: TaskStats, name: str, num_tasks: int) -> jax.Array:
  """The Gram matrix of `stats`, checked against the `num_tasks` the method was built for."""
  if stats.gram is None:
    raise ValueError(f"{name} computes its weights from the Gram matrix of the task "
                     "gradients: pass it as update(..., gram=gram) or let the method "
                     "compute it from the task gradients.")
  if stats.gram.shape != (num_tasks, num_tasks):
    raise ValueError(f"{name} was built for {num_tasks} tasks, got a Gram matrix of shape "
                     f"{stats.gram.shape}.")
  return stats.gram


def key_of(stats: TaskStats, name: str) -> jax.Array:
  """The PRNG key of `stats`, which stochastic methods need."""
  if stats.key is None:
    raise ValueError(f"{name} is stochastic: pass a PRNG key as update(..., key=key) "
                     "(make_train_step passes one every step).")
  return stats.key


def conflicting_pairs(gram: jax.Array) -> jax.Array:
  """Number of task pairs i < j whose gradients conflict (G_ij < 0), as int32."""
  k = gram.shape[0]
  upper = jnp.triu(jnp.ones((k, k), dtype=bool), 1)
  return jnp.sum((gram < 0) & upper).astype(jnp.int32)


def normalized(gram: jax.Array) -> jax.Array:
  """G divided by its mean diagonal; the methods' weights do not depend on this scale."""
  scale = jnp.mean(jnp.diagonal(gram))
  return gram / jnp.maximum(scale, jnp.finfo(gram.dtype).tiny)


class SolverState(NamedTuple):
  """State of the Gram weightings that run an iterative solver every step: MGDA, MGDA-UB,
  CAGrad (simplex solvers), UPGrad and DualProj (the active-set QP solver).

  Attributes:
    count: number of updates made.
    weights: the last coefficients of the task gradients in the update (after any
      rescaling).
    conflicts: conflicting pairs (G_ij < 0, i < j) at the last step.
    iterations: the solver's iterations at the last step (for UPGrad, the most over its k
      problems).
    solver_failures: steps so far whose solver reached its iteration bound before its
      tolerance; the last iterate, always feasible, was used anyway.
  """
  count: jax.Array
  weights: jax.Array
  conflicts: jax.Array
  iterations: jax.Array
  solver_failures: jax.Array


def zeros_int() -> jax.Array:
  return jnp.zeros([], jnp.int32)


def initial_state(state_cls, num_tasks: int, **fields):
  """A method state before its first step: unit weights, every other field a zero int32
  counter unless given in `fields`."""
  values = {"weights": jnp.ones(num_tasks, jnp.float32), **fields}
  return state_cls(**{f: values[f] if f in values else zeros_int() for f in state_cls._fields})


def preference_vector(pref_vector, num_tasks: int, default: float) -> np.ndarray:
  """The preference vector as a float64 NumPy array of shape (k,), checked (the methods
  cast it to the Gram matrix's dtype: 1/k rounded to float32 would cost a float64 Gram
  3e-8)."""
  if pref_vector is None:
    return np.full(num_tasks, default, np.float64)
  pref = np.asarray(pref_vector, np.float64)
  if pref.shape != (num_tasks,) or not np.all(np.isfinite(pref)) or np.any(pref < 0):
    raise ValueError(f"pref_vector must be {num_tasks} finite non-negative numbers, got "
                     f"{pref_vector!r}.")
  return pref


def method_optimizer(optimizer, learning_rate: float) -> optax.GradientTransformation:
  """The optimiser of a method's own parameters: `optimizer`, or Adam(`learning_rate`)."""
  return optax.adam(learning_rate) if optimizer is None else optimizer
