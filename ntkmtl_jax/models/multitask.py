"""From a flax encoder and task heads to `loss_fn`, `encode`, `decode` and the shared mask.

A multi-task model here is an `encoder` (shared, may hold mutable collections such as
`batch_stats`) and `heads` (task-specific, stateless), with parameters
`{"encoder": ..., "heads": ...}`. `task_functions` returns the pure functions that
`make_train_step` takes, with `has_state=True` conventions; `nnx_multitask.nnx_task_functions`
does the same for a Flax NNX model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax

PyTree = Any


class TaskFunctions(NamedTuple):
  """Pure functions of a multi-task model.

  Attributes:
    loss_fn: `(params, model_state, batch) -> ((k,) losses, new_model_state)`.
    encode: `(params, model_state, batch) -> (z, new_model_state)`.
    decode: `(params, z, batch) -> (k,) losses`.
    predict: `(params, model_state, batch) -> head outputs`, in inference mode.
    shared: `params -> mask` marking the encoder's parameters as shared.
    init: `(key, batch) -> (params, model_state)`.
  """

  loss_fn: Callable
  encode: Callable
  decode: Callable
  predict: Callable
  shared: Callable
  init: Callable

  def losses_at(self, model_state: PyTree = None) -> Callable:
    """`(params, batch) -> (k,)` losses at a fixed `model_state` (the new state dropped):
    the `apply_fn` that `ntk_weights`, `task_jacobian` and `spectra.task_spectra` take."""
    return lambda params, batch: self.loss_fn(params, model_state, batch)[0]


def shared_encoder_mask(params: PyTree) -> PyTree:
  """Mask with True on `params["encoder"]` and False on everything else."""
  return {
    name: jax.tree.map(lambda _, shared=name == "encoder": shared, sub)
    for name, sub in params.items()
  }


def task_functions(
  encoder: nn.Module,
  heads: nn.Module,
  task_losses: Callable[[Any, PyTree], jax.Array],
  *,
  input_key: str = "x",
) -> TaskFunctions:
  """Builds the pure functions of a model made of `encoder` and `heads`.

  Args:
    encoder: a flax module `encoder(x, train: bool)`; its mutable collections (if any) are
      the model state.
    heads: a flax module `heads(z)` returning the task outputs.
    task_losses: `task_losses(outputs, batch) -> (k,)` losses from the head outputs.
    input_key: the batch entry fed to the encoder.
  """

  def encode(params, model_state, batch):
    variables = {"params": params["encoder"], **(model_state or {})}
    if model_state:
      z, updates = encoder.apply(variables, batch[input_key], train=True, mutable=list(model_state))
      return z, {**model_state, **updates}
    return encoder.apply(variables, batch[input_key], train=True), model_state

  def decode(params, z, batch):
    return task_losses(heads.apply({"params": params["heads"]}, z), batch)

  def loss_fn(params, model_state, batch):
    z, new_state = encode(params, model_state, batch)
    return decode(params, z, batch), new_state

  def predict(params, model_state, batch):
    variables = {"params": params["encoder"], **(model_state or {})}
    z = encoder.apply(variables, batch[input_key], train=False)
    return heads.apply({"params": params["heads"]}, z)

  def init(key, batch):
    k1, k2 = jax.random.split(key)
    variables = encoder.init(k1, batch[input_key], train=False)
    enc_params = variables.pop("params")
    z = encoder.apply({"params": enc_params, **variables}, batch[input_key], train=False)
    head_params = heads.init(k2, z)["params"]
    return {"encoder": enc_params, "heads": head_params}, (dict(variables) or None)

  return TaskFunctions(loss_fn, encode, decode, predict, shared_encoder_mask, init)


class LinearHeads(nn.Module):
  """k linear heads on a shared feature, stored as one (features, k * outputs) kernel."""

  num_tasks: int
  outputs_per_task: int = 1

  @nn.compact
  def __call__(self, z):
    kernel = self.param(
      "kernel",
      nn.initializers.lecun_normal(),
      (z.shape[-1], self.num_tasks * self.outputs_per_task),
    )
    bias = self.param("bias", nn.initializers.zeros, (self.num_tasks * self.outputs_per_task,))
    out = z @ kernel + bias
    return (
      out.reshape(z.shape[:-1] + (self.num_tasks, self.outputs_per_task)).squeeze(-1)
      if self.outputs_per_task == 1
      else out.reshape(z.shape[:-1] + (self.num_tasks, self.outputs_per_task))
    )
