"""From a Flax NNX multi-task model to `loss_fn`, `encode`, `decode` and the shared mask.

NNX modules hold their state; the train step wants pure functions of pytrees. The bridge is
`nnx.split` / `nnx.merge`, with the state kept as plain nested dicts of arrays
(`nnx.to_pure_dict`):

    params       every `nnx.Param` of the model            (what the optimiser updates)
    model_state  everything else: BatchNorm statistics, the RNG keys and counters of
                 Dropout (`nnx.Rngs` streams), any other `nnx.Variable`; None when empty

Each function rebuilds the module from (params, model_state) inside the trace, runs it in
training mode (`module.train()`; `predict` in `module.eval()`), and reads the state back,
so BatchNorm statistics update and Dropout's counter advances once per step, with
randomness fixed by the seed of the model's `nnx.Rngs`.

    model = MultiTask(rngs=nnx.Rngs(0))                    # .encoder (shared), .heads
    fns = nnx_task_functions(model, task_losses, trunk="encoder")
    params, model_state = fns.init()
    step = make_train_step(fns, ntkmtl(k), optax.adam(1e-3))  # or fns.train_step(...)

The `TaskFunctions` object carries `has_state=True`, `encode`, `decode` and the `shared`
mask of the trunk, which a method built without a mask takes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx

from ntkmtl_jax import _tree
from ntkmtl_jax.models.multitask import TaskFunctions, model_input

PyTree = Any

# flax >= 0.11 keeps Variables (not copies) in a State, and `nnx.merge` reuses them unless
# `copy=True`: reused Variables were made outside the trace, and a BatchNorm writing to one
# raises TraceContextError. Older flax (0.10) always builds fresh Variables and has no
# `copy` argument.
_MERGE_HAS_COPY = "copy" in inspect.signature(nnx.merge).parameters


def _merge(graphdef, *states):
  if _MERGE_HAS_COPY:
    return nnx.merge(graphdef, *states, copy=True)
  return nnx.merge(graphdef, *states)


def _with_values(template, pure: PyTree):
  """A new State shaped like `template` holding the arrays of the pure dict `pure`."""
  state = jax.tree.map(lambda x: x, template)  # a fresh container: the template stays as is
  if pure:
    nnx.replace_by_pure_dict(state, pure)
  return state


def _trunk_paths(trunk: str | Sequence[str]) -> tuple[tuple[str, ...], ...]:
  names = [trunk] if isinstance(trunk, str) else list(trunk)
  if not names:
    raise ValueError("trunk must name at least one submodule holding the shared parameters.")
  return tuple(tuple(name.replace("/", ".").split(".")) for name in names)


def _method(model, spec, name: str):
  """`spec` (a method name or a function (model, input) -> output) as a function, or None."""
  if spec is None:
    return None
  if isinstance(spec, str):
    if not callable(getattr(model, spec, None)):
      raise ValueError(f"{name}={spec!r}: the model has no method {spec!r}.")
    return lambda m, x: getattr(m, spec)(x)
  if not callable(spec):
    raise TypeError(
      f"{name} must be a method name or a function (model, input) -> output, "
      f"got {type(spec).__name__}."
    )
  return spec


def nnx_task_functions(
  model: nnx.Module,
  task_losses: Callable[[Any, PyTree], jax.Array],
  *,
  trunk: str | Sequence[str] = "encoder",
  encode: str | Callable | None = None,
  decode: str | Callable | None = None,
  input_key: str = "x",
) -> TaskFunctions:
  """Builds the pure functions of a Flax NNX multi-task model.

  Args:
    model: the NNX module, already built (`Model(rngs=nnx.Rngs(0))`). It is read, never
      changed; `update_module` writes trained values back into it.
    task_losses: `task_losses(outputs, batch) -> (k,)` losses from the model's outputs.
    trunk: the attribute (or dotted path, e.g. "backbone.blocks") of the submodule whose
      parameters are shared by the tasks, or a sequence of them; `shared` marks their
      `nnx.Param`s.
    encode: how the shared representation is computed from the input: a method name or a
      function `(model, x) -> z`. Default: the model's `encode` method if it has one, else
      the `trunk` submodule itself (when `trunk` names one).
    decode: how the task outputs are computed from z: a method name or a function
      `(model, z) -> outputs`. Default: the model's `decode` method if it has one. With
      both `encode` and `decode`, the losses are `task_losses(decode(encode(x)))` and the
      representation methods (NTKMTL-SR, MGDA-UB) work; without, the losses are
      `task_losses(model(x))` and `encode`/`decode` are None.
    input_key: the batch entry fed to the model; a batch without it raises an error naming
      this option.

  Returns:
    A `TaskFunctions` over (params, model_state) as pure nested dicts (see the module
    docstring), `has_state=True`; give it to `make_train_step` as it is (it brings its
    `encode`, `decode` and `shared` mask). `init()` returns the model's own values.
    `decode(params, z, batch)` carries no model state, so it needs heads that write none
    (no BatchNorm in training mode, no Dropout in the heads: keep those in the trunk); it
    raises a ValueError otherwise.
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(
      f"model must be a flax.nnx.Module, got {type(model).__name__}; for "
      "flax.linen modules use models.multitask.task_functions."
    )
  x_of = lambda batch: model_input(batch, input_key, "nnx_task_functions")
  graphdef, params_template, state_template = nnx.split(model, nnx.Param, ...)
  params0 = nnx.to_pure_dict(params_template)
  state0 = nnx.to_pure_dict(state_template) or None
  paths = _trunk_paths(trunk)
  for path in paths:
    if not _entry(params0, path):
      raise ValueError(
        f"trunk={'.'.join(path)!r} holds no nnx.Param of the model; its "
        f"top-level parameter entries are {sorted(map(str, params0))}."
      )

  if encode is None:
    if callable(getattr(model, "encode", None)):
      encode = "encode"
    elif len(paths) == 1:
      encode = lambda m, x: _submodule(m, paths[0])(x)
  if decode is None and callable(getattr(model, "decode", None)):
    decode = "decode"
  encode_fn, decode_fn = _method(model, encode, "encode"), _method(model, decode, "decode")
  split_model = encode_fn is not None and decode_fn is not None

  def build(params, model_state, train):
    module = _merge(
      graphdef, _with_values(params_template, params), _with_values(state_template, model_state)
    )
    module.train() if train else module.eval()
    return module

  def state_of(module):
    return nnx.to_pure_dict(nnx.state(module, nnx.Not(nnx.Param))) or None

  def outputs(module, x):
    return decode_fn(module, encode_fn(module, x)) if split_model else module(x)

  def loss_fn(params, model_state, batch):
    module = build(params, model_state, train=True)
    losses = task_losses(outputs(module, x_of(batch)), batch)
    return losses, state_of(module)

  def encode_with_state(params, model_state, batch):
    module = build(params, model_state, train=True)
    z = encode_fn(module, x_of(batch))
    return z, state_of(module)

  def decode_losses(params, z, batch):
    module = build(params, state0, train=True)
    losses = task_losses(decode_fn(module, z), batch)
    after = jax.tree.leaves(state_of(module))
    if any(a is not b for a, b in zip(jax.tree.leaves(state0), after)):
      raise ValueError(
        "The task heads changed model state (BatchNorm statistics or Dropout RNG counters) "
        "in decode(params, z, batch), which has no model state to return: NTKMTL-SR and "
        "MGDA-UB need heads that write no state; keep BatchNorm and Dropout in the trunk."
      )
    return losses

  def predict(params, model_state, batch):
    return outputs(build(params, model_state, train=False), x_of(batch))

  def shared(params):
    def is_trunk(path, _):
      names = tuple(_tree.key_name(e) for e in path)
      return any(names[: len(p)] == p for p in paths)

    return jax.tree_util.tree_map_with_path(is_trunk, params)

  def init(key=None, batch=None):
    """(params, model_state) as the model holds them: NNX initialises at construction
    (seed the model's `nnx.Rngs`), so `key` and `batch` are not used."""
    del key, batch
    return params0, state0

  return TaskFunctions(
    loss_fn,
    encode_with_state if split_model else None,
    decode_losses if split_model else None,
    predict,
    shared,
    init,
    has_state=True,
  )


def _entry(tree: dict, path: tuple[str, ...]):
  """`tree[path]` in a pure dict (whose list indices are ints), or None."""
  for name in path:
    if not isinstance(tree, dict):
      return None
    tree = tree.get(int(name)) if name.isdigit() and int(name) in tree else tree.get(name)
  return tree


def _submodule(module, path: tuple[str, ...]):
  for name in path:
    module = module[int(name)] if name.isdigit() else getattr(module, name)
  return module


def update_module(model: nnx.Module, params: PyTree, model_state: PyTree = None) -> None:
  """Writes trained `params` and `model_state` (pure dicts, as `nnx_task_functions` makes
  them) back into the NNX `model`, in place."""
  _, params_template, state_template = nnx.split(model, nnx.Param, ...)
  nnx.update(
    model, _with_values(params_template, params), _with_values(state_template, model_state)
  )
