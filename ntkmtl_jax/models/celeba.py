"""The CelebA network of the NTKMTL/FAMO experiments: 7 conv + BN, 2 dense (512), 40 heads."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import optax

from ntkmtl_jax.models.layers import BatchNorm
from ntkmtl_jax.models.multitask import LinearHeads, TaskFunctions, task_functions

NUM_ATTRIBUTES = 40
# (output channels, max-pool after) for the seven 3x3 convolutions.
_CONVS = tuple(zip((64, 128, 128, 256, 256, 512, 512),
                   (True, False, True, False, True, False, False)))  # fmt: skip


class CelebAEncoder(nn.Module):
  """Shared encoder: seven 3x3 convolutions with BatchNorm and ReLU (max-pool after the 1st,
  3rd and 5th), global average pooling, then two 512-unit dense layers with BatchNorm.

  Attributes:
    width: the dense layers' width.
    unbiased_running_var: every BatchNorm keeps the running average of the unbiased batch
      variance, the PyTorch convention of the authors' code; see
      `ntkmtl_jax.models.layers.BatchNorm`. False: flax's (the biased variance).
  """

  width: int = 512
  unbiased_running_var: bool = False

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = lambda: BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      unbiased_running_var=self.unbiased_running_var,
    )
    for features, pool in _CONVS:
      x = nn.relu(norm()(nn.Conv(features, (3, 3), padding=1, use_bias=False)(x)))
      if pool:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = jnp.mean(x, axis=(1, 2))
    for _ in range(2):
      x = nn.relu(norm()(nn.Dense(self.width, use_bias=False)(x)))
    return x


def attribute_losses(logits, batch):
  """Mean binary cross-entropy of each attribute: (B, 40) logits, batch["y"] in {0, 1}."""
  return jnp.mean(
    optax.sigmoid_binary_cross_entropy(logits, batch["y"].astype(logits.dtype)), axis=0
  )


def celeba_functions(
  num_tasks: int = NUM_ATTRIBUTES, *, unbiased_running_var: bool = False
) -> TaskFunctions:
  """The pure functions (loss_fn, encode, decode, ...) of the CelebA network.

  Args:
    num_tasks: the number of attributes (linear heads).
    unbiased_running_var: the BatchNorm layers keep the running average of the unbiased
      batch variance, the PyTorch convention of the authors' code; see
      `ntkmtl_jax.models.layers.BatchNorm`. Only the running statistics (and so the
      evaluation-mode outputs) change; the parameters and training-mode outputs do not.
  """
  encoder = CelebAEncoder(unbiased_running_var=unbiased_running_var)
  return task_functions(encoder, LinearHeads(num_tasks), attribute_losses)
