"""SegNet-MTAN (Liu et al., CVPR 2019) in flax, as the NYUv2 and Cityscapes benchmarks use it.

The network is a SegNet (five encoder stages with max-pooling, five decoder stages with
max-unpooling at the pooled positions, 3x3 convolutions + BatchNorm + ReLU, widths
64-128-256-512-512) and, for each task, a chain of soft-attention modules that reads the
SegNet's features at every stage and produces that task's decoder feature (64 channels at
full resolution). A small prediction head per task (3x3 conv, 1x1 conv) maps the decoder
feature to the task's output: class logits, depth (1 channel) or unit surface normals.

What is shared and what the representation z is:

- `MTANEncoder` (parameters under `"encoder"`) holds the SegNet, the attention-branch
  convolutions shared by all tasks (`encoder_block_att`, `decoder_block_att`) and every
  task's own attention modules (`encoder_att_t*`, `decoder_att_t*`). All of it counts as
  shared for the multi-task methods, as in the official code (whose `shared_parameters()`
  are all parameters except the prediction heads): task t's attention modules simply get
  zero gradient from the other tasks.
- `MTANHeads` (parameters under `"heads"`) holds the per-task prediction heads, the only
  task-specific parameters.
- The representation z that `encode` returns (and NTKMTL-SR differentiates) is the tuple of
  the per-task decoder features, z = (z_1, ..., z_k) with z_t of shape (B, H, W, 64): task t's
  loss depends on z_t only, so row a of J_t is d l_t(chunk a) / d z_t.

References:
  Liu, Johns, Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019;
  Qin et al., NTKMTL, NeurIPS 2025 (arXiv 2510.18258).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ntkmtl_jax.models.layers import BatchNorm
from ntkmtl_jax.models.multitask import TaskFunctions, task_functions

FILTERS = (64, 128, 256, 512, 512)
_conv_init = nn.initializers.xavier_normal()


def max_pool_with_argmax(x):
  """2x2/2 max-pooling that also returns the one-hot position of each maximum.

  Returns (pooled (B, H/2, W/2, C), one_hot (B, H/2, W/2, C, 4)); ties go to the first
  position in row-major order within the window, as PyTorch's `MaxPool2d(return_indices)`.
  """
  b, h, w, c = x.shape
  windows = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
  windows = windows.reshape(b, h // 2, w // 2, c, 4)
  position = jnp.argmax(windows, axis=-1)
  one_hot = jax.nn.one_hot(position, 4, dtype=x.dtype)
  return jnp.sum(windows * one_hot, axis=-1), jax.lax.stop_gradient(one_hot)


def max_unpool(x, one_hot):
  """Inverse of `max_pool_with_argmax`: each value goes back to its maximum's position."""
  b, h, w, c = x.shape
  y = (x[..., None] * one_hot).reshape(b, h, w, c, 2, 2).transpose(0, 1, 4, 2, 5, 3)
  return y.reshape(b, 2 * h, 2 * w, c)


def _align_corners_matrix(size_in: int, size_out: int) -> np.ndarray:
  """(size_out, size_in) linear interpolation weights with align_corners=True."""
  if size_in == 1:
    return np.ones((size_out, 1), np.float32)
  pos = np.arange(size_out) * (size_in - 1) / (size_out - 1)
  lo = np.clip(np.floor(pos).astype(int), 0, size_in - 2)
  frac = pos - lo
  m = np.zeros((size_out, size_in), np.float32)
  m[np.arange(size_out), lo] = 1.0 - frac
  m[np.arange(size_out), lo + 1] += frac
  return m


def upsample_bilinear(x, factor: int = 2):
  """Bilinear upsampling with align_corners=True (PyTorch's `F.interpolate` as MTAN uses it)."""
  _, h, w, _ = x.shape
  rows = jnp.asarray(_align_corners_matrix(h, h * factor), x.dtype)
  cols = jnp.asarray(_align_corners_matrix(w, w * factor), x.dtype)
  return jnp.einsum("Hh,bhwc,Ww->bHWc", rows, x, cols)


def _batch_norm(train: bool, unbiased_running_var: bool) -> BatchNorm:
  """PyTorch's BatchNorm2d defaults (momentum 0.1, eps 1e-5) in flax's terms."""
  return BatchNorm(
    use_running_average=not train,
    momentum=0.9,
    epsilon=1e-5,
    unbiased_running_var=unbiased_running_var,
  )


