"""From a flax encoder and task heads to `loss_fn`, `encode`, `decode` and the shared mask.

A multi-task model here is an `encoder` (shared, may hold mutable collections such as
`batch_stats`) and `heads` (task-specific, stateless), with parameters
`{"encoder": ..., "heads": ...}`. `task_functions` returns the pure functions that
`make_train_step` takes, with `has_state=True` conventions, as one `TaskFunctions` object
that `make_train_step` takes whole; `nnx_multitask.nnx_task_functions` does the same for a
Flax NNX model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax

PyTree = Any


class TaskFunctions(NamedTuple):
  """Pure functions of a multi-task model, and how to call them.

  Give the object itself to `make_train_step` (or call `.train_step(method, optimizer)`):
  it takes `loss_fn`, `encode`, `decode` and `has_state` from it, and `shared` as the
  method's mask when the method was built without one.

  Attributes:
    loss_fn: `(params, model_state, batch) -> ((k,) losses, new_model_state)`.
    encode: `(params, model_state, batch) -> (z, new_model_state)`, or None.
    decode: `(params, z, batch) -> (k,) losses`, or None.
    predict: `(params, model_state, batch) -> head outputs`, in inference mode.
    shared: `params -> mask` marking the trunk's (encoder's) parameters as shared.
    init: `(key, batch) -> (params, model_state)`.
    has_state: whether `loss_fn` and `encode` take and return the model state (True for
      the functions `task_functions` and `nnx_task_functions` make).
  """

  loss_fn: Callable
  encode: Callable | None
  decode: Callable | None
  predict: Callable
  shared: Callable
  init: Callable
  has_state: bool = True

  def losses_at(self, model_state: PyTree = None) -> Callable:
    """`(params, batch) -> (k,)` losses at a fixed `model_state` (the new state dropped):
    the `apply_fn` that `ntk_weights`, `task_jacobian` and `spectra.task_spectra` take."""
    if not self.has_state:
      return self.loss_fn
    return lambda params, batch: self.loss_fn(params, model_state, batch)[0]

  def train_step(self, method, optimizer, **kwargs):
    """`make_train_step(self, method, optimizer, **kwargs)`: the jitted step of this model."""
    from ntkmtl_jax.step import make_train_step  # the step imports nothing of the models

    return make_train_step(self, method, optimizer, **kwargs)


def model_input(batch: PyTree, input_key: str, builder: str):
  """`batch[input_key]`, or an error naming the `input_key` option of `builder`."""
  if not isinstance(batch, Mapping):
    try:
      return batch[input_key]
    except (TypeError, KeyError, IndexError):
      raise TypeError(
        f"The batch is a {type(batch).__name__}, but {builder} reads the model input as "
        f"batch[{input_key!r}] (its input_key option): give batches as dicts, e.g. "
        f"{{{input_key!r}: inputs, ...}}."
      ) from None
  if input_key not in batch:
    raise KeyError(
      f"The batch has no entry {input_key!r}, which {builder} feeds to the model "
      f"(input_key={input_key!r}); its entries are {sorted(map(str, batch))}. Pass "
      f"{builder}(..., input_key=...) the name of the input entry."
    )
  return batch[input_key]


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
    input_key: the batch entry fed to the encoder; a batch without it raises an error
      naming this option.

  Returns:
    A `TaskFunctions` (`has_state=True`); give it to `make_train_step` as it is.
  """
  x_of = lambda batch: model_input(batch, input_key, "task_functions")

  def encode(params, model_state, batch):
    variables = {"params": params["encoder"], **(model_state or {})}
    if model_state:
      z, updates = encoder.apply(variables, x_of(batch), train=True, mutable=list(model_state))
      return z, {**model_state, **updates}
    return encoder.apply(variables, x_of(batch), train=True), model_state

  def decode(params, z, batch):
    return task_losses(heads.apply({"params": params["heads"]}, z), batch)

  def loss_fn(params, model_state, batch):
    z, new_state = encode(params, model_state, batch)
    return decode(params, z, batch), new_state

  def predict(params, model_state, batch):
    variables = {"params": params["encoder"], **(model_state or {})}
    z = encoder.apply(variables, x_of(batch), train=False)
    return heads.apply({"params": params["heads"]}, z)

  def init(key, batch):
    k1, k2 = jax.random.split(key)
    variables = encoder.init(k1, x_of(batch), train=False)
    enc_params = variables.pop("params")
    z = encoder.apply({"params": enc_params, **variables}, x_of(batch), train=False)
    head_params = heads.init(k2, z)["params"]
    return {"encoder": enc_params, "heads": head_params}, (dict(variables) or None)

  return TaskFunctions(loss_fn, encode, decode, predict, shared_encoder_mask, init, has_state=True)


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
