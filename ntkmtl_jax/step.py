"""`make_train_step`: one jitted function per method that computes only what the method needs.

The step is a small table of *oracles*, one per kind of `Needs`, each returning the task
losses, the statistics the method reads, a way to the update (a pullback for one weighted
backward pass, or the task gradients), and the new model state; then one *tail* turns
statistics into weights, weights into the update, the update into new parameters through
the optimiser, and keeps the old state where anything came out non-finite.

    oracle                needs                      backward passes
    _losses_oracle        losses                     1
    _gradients_oracle     sq_norms, gram, gradients  k (or streamed: k, then 1 weighted)
    _kernel_oracle        kernel (n chunks)          k * n (`kernel.task_jacobian`)
    _representation_oracle representation(_gram)     1 (+ k*n through the heads only)

How the per-task passes loop, and whether the task gradients are held or only their
statistics streamed, is the step's resolved `strategy.Strategy` (`strategy.resolve`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ntkmtl_jax import _tree, kernel
from ntkmtl_jax._tree import PyTree
from ntkmtl_jax.method import (
  Method,
  Needs,
  TaskStats,
  Weighting,
  check_weights,
  combine,
  is_method,
  stats_from_gradients,
)
from ntkmtl_jax.strategy import Strategy, resolve, run_passes, unit


class TrainState(NamedTuple):
  """Everything a multi-task training run carries from step to step.

  Attributes:
    params: the model parameters.
    model_state: mutable collections of the model (e.g. flax `batch_stats`), or None.
    method_state: the multi-task method's state.
    optimizer_state: the optimiser's state.
    step: number of steps taken (skipped ones included).
    skipped: number of steps skipped because something came out non-finite.
    key: base PRNG key; step t uses `jax.random.fold_in(key, t)`.
  """

  params: PyTree
  model_state: PyTree
  method_state: Any
  optimizer_state: Any
  step: jax.Array
  skipped: jax.Array
  key: jax.Array


class TrainStep:
  """A jitted multi-task train step: `state, metrics = step(state, batch)`.

  Built by `make_train_step`; `init(params, model_state=None, key=None)` makes the
  `TrainState`; `method`, `needs` and `strategy` (the resolved `Strategy`) say what it
  runs. `metrics` holds `losses` (k,), `weights` (k,), `eigenvalues` (k,) when the
  method uses them (for NTKMTL with n = 1, the squared task-gradient norms), every other
  scalar or per-task field of the method's state (e.g. `conflicts`, `solver_failures`),
  `grad_norm` (the shared update's norm before the optimiser), `finite` (whether this step
  was applied), `skipped` (total so far) and why a step was skipped: `nonfinite_losses`,
  `nonfinite_update` (the method's update) and `nonfinite_state` (the new parameters or the
  optimiser's, method's or model's new state).
  """

  def __init__(
    self,
    step_fn: Callable,
    method: Method,
    needs: Needs,
    optimizer: optax.GradientTransformation,
    jit: bool,
    donate: bool,
    strategy: Strategy | None = None,
  ):
    self.method = method
    self.needs = needs
    self.strategy = strategy
    self.optimizer = optimizer
    self._raw = step_fn
    self._step = jax.jit(step_fn, donate_argnums=(0,) if donate else ()) if jit else step_fn

  def init(
    self, params: PyTree, model_state: PyTree = None, key: jax.Array | None = None
  ) -> TrainState:
    return TrainState(
      params=params,
      model_state=model_state,
      method_state=self.method.init(params),
      optimizer_state=self.optimizer.init(params),
      step=jnp.zeros([], jnp.int32),
      skipped=jnp.zeros([], jnp.int32),
      key=jax.random.key(0) if key is None else key,
    )

  def __call__(self, state: TrainState, batch: PyTree) -> tuple[TrainState, dict]:
    return self._step(state, batch)

  def lower(self, state: TrainState, batch: PyTree):
    """The lowered step (for `.compile()`, cost analysis or HLO inspection)."""
    return jax.jit(self._raw).lower(state, batch)


class Model(NamedTuple):
  """The user's model in one calling convention (with model state).

  Attributes:
    losses: `losses(params, model_state, batch) -> ((k,), new_model_state)`.
    encode: `encode(params, model_state, batch) -> (z, new_model_state)`, or None.
    decode: `decode(params, z, batch) -> (k,)`, or None.
  """

  losses: Callable
  encode: Callable | None
  decode: Callable | None


class Observation(NamedTuple):
  """What an oracle returns: everything the tail needs to make the update.

  Attributes:
    losses: (k,) task losses on the batch.
    stats: the `TaskStats` the method reads (losses and key included).
    model_state: the model state after the forward pass(es).
    pullback: `pullback(cotangent (k,)) -> gradient of sum_i c_i l_i` over all parameters
      (one backward pass), when the oracle did not keep the task gradients.
    task_grads: the task gradients stacked on axis 0 (all parameters), when it did.
  """

  losses: jax.Array
  stats: TaskStats
  model_state: PyTree
  pullback: Callable | None = None
  task_grads: PyTree | None = None


def _check_calling_convention(name: str, fn: Callable | None, has_state: bool) -> None:
  """Refuses, before any tracing, a function whose arguments do not fit `has_state`."""
  if fn is None:
    return
  with_state, without = _tree.takes_positional(fn, 3), _tree.takes_positional(fn, 2)
  if has_state and with_state is False and without:
    raise TypeError(
      f"has_state=True calls {name}(params, model_state, batch), but {name} takes "
      "(params, batch): pass has_state=False (the default) for a model without state."
    )
  if not has_state and without is False and with_state:
    raise TypeError(
      f"has_state=False calls {name}(params, batch), but {name} takes three arguments "
      "(params, model_state, batch), like the functions of task_functions and "
      "nnx_task_functions: pass has_state=True, or give make_train_step the TaskFunctions "
      "object itself."
    )


def _normalise_model(loss_fn, encode, decode, has_state) -> Model:
  if loss_fn is None and (encode is None or decode is None):
    raise ValueError(
      "Give either loss_fn(params, batch) -> (k,) losses, or both "
      "encode(params, batch) -> z and decode(params, z, batch) -> (k,)."
    )
  _check_calling_convention("loss_fn", loss_fn, has_state)
  _check_calling_convention("encode", encode, has_state)
  if decode is not None and _tree.takes_positional(decode, 3) is False:
    raise TypeError(
      "make_train_step calls decode(params, z, batch) (it carries no model state); the "
      "decode given does not take those three arguments."
    )
  enc = None
  if encode is not None:

    def enc(p, s, b):
      _tree.check_float_params(p, "make_train_step")
      if not has_state:
        return encode(p, b), s
      out = encode(p, s, b)
      if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(
          "With has_state=True, encode(params, model_state, batch) must return "
          "(z, new_model_state); pass has_state=False for encode(params, batch) -> z."
        )
      return out

  if loss_fn is None:

    def losses_with_state(p, s, b):
      z, s = enc(p, s, b)
      return decode(p, z, b), s
  elif has_state:
    losses_with_state = loss_fn
  else:
    losses_with_state = lambda p, s, b: (loss_fn(p, b), s)

  def checked(p, s, b):
    _tree.check_float_params(p, "make_train_step")
    out = losses_with_state(p, s, b)
    if not (isinstance(out, tuple) and len(out) == 2):
      raise ValueError(
        "With has_state=True, loss_fn(params, model_state, batch) must return "
        "(losses, new_model_state); pass has_state=False for loss_fn(params, batch) -> (k,)."
      )
    _tree.check_losses(out[0])
    return out

  return Model(checked, enc, decode)


def _is_task_functions(value) -> bool:
  """Whether `value` is a model's bundle of functions (`models.TaskFunctions` or alike)."""
  return not callable(value) and all(
    hasattr(value, field) for field in ("loss_fn", "encode", "decode", "shared", "has_state")
  )


def _mask_changes_update(method) -> str | None:
  """What `shared=None` changes for `method` (None when its update does not read the mask)."""
  parts = []
  if method.needs.task_gradients:
    parts.append(
      "the task-gradient statistics (norms, Gram, kernel eigenvalues) and so the weights are "
      "taken over the heads' parameters too"
    )
  if method.head_gradients != "weighted":
    parts.append("the heads get the method's combined update instead of their plain gradients")
  return ", and ".join(parts) or None


def _mean_over_chunks(tree):
  return jax.tree.map(
    lambda x: jnp.mean(x, axis=0) if jnp.issubdtype(x.dtype, jnp.floating) else x[0], tree
  )


def _at_least_float32(x):
  return None if x is None else x.astype(jnp.promote_types(x.dtype, jnp.float32))


# ------------------------------------------------------------------------------- oracles


def _losses_oracle(model, needs, strategy, params, ms, batch, mask, key):
  """The losses and one backward pass (loss-weighting methods)."""
  losses, vjp_fn, ms_new = jax.vjp(lambda p: model.losses(p, ms, batch), params, has_aux=True)
  return Observation(
    losses, TaskStats(losses=losses, key=key), ms_new, pullback=lambda c: vjp_fn(c)[0]
  )


def _gradients_oracle(model, needs, strategy, params, ms, batch, mask, key):
  """The k task gradients, or (not `strategy.materialize`) only their squared norms / Gram."""
  losses, vjp_fn, ms_new = jax.vjp(lambda p: model.losses(p, ms, batch), params, has_aux=True)
  pull = lambda c: vjp_fn(c)[0]
  k = losses.shape[0]
  if not strategy.materialize:  # `resolve` refuses this for the "gradients" kind
    stats = _streamed_stats(
      model,
      params,
      ms,
      batch,
      mask,
      pull,
      k,
      losses.dtype,
      full_gram=(needs.kind == "gram"),
      strategy=strategy,
    )
    return Observation(losses, stats._replace(losses=losses, key=key), ms_new, pullback=pull)
  task_grads = kernel.pullback_rows(pull, k, losses.dtype, strategy=strategy)
  stats = stats_from_gradients(needs.kind, task_grads, mask, losses=losses, key=key)
  return Observation(losses, stats, ms_new, task_grads=task_grads)


def _kernel_oracle(model, needs, strategy, params, ms, batch, mask, key):
  """The k * n Jacobian rows (`kernel.task_jacobian`) and each task block's eigenvalue."""
  n = needs.num_chunks
  spectrum = dict(
    eigen_method=needs.eigen_method,
    statistic=needs.statistic,
    top_r=needs.top_r,
    power_iterations=needs.power_iterations,
  )
  chunk_losses = lambda p, c: model.losses(p, ms, c)
  if strategy.materialize:  # rows over all parameters: the heads' part makes their update
    per_task_chunk, jac, ms_chunks = kernel.task_jacobian(
      chunk_losses, params, batch, num_chunks=n, strategy=strategy, has_aux=True
    )
    eig = kernel.eigenvalues_from_jacobian(_tree.split(jac, mask)[0], **spectrum)
    losses = jnp.mean(per_task_chunk, axis=1)
    task_grads = jax.tree.map(lambda x: jnp.mean(x, axis=1), jac)
    ms_new = _mean_over_chunks(ms_chunks) if ms is not None else None
    return Observation(
      losses, TaskStats(losses=losses, eigenvalues=eig, key=key), ms_new, task_grads=task_grads
    )
  # Task by task: its n rows, then its eigenvalue; one weighted backward pass after.
  fn = kernel.chunk_loss_fn(chunk_losses, batch, n, has_aux=True)
  flat, vjp_fn, (per_chunk, ms_chunks) = jax.vjp(fn, params, has_aux=True)
  k = per_chunk.shape[1]

  def task_eigenvalue(i, after):
    rows = [
      _tree.split(vjp_fn(after(unit(i * n + a, k * n, flat.dtype)))[0], mask)[0] for a in range(n)
    ]
    jac_i = jax.tree.map(lambda *xs: jnp.stack(xs)[None], *rows)
    return kernel.eigenvalues_from_jacobian(jac_i, **spectrum)[0]

  eig = run_passes(strategy, task_eigenvalue, k)
  losses = jnp.mean(per_chunk, axis=0)
  ms_new = _mean_over_chunks(ms_chunks) if ms is not None else None
  pullback = lambda c: vjp_fn(jnp.repeat(c, n) / n)[0]
  return Observation(
    losses, TaskStats(losses=losses, eigenvalues=eig, key=key), ms_new, pullback=pullback
  )


def _representation_oracle(model, needs, strategy, params, ms, batch, mask, key):
  """One forward to z; statistics of d l_i / d z through the heads; one backward pass."""
  z, enc_vjp, ms_new = jax.vjp(lambda p: model.encode(p, ms, batch), params, has_aux=True)
  losses, dec_vjp = jax.vjp(lambda p, zz: model.decode(p, zz, batch), params, z)
  _tree.check_losses(losses, where="decode")
  if needs.kind == "representation_gram":
    # Gram of d l_i / d z: k backward passes through the heads only (MGDA-UB).
    eye = jnp.eye(losses.shape[0], dtype=losses.dtype)
    dz = jnp.stack([dec_vjp(eye[i])[1].reshape(-1) for i in range(losses.shape[0])])
    stats = TaskStats(losses=losses, gram=jnp.matmul(dz, dz.T, precision="highest"), key=key)
  else:
    eig, _ = kernel.representation_eigenvalues(
      model.decode, params, jax.lax.stop_gradient(z), batch, num_chunks=needs.num_chunks
    )
    stats = TaskStats(losses=losses, eigenvalues=eig, key=key)

  def pullback(cotangent):  # heads, then the encoder through d loss / d z
    dp, dz = dec_vjp(cotangent)
    return jax.tree.map(jnp.add, dp, enc_vjp(dz)[0])

  return Observation(losses, stats, ms_new, pullback=pullback)


# One oracle per kind of need (the implementation table of the step).
ORACLES = {
  "losses": _losses_oracle,
  "sq_norms": _gradients_oracle,
  "gram": _gradients_oracle,
  "gradients": _gradients_oracle,
  "kernel": _kernel_oracle,
  "representation": _representation_oracle,
  "representation_gram": _representation_oracle,
}


def _streamed_stats(model, params, ms, batch, mask, pull, k, dtype, full_gram, strategy):
  """Squared norms (or the Gram) of the shared task gradients, one task at a time.

  The Gram row of task i is J g_i, one forward-mode product along g_i, so the k gradients
  are never held together (with `Passes.VMAP` or `CHUNKED` the batched passes are).
  """
  cotangent = lambda i, after: after(unit(i, k, dtype))
  if not full_gram:
    sq = run_passes(strategy, lambda i, after: _tree.sq_norm(pull(cotangent(i, after)), mask), k)
    return TaskStats(sq_norms=sq)
  shared_params, rest = _tree.split(params, mask)
  of_shared = lambda sp: model.losses(_tree.merge(sp, rest, mask), ms, batch)[0]

  def gram_row(i, after):
    g_shared = _tree.split(pull(cotangent(i, after)), mask)[0]
    return jax.jvp(of_shared, (shared_params,), (g_shared,))[1]

  gram = run_passes(strategy, gram_row, k)
  gram = 0.5 * (gram + gram.T)
  return TaskStats(gram=gram, sq_norms=jnp.diagonal(gram))


# ---------------------------------------------------------------------------------- tail


def _method_update(method, obs: Observation, method_state, params, mask):
  """The method's update of all parameters from an oracle's observation."""
  if not isinstance(method, Weighting):  # a GradientRule or any optax aggregator
    with jax.named_scope("weights"):
      return method.update(
        obs.task_grads, method_state, params, losses=obs.losses, key=obs.stats.key
      )
  stats = obs.stats._replace(
    **{
      f: _at_least_float32(getattr(obs.stats, f))
      for f in ("losses", "sq_norms", "gram", "eigenvalues")
    }
  )
  with jax.named_scope("weights"):
    weights, method_state = method.weights(stats, method_state)
  check_weights(method.name, weights, obs.losses.shape[0])
  if obs.task_grads is not None:
    return combine(obs.task_grads, weights, mask, method.head_gradients), method_state
  cotangent = weights.astype(obs.losses.dtype)
  shared_grad = obs.pullback(cotangent)
  if method.head_gradients == "weighted":
    return shared_grad, method_state
  # Heads get the plain sum: a second pass with unit cotangents (XLA prunes its shared part).
  head_grad = obs.pullback(jnp.ones_like(obs.losses))
  return _tree.merge(
    _tree.split(shared_grad, mask)[0], _tree.split(head_grad, mask)[1], mask
  ), method_state


def _floating_finite(tree) -> jax.Array:
  return _tree.all_finite(
    [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  )


def make_train_step(
  loss_fn: Callable | Any | None,
  method: Method,
  optimizer: optax.GradientTransformation,
  *,
  strategy: Strategy | str = "auto",
  has_state: bool | None = None,
  encode: Callable | None = None,
  decode: Callable | None = None,
  chunk_size: int | None = None,
  jit: bool = True,
  donate: bool = False,
) -> TrainStep:
  """Builds one jitted train step for a multi-task method.

  The step computes only what the method needs (`method.needs`, see `ORACLES`): the losses
  and one backward pass for loss-based methods and NTKMTL-SR; the k task gradients (or just
  their squared norms / Gram) for gradient methods; the k x n Jacobian rows for NTKMTL with
  n > 1. Then it applies `optimizer` (anything optax: clipping, Adam, schedules), called as
  `optimizer.update(update, opt_state, params, value=sum_i l_i)`, so transformations that
  read the loss (`optax.contrib.reduce_on_plateau`) work; others ignore it.

  A step where anything comes out non-finite (the losses, the method's update, the new
  parameters, or the new optimiser, method or model state) leaves params and every state
  unchanged and increments `skipped` (like `optax.apply_if_finite`, but covering what the
  optimiser made too).

  Which parameters are shared is the method's `shared` mask. With `shared=None` every
  parameter counts as shared, the task heads included; for the methods whose update reads
  the mask (every method that takes task gradients, NTKMTL and MGDA among them, and any with
  `head_gradients="sum"`, such as NTKMTL-SR built so) that changes the numbers, so the step
  warns once (`AllSharedWarning`); pass a mask, or `shared=True` when every parameter
  really is shared. Given a `TaskFunctions`, a method without a mask takes its `shared`.

  Args:
    loss_fn: `loss_fn(params, batch) -> (k,)` task losses, or with `has_state=True`
      `loss_fn(params, model_state, batch) -> ((k,), new_model_state)` (flax mutable
      collections such as `batch_stats`). May be None when `encode`/`decode` are given. Or
      the `models.TaskFunctions` of a model (`task_functions`, `nnx_task_functions`): its
      `loss_fn`, `encode`, `decode` and `has_state` are used, and its `shared` mask when the
      method has none (`fns.train_step(method, optimizer)` is the same call).
    method: a `Weighting` or `GradientRule` (e.g. `ntkmtl(k)`, `methods.get("ls", k)`), or
      any optax aggregator of task gradients stacked on axis 0 (`method.aggregator`,
      wrapped in `optax.chain`, `optax.inject_hyperparams` or copied with `_replace`): the
      step then computes the k task gradients and calls its `update(task_grads, state,
      params, losses=..., key=...)`, whatever the method needs.
    optimizer: the optax transformation applied to the method's update.
    strategy: how the k task backward passes run, a `Strategy` or a name (the table of
      `ntkmtl_jax.strategy`), resolved for the method's needs by `strategy.resolve`: its
      `passes` say how they loop (`VMAP`, `UNROLL`, `CHUNKED`, `SEQUENTIAL`); with
      `materialize=False` only the squared norms, Gram rows or kernel eigenvalues are
      streamed, task by task, then one weighted backward pass runs (O(P) extra memory
      whatever k; for methods that need `sq_norms`, `gram` or `kernel`; refused for those
      that need the task gradients themselves). "auto" (`default_strategy()`) unrolls the
      passes and holds the gradients on CPU, and on GPU/TPU runs one compiled VJP body task
      after task, streaming the statistics where the method allows it.
    has_state: whether the model carries mutable state (see `loss_fn`); None: False, or
      the `TaskFunctions`' own. A function whose arguments do not fit it is refused here.
    encode: `encode(params, batch) -> z` (or `(params, model_state, batch) -> (z, state)`),
      the shared encoder; needed for NTKMTL-SR and MGDA-UB.
    decode: `decode(params, z, batch) -> (k,)` task losses from the representation.
    chunk_size: passes per vmapped group with `Passes.CHUNKED`; None: the strategy's (8).
    jit: compile the step (True) or leave it as a traceable Python function.
    donate: donate the input state's buffers to the output (saves memory; the old state
      must not be used afterwards).

  Returns:
    A `TrainStep`.
  """
  if _is_task_functions(loss_fn):
    functions = loss_fn
    if has_state is not None and bool(has_state) != bool(functions.has_state):
      raise ValueError(
        f"has_state={has_state} contradicts the TaskFunctions given, whose functions have "
        f"has_state={functions.has_state}: leave has_state out when passing the object."
      )
    if encode is not None or decode is not None:
      raise ValueError(
        "Give make_train_step either a TaskFunctions (its encode and decode are used) or "
        "encode=/decode=, not both."
      )
    loss_fn, encode, decode = functions.loss_fn, functions.encode, functions.decode
    has_state = functions.has_state
    if is_method(method) and method.shared is None and functions.shared is not None:
      method = dataclasses.replace(method, shared=functions.shared)
  has_state = bool(has_state)
  if is_method(method):
    needs: Needs = method.needs
    name, shared = method.name, method.shared
    consequence = _mask_changes_update(method) if shared is None else None
    if consequence:
      _tree.warn_all_shared(name, consequence)
  elif callable(getattr(method, "init", None)) and callable(getattr(method, "update", None)):
    # A plain optax aggregator (e.g. `optax.chain(ntkmtl(k).aggregator, clip)`, an
    # `inject_hyperparams` one, a `_replace`d copy): it gets the stacked task gradients.
    needs, name, shared = Needs("gradients"), type(method).__name__, None
    method = optax.with_extra_args_support(method)
  else:
    raise TypeError(
      "method must be a multi-task method (a Weighting or GradientRule, e.g. "
      "ntkmtl_jax.ntkmtl(k) or ntkmtl_jax.methods.get(name, num_tasks=k)) or an "
      "optax aggregator of stacked task gradients, got "
      f"{type(method).__name__}."
    )
  strategy = resolve(strategy, needs, chunk_size=chunk_size, name=name)
  model = _normalise_model(loss_fn, encode, decode, has_state)
  if needs.uses_representation and (model.encode is None or model.decode is None):
    raise ValueError(
      f"{name} takes the kernel at the shared representation: give "
      "make_train_step encode=... and decode=... instead of (or with) loss_fn (for "
      "nnx_task_functions, give the model encode/decode methods or its encode= and "
      "decode= options)."
    )
  oracle = ORACLES[needs.kind]
  optimizer = optax.with_extra_args_support(optimizer)

  def step_fn(state: TrainState, batch):
    params, ms = state.params, state.model_state
    mask = _tree.resolve_mask(shared, params)
    key = jax.random.fold_in(state.key, state.step)
    with jax.named_scope("oracle"):
      obs = oracle(model, needs, strategy, params, ms, batch, mask, key)
    with jax.named_scope("update"):
      update, method_state = _method_update(method, obs, state.method_state, params, mask)
    with jax.named_scope("optimizer"):
      updates, opt_state = optimizer.update(
        update, state.optimizer_state, params, value=jnp.sum(obs.losses)
      )
      new_params = optax.apply_updates(params, updates)
    with jax.named_scope("finite_gate"):
      losses_ok = _tree.all_finite(obs.losses)
      update_ok = _floating_finite(update)
      state_ok = _floating_finite((new_params, opt_state, method_state, obs.model_state))
      finite = losses_ok & update_ok & state_ok
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
      new_state = TrainState(
        params=keep(new_params, params),
        model_state=keep(obs.model_state, ms) if ms is not None else None,
        method_state=keep(method_state, state.method_state),
        optimizer_state=keep(opt_state, state.optimizer_state),
        step=state.step + 1,
        skipped=state.skipped + jnp.where(finite, 0, 1).astype(jnp.int32),
        key=state.key,
      )
    with jax.named_scope("metrics"):
      losses = obs.losses
      metrics = dict(
        losses=losses,
        finite=finite,
        skipped=new_state.skipped,
        nonfinite_losses=~losses_ok,
        nonfinite_update=losses_ok & ~update_ok,
        nonfinite_state=losses_ok & update_ok & ~state_ok,
        grad_norm=jnp.sqrt(_tree.sq_norm(update, mask)),
      )
      # Every method's state records its last weights; NTK methods also their eigenvalues,
      # solvers their diagnostics (conflicting pairs, iterations, failures): report every
      # scalar or per-task field of the state, never the large buffers some methods keep.
      weights_now = getattr(method_state, "weights", None)
      metrics["weights"] = weights_now if weights_now is not None else jnp.ones_like(losses)
      for name, value in getattr(method_state, "_asdict", dict)().items():
        if (
          name not in metrics
          and name != "count"
          and isinstance(value, jax.Array)
          and (value.ndim == 0 or value.shape == losses.shape)
        ):
          metrics[name] = value
    return new_state, metrics

  return TrainStep(step_fn, method, needs, optimizer, jit=jit, donate=donate, strategy=strategy)