class ConvLayer(nn.Module):
  """3x3 convolution (with bias) + BatchNorm + ReLU, repeated `depth` times."""

  features: int
  depth: int = 1
  unbiased_running_var: bool = False  # see `MTANEncoder`

  @nn.compact
  def __call__(self, x, train: bool):
    for _ in range(self.depth):
      x = nn.Conv(self.features, (3, 3), padding=1, kernel_init=_conv_init)(x)
      x = nn.relu(_batch_norm(train, self.unbiased_running_var)(x))
    return x


class AttentionLayer(nn.Module):
  """MTAN attention mask: 1x1 conv + BN + ReLU, 1x1 conv + BN + sigmoid."""

  hidden: int
  features: int
  unbiased_running_var: bool = False  # see `MTANEncoder`

  @nn.compact
  def __call__(self, x, train: bool):
    bn = lambda: _batch_norm(train, self.unbiased_running_var)
    x = nn.relu(bn()(nn.Conv(self.hidden, (1, 1), kernel_init=_conv_init)(x)))
    return nn.sigmoid(bn()(nn.Conv(self.features, (1, 1), kernel_init=_conv_init)(x)))


class MTANEncoder(nn.Module):
  """SegNet + per-task attention branches; returns the k per-task decoder features.

  Attributes:
    num_tasks: k (3 on NYUv2, 2 on Cityscapes).
    filters: widths of the stages (64, 128, 256, 512, 512 in the paper's network: five
      stages). Fewer entries give a shallower network of the same design (for smoke tests:
      it compiles much faster); the image sides must be multiples of 2 ** len(filters).
    unbiased_running_var: every BatchNorm keeps the running average of the unbiased batch
      variance, the PyTorch convention of the authors' code; see
      `ntkmtl_jax.models.layers.BatchNorm`. False: flax's (the biased variance).
  """

  num_tasks: int = 3
  filters: Sequence[int] = FILTERS
  unbiased_running_var: bool = False

  @nn.compact
  def __call__(self, x, train: bool = True):
    f = tuple(self.filters)
    s = len(f)  # stages
    if x.shape[1] % 2**s or x.shape[2] % 2**s:
      raise ValueError(
        f"SegNet-MTAN pools {s} times: image height and width must be "
        f"multiples of {2**s}, got {x.shape[1:3]}."
      )
    last = s - 1
    unbiased = self.unbiased_running_var
    conv = lambda features, name, depth=1: ConvLayer(features, depth, unbiased, name=name)
    encoder_block = [conv(f[i], f"encoder_block_{i}") for i in range(s)]
    conv_block_enc = [conv(f[i], f"conv_block_enc_{i}", 1 if i < 2 else 2) for i in range(s)]
    # decoder_block[i] maps stage i+1's width down to stage i's (index 0 keeps f0).
    decoder_block = [conv(f[max(i - 1, 0)], f"decoder_block_{i}") for i in range(s)]
    conv_block_dec = [
      conv(f[max(i - 1, 0)], f"conv_block_dec_{i}", 1 if i < 2 else 2) for i in range(s)
    ]
    encoder_block_att = [conv(f[min(i + 1, last)], f"encoder_block_att_{i}") for i in range(s)]
    decoder_block_att = [
      conv(f[last] if i == last else f[max(i - 1, 0)], f"decoder_block_att_{i}") for i in range(s)
    ]

    # The shared SegNet.
    g_encoder, pooled, positions = [], [], []
    h = x
    for i in range(s):
      first = encoder_block[i](h, train)
      second = conv_block_enc[i](first, train)
      h, one_hot = max_pool_with_argmax(second)
      g_encoder.append((first, second))
      pooled.append(h)
      positions.append(one_hot)
    g_upsampled, g_decoder = [], []
    for i in range(s):
      up = max_unpool(h, positions[-i - 1])
      first = decoder_block[-i - 1](up, train)
      h = conv_block_dec[-i - 1](first, train)
      g_upsampled.append(up)
      g_decoder.append(h)

    # One attention branch per task.
    features = []
    for t in range(self.num_tasks):
      a = None
      for j in range(s):
        hidden = f[0] if j == 0 else f[j]
        mask_in = g_encoder[j][0] if j == 0 else jnp.concatenate([g_encoder[j][0], a], -1)
        mask = AttentionLayer(hidden, f[j], unbiased, name=f"encoder_att_t{t}_{j}")(mask_in, train)
        a = encoder_block_att[j](mask * g_encoder[j][1], train)
        a = nn.max_pool(a, (2, 2), strides=(2, 2))
      for j in range(s):
        a = decoder_block_att[-j - 1](upsample_bilinear(a), train)
        stage = last - j  # decoder_att index in the original code
        width = f[max(stage - 1, 0)]
        mask = AttentionLayer(width, width, unbiased, name=f"decoder_att_t{t}_{stage}")(
          jnp.concatenate([g_upsampled[j], a], -1), train
        )
        a = mask * g_decoder[j]
      features.append(a)
    return tuple(features)


