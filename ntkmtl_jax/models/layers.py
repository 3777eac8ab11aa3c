"""Layers shared by the benchmark networks: a BatchNorm that can keep PyTorch's running variance.

flax's `nn.BatchNorm` and PyTorch's `BatchNorm1d/2d` normalise a training batch alike (by its
mean and its biased variance) and keep running averages of the same form (flax's momentum
0.9 is torch's 0.1), but not of the same variance: flax averages the biased batch variance,
torch the unbiased one,

    running_var <- 0.9 * running_var + 0.1 * var_batch * n / (n - 1),

with n the number of values each channel's statistic is taken over (the batch for a 1-D
input (B, C), batch x positions for (B, H, W, C)). The networks of the authors' code (the
CelebA network, SegNet-MTAN) are PyTorch ones; `BatchNorm(unbiased_running_var=True)` keeps
their running variance, which evaluation-mode outputs use. At batch 256 on the CelebA
network's dense layers the running variance is then 256/255, 0.39 % larger after one update.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import module
from flax.linen.normalization import _canonicalize_axes, _compute_stats, _normalize


class BatchNorm(nn.BatchNorm):
  """`flax.linen.BatchNorm` with PyTorch's running variance as an option.

  Every field, the variables (`scale`, `bias` in "params"; `mean`, `var` in "batch_stats"),
  their initialisation, dtypes and outputs are flax's; with `unbiased_running_var=False` (the
  default) the layer is flax's own.

  Attributes:
    unbiased_running_var: keep the running average of the unbiased batch variance (PyTorch's
      BatchNorm) instead of the biased one (flax's). Only that update changes: the batch is
      normalised by its biased variance either way, as in both libraries. The correction is
      n / max(n - 1, 1), n the number of values reduced per feature (under `mask`, the masked
      count; with `axis_name`, summed over that axis). At n = 1 the batch variance is 0 and the
      factor 1, where PyTorch refuses to train.
  """

  unbiased_running_var: bool = False

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *, mask: jax.Array | None = None):
    """Normalises `x` as `flax.linen.BatchNorm.__call__` (same arguments)."""
    if not self.unbiased_running_var:
      return super().__call__(x, use_running_average, mask=mask)
    use_running_average = module.merge_param(
      "use_running_average", self.use_running_average, use_running_average
    )
    feature_axes = _canonicalize_axes(x.ndim, self.axis)
    reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
    feature_shape = [x.shape[ax] for ax in feature_axes]
    stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
    ra_mean = self.variable(
      "batch_stats", "mean", lambda s: jnp.zeros(s, stats_dtype), feature_shape
    )
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, stats_dtype), feature_shape)
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
      if not self.force_float32_reductions:
        mean, var = jnp.asarray(mean, self.param_dtype), jnp.asarray(var, self.param_dtype)
    else:
      initializing = self.is_initializing()
      mean, var = _compute_stats(
        x,
        reduction_axes,
        dtype=self.dtype,
        axis_name=self.axis_name if not initializing else None,
        axis_index_groups=self.axis_index_groups,
        use_fast_variance=self.use_fast_variance,
        mask=mask,
        force_float32_reductions=self.force_float32_reductions,
      )
      if not initializing:
        n = self._count(x, reduction_axes, mask)
        if isinstance(n, int):
          unbiased = var * (n / max(n - 1, 1))  # a weak-typed float: var's dtype stays
        else:
          unbiased = var * jnp.asarray(n / jnp.maximum(n - 1, 1), var.dtype)
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
    return _normalize(
      self,
      x,
      mean,
      var,
      reduction_axes,
      feature_axes,
      self.dtype,
      self.param_dtype,
      self.epsilon,
      self.use_bias,
      self.use_scale,
      self.bias_init,
      self.scale_init,
      self.force_float32_reductions,
    )

  def _count(self, x, reduction_axes, mask):
    """n: the number of values each feature's statistics are taken over (a Python int when
    it is static, else a float32 array)."""
    if mask is None:
      n = math.prod(x.shape[ax] for ax in reduction_axes)
    else:
      n = jnp.sum(jnp.broadcast_to(mask, x.shape), reduction_axes, dtype=jnp.float32)
    if self.axis_name is not None:
      n = jax.lax.psum(n, self.axis_name, axis_index_groups=self.axis_index_groups)
    return n
