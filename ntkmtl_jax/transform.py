"""NTKMTL and NTKMTL-SR as optax transforms, and the official NTKMTL step as a preset.

References:
  Qin, Wang, Liao, Yan, "NTKMTL: Mitigating Task Imbalance in Multi-Task Learning from
  Neural Tangent Kernel Perspective", NeurIPS 2025 (arXiv 2510.18258).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ntkmtl_jax import kernel
from ntkmtl_jax.aggregator import TaskAggregator, TaskStats, weighted_aggregator
from ntkmtl_jax._tree import SharedSpec


class NTKMTLState(NamedTuple):
  """State of `ntkmtl` and `ntkmtl_sr`.

  Attributes:
    count: number of updates made.
    weights: the last coefficients applied to the shared task gradients (after the
      num_tasks factor, when `scale_by_num_tasks`), for diagnostics.
    eigenvalues: the last eigenvalues used (after the EMA, when one is set); with another
      `statistic` than "max", the last values of that statistic.
  """
  count: jax.Array
  weights: jax.Array
  eigenvalues: jax.Array


def _ntk_weighting(num_tasks, exponent, normalization, eigenvalue_ema, scale_by_num_tasks,
                   source):

  def weighting(stats: TaskStats, state: NTKMTLState):
    lam = getattr(stats, source)
    if lam is None:
      raise ValueError(f"NTKMTL needs the task statistic {source!r}.")
    k = lam.shape[0]
    if num_tasks is not None and k != num_tasks:
      raise ValueError(f"NTKMTL was built for {num_tasks} tasks, got statistics for {k}.")
    if eigenvalue_ema is not None:
      previous = jnp.where(state.count > 0, state.eigenvalues.astype(lam.dtype), lam)
      lam = eigenvalue_ema * previous + (1.0 - eigenvalue_ema) * lam
    w = kernel.weights_from_eigenvalues(lam, exponent=exponent, normalization=normalization)
    if scale_by_num_tasks:
      w = w * k
    return w, NTKMTLState(count=state.count + 1, weights=w.astype(state.weights.dtype),
                          eigenvalues=lam.astype(state.eigenvalues.dtype))

  return weighting


def _init(num_tasks):

  def init_fn(params):
    del params
    k = num_tasks or 1
    return NTKMTLState(count=jnp.zeros([], jnp.int32), weights=jnp.ones(k, jnp.float32),
                       eigenvalues=jnp.zeros(k, jnp.float32))

  return init_fn


def ntkmtl(num_tasks: int, *, exponent: float = 0.5, normalization: str = "sum",
           num_chunks: int = 1, shared: SharedSpec = None, eigenvalue_ema: float | None = None,
           scale_by_num_tasks: bool = False, head_gradients: str = "sum",
           eigen_method: str = "auto", statistic: str = "max",
           top_r: int = 3) -> TaskAggregator:
  """NTKMTL: weights tasks by the largest eigenvalue of their extended-NTK block.

  With `num_chunks=1` the kernel block of task i is the scalar ||g_i||^2 of its shared
  gradient (computed from the stacked task gradients, the official code's form); with
  `num_chunks > 1` pass the eigenvalues from `ntk_weights` as the extra argument
  `eigenvalues=` (the train step does this for you). Weights are
  `(sum_j lambda_j / lambda_i) ** exponent` ("sum", the code) or
  `(mean_j lambda_j / lambda_i) ** exponent` ("mean", the paper); the shared update is
  `sum_i w_i g_i`.

  Args:
    num_tasks: k.
    exponent: weight exponent (0.5; the NYUv2 script uses 0.75).
    normalization: "sum" (code) or "mean" (paper).
    num_chunks: n, the rows of each task's Jacobian.
    shared: which parameters are shared: None (all), a pytree of bools or a function.
    eigenvalue_ema: if set, an EMA decay applied to the eigenvalues (off in the paper).
    scale_by_num_tasks: multiply the shared update by k, as the official code does.
    head_gradients: what non-shared parameters get: "sum" (plain sum of task gradients, as
      the official step) or "weighted".
    eigen_method: "auto", "eigh" or "power" for num_chunks > 1.
    statistic: what is read off each task's block spectrum in place of its largest
      eigenvalue, for num_chunks > 1: "max" (the paper), "trace", "top_r" (mean of the
      `top_r` largest eigenvalues) or "effective_rank" (trace / effective rank); see
      `kernel.spectrum_statistic`. The train step computes it (recorded in
      `options["statistic"]`); when calling `update` yourself, pass
      `eigenvalues=ntk_weights(..., statistic=...).eigenvalues`. With num_chunks = 1 every
      statistic is ||g_i||^2, so the option changes nothing there.
    top_r: r for statistic="top_r".

  Returns:
    A `TaskAggregator` with state `NTKMTLState`.

  References:
    Qin et al., NTKMTL, NeurIPS 2025 (arXiv 2510.18258).
  """
  kernel._check_statistic(statistic, top_r, eigen_method)
  if exponent <= 0:
    raise ValueError(f"exponent must be positive, got {exponent}.")
  if eigenvalue_ema is not None and not 0.0 <= eigenvalue_ema < 1.0:
    raise ValueError(f"eigenvalue_ema must be in [0, 1), got {eigenvalue_ema}.")
  needs, source = ("sq_norms", "sq_norms") if num_chunks == 1 else ("kernel", "eigenvalues")
  return weighted_aggregator(
      "ntkmtl", needs,
      _ntk_weighting(num_tasks, exponent, normalization, eigenvalue_ema, scale_by_num_tasks,
                     source),
      _init(num_tasks), shared=shared, head_gradients=head_gradients, num_chunks=num_chunks,
      exponent=exponent, normalization=normalization, eigen_method=eigen_method,
      scale_by_num_tasks=scale_by_num_tasks, eigenvalue_ema=eigenvalue_ema,
      statistic=statistic, top_r=top_r)


def ntkmtl_sr(num_tasks: int, *, exponent: float = 0.5, normalization: str = "sum",
              num_chunks: int = 4, shared: SharedSpec = None,
              eigenvalue_ema: float | None = None,
              head_gradients: str = "weighted") -> TaskAggregator:
  """NTKMTL-SR: NTKMTL with the kernel taken at the shared representation z.

  The eigenvalues come from `kernel.representation_eigenvalues` (per-task gradients through
  the heads only) and are passed as `eigenvalues=`; the update is the gradient of
  `sum_i w_i l_i`, which the train step gets from one ordinary backward pass.

  Args:
    num_tasks: k.
    exponent, normalization, eigenvalue_ema: as in `ntkmtl`.
    num_chunks: n, the number of chunks of the batch (official default 4; 2 on NYUv2).
    shared: which parameters are shared.
    head_gradients: "weighted" (the backward of the weighted loss, as the official code)
      or "sum".

  Returns:
    A `TaskAggregator` with state `NTKMTLState`.

  References:
    Qin et al., NTKMTL, NeurIPS 2025 (arXiv 2510.18258), Section "NTKMTL-SR".
  """
  return weighted_aggregator(
      "ntkmtl_sr", "representation",
      _ntk_weighting(num_tasks, exponent, normalization, eigenvalue_ema, False, "eigenvalues"),
      _init(num_tasks), shared=shared, head_gradients=head_gradients, num_chunks=num_chunks,
      exponent=exponent, normalization=normalization, eigenvalue_ema=eigenvalue_ema)


def clip_shared_by_global_norm(max_norm: float, shared: SharedSpec = None
                               ) -> optax.GradientTransformation:
  """Clips the global norm of the shared parameters' update only (heads pass through)."""
  if shared is None:
    return optax.clip_by_global_norm(max_norm)
  return optax.masked(optax.clip_by_global_norm(max_norm), shared)


def official_ntkmtl(num_tasks: int, shared: SharedSpec = None, *, exponent: float = 0.5,
                    max_norm: float = 1.0) -> tuple[TaskAggregator, optax.GradientTransformation]:
  """The official NTKMTL step (n = 1): the aggregator and the clipping that follows it.

  The shared update is `k * sum_i w_i g_i` with `w_i = (sum_j ||g_j||^2 / ||g_i||^2) **
  exponent`, its global norm clipped to `max_norm`; task heads get their plain, unweighted
  gradients. Chain them before your optimiser:

    agg, clip = official_ntkmtl(k, shared)
    tx = optax.chain(agg, clip, optax.adam(3e-4))
  """
  agg = ntkmtl(num_tasks, exponent=exponent, normalization="sum", shared=shared,
               scale_by_num_tasks=True, head_gradients="sum")
  return agg, clip_shared_by_global_norm(max_norm, shared)