class MTANHeads(nn.Module):
  """Per-task prediction heads: 3x3 conv then 1x1 conv to each task's channels.

  Attributes:
    output_channels: channels per task, e.g. (13, 1, 3) for NYUv2 segmentation, depth and
      normals. A task named "normal" in `task_kinds` gets unit-length outputs.
    task_kinds: "segmentation", "depth" or "normal" per task.
  """

  output_channels: Sequence[int] = (13, 1, 3)
  task_kinds: Sequence[str] = ("segmentation", "depth", "normal")

  @nn.compact
  def __call__(self, z):
    outputs = []
    for t, (channels, kind) in enumerate(zip(self.output_channels, self.task_kinds)):
      h = nn.Conv(
        z[t].shape[-1], (3, 3), padding=1, kernel_init=_conv_init, name=f"pred_task{t}_conv"
      )(z[t])
      out = nn.Conv(channels, (1, 1), kernel_init=_conv_init, name=f"pred_task{t}_out")(h)
      if kind == "normal":
        out = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
      outputs.append(out)
    return tuple(outputs)


def segmentation_loss(logits, labels):
  """Pixel cross-entropy over labelled pixels (label < 0 is ignored), as `nll_loss(-1)`."""
  valid = labels >= 0
  log_p = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(log_p, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
  return -jnp.sum(jnp.where(valid, picked, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def depth_loss(prediction, target):
  """L1 error over pixels with a depth (target != 0)."""
  valid = (jnp.sum(target, axis=-1, keepdims=True) != 0).astype(prediction.dtype)
  return jnp.sum(jnp.abs(prediction - target) * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def normal_loss(prediction, target):
  """1 - mean cosine between predicted and true normals over pixels with a normal."""
  valid = (jnp.sum(target, axis=-1, keepdims=True) != 0).astype(prediction.dtype)
  return 1.0 - jnp.sum(prediction * target * valid) / jnp.maximum(jnp.sum(valid[..., 0]), 1.0)


_LOSSES = {
  "segmentation": ("label", segmentation_loss),
  "depth": ("depth", depth_loss),
  "normal": ("normal", normal_loss),
}


def mtan_functions(
  num_classes: int = 13,
  tasks: Sequence[str] = ("segmentation", "depth", "normal"),
  filters: Sequence[int] = FILTERS,
  *,
  unbiased_running_var: bool = False,
) -> TaskFunctions:
  """The pure functions of SegNet-MTAN for the given tasks.

  The batch holds `image` (B, H, W, 3) and, per task, `label` (B, H, W) int (-1 = ignore),
  `depth` (B, H, W, 1) and `normal` (B, H, W, 3).

  Args:
    num_classes: the segmentation classes.
    tasks: "segmentation", "depth" and/or "normal", in the order of the losses.
    filters: the stages' widths (see `MTANEncoder`).
    unbiased_running_var: the BatchNorm layers keep the running average of the unbiased
      batch variance, the PyTorch convention of the authors' code; see
      `ntkmtl_jax.models.layers.BatchNorm`. Only the running statistics (and so the
      evaluation-mode outputs) change; the parameters and training-mode outputs do not.
  """
  tasks = tuple(tasks)
  channels = tuple({"segmentation": num_classes, "depth": 1, "normal": 3}[t] for t in tasks)

  def task_losses(outputs, batch):
    return jnp.stack([_LOSSES[t][1](out, batch[_LOSSES[t][0]]) for t, out in zip(tasks, outputs)])

  return task_functions(
    MTANEncoder(len(tasks), tuple(filters), unbiased_running_var),
    MTANHeads(channels, tasks),
    task_losses,
    input_key="image",
  )
