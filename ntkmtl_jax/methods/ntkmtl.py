"""NTKMTL and NTKMTL-SR, the official NTKMTL step as a preset, and the shared-norm clip.

Both are `Weighting`s: task i's weight is `(sum_j lambda_j / lambda_i) ** exponent`, with
lambda_i the largest eigenvalue of task i's block of the extended NTK, taken over the shared
parameters (NTKMTL; for n = 1 chunk, ||g_i||^2) or at the shared representation
(NTKMTL-SR). The train step computes the eigenvalues (`Needs`), the rule here turns them
into weights.

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
from ntkmtl_jax._tree import SharedSpec
from ntkmtl_jax.methods import register
from ntkmtl_jax.methods._common import check_num_tasks
from ntkmtl_jax.method import Needs, TaskStats, Weighting


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


def _ntk_weights(num_tasks, exponent, normalization, eigenvalue_ema, scale_by_num_tasks,
                 source, floored_weight=None):

  def weights(stats: TaskStats, state: NTKMTLState):
    lam = getattr(stats, source)
    if lam is None:
      raise ValueError(f"NTKMTL needs the task statistic {source!r}.")
    k = lam.shape[0]
    if num_tasks is not None and k != num_tasks:
      raise ValueError(f"NTKMTL was built for {num_tasks} tasks, got statistics for {k}.")
    if eigenvalue_ema is not None:
      previous = jnp.where(state.count > 0, state.eigenvalues.astype(lam.dtype), lam)
      lam = eigenvalue_ema * previous + (1.0 - eigenvalue_ema) * lam
    w = kernel.weights_from_eigenvalues(lam, exponent=exponent, normalization=normalization,
                                        floored_weight=floored_weight)
    if scale_by_num_tasks:
      w = w * k
    return w, NTKMTLState(count=state.count + 1, weights=w.astype(state.weights.dtype),
                          eigenvalues=lam.astype(state.eigenvalues.dtype))

  return weights


def _check_hparams(exponent, eigenvalue_ema, num_tasks):
  if num_tasks is not None:
    check_num_tasks(num_tasks)
  if isinstance(exponent, bool) or not isinstance(exponent, (int, float)) or \
      not 0 < float(exponent) < float("inf"):
    raise ValueError(f"exponent must be a positive finite number, got {exponent!r}.")
  if eigenvalue_ema is not None and not 0.0 <= eigenvalue_ema < 1.0:
    raise ValueError(f"eigenvalue_ema must be in [0, 1), got {eigenvalue_ema}.")


def _init(num_tasks):

  def init_fn(params):
    del params
    k = num_tasks or 1
    return NTKMTLState(count=jnp.zeros([], jnp.int32), weights=jnp.ones(k, jnp.float32),
                       eigenvalues=jnp.zeros(k, jnp.float32))

  return init_fn


@register("ntkmtl", properties=("permutation_equivariant", "direction_scale_invariant"))
def ntkmtl(num_tasks: int, *, exponent: float = 0.5, normalization: str = "sum",
           num_chunks: int = 1, shared: SharedSpec = None, eigenvalue_ema: float | None = None,
           scale_by_num_tasks: bool = True, head_gradients: str = "sum",
           eigen_method: str = "auto", statistic: str = "max",
           top_r: int = 3) -> Weighting:
  """NTKMTL: weights tasks by the largest eigenvalue of their extended-NTK block.

  With `num_chunks=1` the kernel block of task i is the scalar ||g_i||^2 of its shared
  gradient (`Needs("sq_norms")`, the official code's form); with `num_chunks > 1` the step
  computes the eigenvalues of the k blocks of the extended NTK over n chunks
  (`Needs("kernel", n, ...)`, with `kernel.task_jacobian`); when calling `update` yourself,
  pass `eigenvalues=ntk_weights(..., num_chunks=n, statistic=...).eigenvalues`. Weights are
  `(sum_j lambda_j / lambda_i) ** exponent` ("sum", the code) or
  `(mean_j lambda_j / lambda_i) ** exponent` ("mean", the paper); the shared update is
  `sum_i w_i g_i`.

  Args:
    num_tasks: k.
    exponent: weight exponent, positive (0.5; the NYUv2 script uses 0.75).
    normalization: "sum" (code) or "mean" (paper).
    num_chunks: n, the rows of each task's Jacobian.
    shared: which parameters are shared: None (all), a pytree of bools or a function.
    eigenvalue_ema: if set, an EMA decay applied to the eigenvalues (off in the paper).
    scale_by_num_tasks: multiply the shared update by k, as the official code does (on by
      default, as for every method whose published code scales by k: MGDA, CAGrad,
      FairGrad); False gives the paper's formula.
    head_gradients: what non-shared parameters get: "sum" (plain sum of task gradients, as
      the official step) or "weighted".
    eigen_method: "auto", "eigh" or "power" for num_chunks > 1.
    statistic: what is read off each task's block spectrum in place of its largest
      eigenvalue, for num_chunks > 1: "max" (the paper), "trace", "top_r" (mean of the
      `top_r` largest eigenvalues) or "effective_rank" (trace / effective rank); see
      `kernel.spectrum_statistic`. With num_chunks = 1 every statistic is ||g_i||^2, so the
      option changes nothing there.
    top_r: r for statistic="top_r".

  Returns:
    A `Weighting` with state `NTKMTLState`.

  References:
    Qin et al., NTKMTL, NeurIPS 2025 (arXiv 2510.18258).
  """
  _check_hparams(exponent, eigenvalue_ema, num_tasks)
  kernel.check_normalization(normalization)
  needs = (Needs("sq_norms", eigen_method=eigen_method, statistic=statistic, top_r=top_r)
           if num_chunks == 1 else
           Needs("kernel", num_chunks, eigen_method=eigen_method, statistic=statistic,
                 top_r=top_r))
  source = "sq_norms" if needs.kind == "sq_norms" else "eigenvalues"
  return Weighting(
      name="ntkmtl", needs=needs,
      weights=_ntk_weights(num_tasks, exponent, normalization, eigenvalue_ema,
                           scale_by_num_tasks, source),
      init=_init(num_tasks), shared=shared, head_gradients=head_gradients,
      hparams=dict(exponent=exponent, normalization=normalization, num_chunks=num_chunks,
                   eigenvalue_ema=eigenvalue_ema, scale_by_num_tasks=scale_by_num_tasks,
                   eigen_method=eigen_method, statistic=statistic, top_r=top_r))


@register("ntkmtl_sr", properties=("permutation_equivariant", "direction_scale_invariant"))
def ntkmtl_sr(num_tasks: int, *, exponent: float = 0.5, normalization: str = "sum",
              num_chunks: int = 4, shared: SharedSpec = None,
              eigenvalue_ema: float | None = None,
              head_gradients: str = "weighted") -> Weighting:
  """NTKMTL-SR: NTKMTL with the kernel taken at the shared representation z.

  The eigenvalues come from `kernel.representation_eigenvalues` (per-task gradients through
  the heads only; `Needs("representation", n)`); the update is the gradient of
  `sum_i w_i l_i`, which the train step gets from one ordinary backward pass.

  A task whose kernel at z is zero (its loss does not reach the encoder: d l_i / d z = 0,
  eigenvalue below `kernel.EIGENVALUE_FLOOR` times the sum) gets weight 1: its shared
  gradient is zero whatever its weight, and its head keeps its ordinary gradient instead of
  the floor's large weight, which would blow the head up under the weighted head update.

  Args:
    num_tasks: k.
    exponent: as in `ntkmtl`.
    normalization: as in `ntkmtl`.
    eigenvalue_ema: as in `ntkmtl`.
    num_chunks: n, the number of chunks of the batch (official default 4; 2 on NYUv2).
    shared: which parameters are shared.
    head_gradients: "weighted" (the backward of the weighted loss, as the official code)
      or "sum".

  Returns:
    A `Weighting` with state `NTKMTLState`.

  References:
    Qin et al., NTKMTL, NeurIPS 2025 (arXiv 2510.18258), Section "NTKMTL-SR".
  """
  _check_hparams(exponent, eigenvalue_ema, num_tasks)
  kernel.check_normalization(normalization)
  return Weighting(
      name="ntkmtl_sr", needs=Needs("representation", num_chunks),
      weights=_ntk_weights(num_tasks, exponent, normalization, eigenvalue_ema, False,
                           "eigenvalues", floored_weight=1.0),
      init=_init(num_tasks), shared=shared, head_gradients=head_gradients,
      hparams=dict(exponent=exponent, normalization=normalization, num_chunks=num_chunks,
                   eigenvalue_ema=eigenvalue_ema))


def clip_shared_by_global_norm(max_norm: float, shared: SharedSpec = None
                               ) -> optax.GradientTransformation:
  """Clips the global norm of the shared parameters' update only (heads pass through).

  Args:
    max_norm: the largest global norm let through, positive (may be `math.inf`).
    shared: which parameters are shared (None: all).
  """
  if not max_norm > 0:  # also refuses NaN
    raise ValueError(f"max_norm must be positive, got {max_norm!r}; a non-positive norm "
                     "would zero or reverse the update.")
  if shared is None:
    return optax.clip_by_global_norm(max_norm)
  return optax.masked(optax.clip_by_global_norm(max_norm), shared)


def official_ntkmtl(num_tasks: int, shared: SharedSpec = None, *, exponent: float = 0.5,
                    max_norm: float = 1.0) -> tuple[Weighting, optax.GradientTransformation]:
  """The official NTKMTL step (n = 1): the method and the clipping that follows it.

  The shared update is `k * sum_i w_i g_i` with `w_i = (sum_j ||g_j||^2 / ||g_i||^2) **
  exponent`, its global norm clipped to `max_norm`; task heads get their plain, unweighted
  gradients. Give both to the train step, the clip first in the optimiser chain:

    method, clip = official_ntkmtl(k, shared)
    step = make_train_step(loss_fn, method, optax.chain(clip, optax.adam(3e-4)))

  or, by hand, `optax.chain(method.aggregator, clip, optax.adam(3e-4))` on stacked task
  gradients.
  """
  method = ntkmtl(num_tasks, exponent=exponent, shared=shared)  # its defaults are the code's
  return method, clip_shared_by_global_norm(max_norm, shared)
