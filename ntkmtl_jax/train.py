"""`make_train_step`: one jitted function per method that builds only what the method needs."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ntkmtl_jax import _tree, kernel
from ntkmtl_jax._tree import PyTree
from ntkmtl_jax.aggregator import TaskAggregator, TaskStats, combine


class TrainState(NamedTuple):
  """Everything a multi-task training run carries from step to step.

  Attributes:
    params: the model parameters.
    model_state: mutable collections of the model (e.g. flax `batch_stats`), or None.
    aggregator_state: the multi-task method's state.
    optimizer_state: the optimiser's state.
    step: number of steps taken (skipped ones included).
    skipped: number of steps skipped because a loss or gradient was not finite.
    key: base PRNG key; step t uses `jax.random.fold_in(key, t)`.
  """
  params: PyTree
  model_state: PyTree
  aggregator_state: Any
  optimizer_state: Any
  step: jax.Array
  skipped: jax.Array
  key: jax.Array


class TrainStep:
  """A jitted multi-task train step: `state, metrics = step(state, batch)`.

  Built by `make_train_step`; `init(params, model_state=None, key=None)` makes the
  `TrainState`. `metrics` holds `losses` (k,), `weights` (k,), `eigenvalues` (k,) when the
  method uses them (for NTKMTL with n = 1, the squared task-gradient norms), every other
  scalar or per-task field of the method's state (e.g. `conflicts`, `solver_failures`), `grad_norm` (the shared update's norm before the
  optimiser), `finite` (whether this step was applied) and `skipped` (total so far).
  """

  def __init__(self, step_fn: Callable, aggregator: TaskAggregator,
               optimizer: optax.GradientTransformation, jit: bool, donate: bool):
    self.aggregator = aggregator
    self.optimizer = optimizer
    self._raw = step_fn
    self._step = jax.jit(step_fn, donate_argnums=(0,) if donate else ()) if jit else step_fn

  def init(self, params: PyTree, model_state: PyTree = None,
           key: jax.Array | None = None) -> TrainState:
    return TrainState(params=params, model_state=model_state,
                      aggregator_state=self.aggregator.init(params),
                      optimizer_state=self.optimizer.init(params),
                      step=jnp.zeros([], jnp.int32), skipped=jnp.zeros([], jnp.int32),
                      key=jax.random.key(0) if key is None else key)

  def __call__(self, state: TrainState, batch: PyTree) -> tuple[TrainState, dict]:
    return self._step(state, batch)

  def lower(self, state: TrainState, batch: PyTree):
    """The lowered step (for `.compile()`, cost analysis or HLO inspection)."""
    return jax.jit(self._raw).lower(state, batch)


def _normalise_model(loss_fn, encode, decode, has_state):
  """Returns f(params, model_state, batch) -> (losses, new_model_state) and the SR pieces."""
  if loss_fn is None and (encode is None or decode is None):
    raise ValueError("Give either loss_fn(params, batch) -> (k,) losses, or both "
                     "encode(params, batch) -> z and decode(params, z, batch) -> (k,).")
  if encode is not None:
    enc = encode if has_state else (lambda p, s, b: (encode(p, b), s))
  else:
    enc = None
  if loss_fn is None:
    def loss_fn_state(p, s, b):
      z, s = enc(p, s, b)
      return decode(p, z, b), s
  elif has_state:
    loss_fn_state = loss_fn
  else:
    loss_fn_state = lambda p, s, b: (loss_fn(p, b), s)

  def checked(p, s, b):
    out = loss_fn_state(p, s, b)
    if not (isinstance(out, tuple) and len(out) == 2):
      raise ValueError("With has_state=True, loss_fn(params, model_state, batch) must return "
                       "(losses, new_model_state).")
    _tree.check_losses(out[0])
    return out

  return checked, enc


def _mean_over_chunks(tree):
  return jax.tree.map(lambda x: jnp.mean(x, axis=0) if jnp.issubdtype(x.dtype, jnp.floating)
                      else x[0], tree)


def make_train_step(loss_fn: Callable | None, aggregator: TaskAggregator,
                    optimizer: optax.GradientTransformation, *, strategy: str = "auto",
                    has_state: bool = False, encode: Callable | None = None,
                    decode: Callable | None = None, chunk_size: int = 8, jit: bool = True,
                    donate: bool = False) -> TrainStep:
  """Builds one jitted train step for a multi-task method.

  The step computes only what the method needs (`aggregator.needs`): the losses and one
  backward pass for loss-based methods and NTKMTL-SR; the k task gradients (or just their
  squared norms / Gram) for gradient methods; the k x n Jacobian rows for NTKMTL with
  n > 1. Then it applies `optimizer` (anything optax: clipping, Adam, schedules).

  A step whose losses or update are not finite leaves params, model state, aggregator and
  optimiser states unchanged and increments `skipped` (like `optax.apply_if_finite`).

  Args:
    loss_fn: `loss_fn(params, batch) -> (k,)` task losses, or with `has_state=True`
      `loss_fn(params, model_state, batch) -> ((k,), new_model_state)` (flax mutable
      collections such as `batch_stats`). May be None when `encode`/`decode` are given.
    aggregator: a `TaskAggregator` (e.g. `ntkmtl(...)`, `methods.get("ls", ...)`).
    optimizer: the optax transformation applied to the aggregated update.
    strategy: how the k task backward passes run: "vmap", "unroll", "chunked",
      "streaming" (squared norms or Gram first, task by task, then one weighted backward:
      O(P) extra memory whatever k; for methods that only need `sq_norms`/`gram` and for
      `kernel`), or "auto" (`kernel.default_strategy()` for the backend).
    has_state: whether the model carries mutable state (see `loss_fn`).
    encode: `encode(params, batch) -> z` (or `(params, model_state, batch) -> (z, state)`),
      the shared encoder; needed for NTKMTL-SR.
    decode: `decode(params, z, batch) -> (k,)` task losses from the representation.
    chunk_size: rows per vmapped group for the "chunked" strategy.
    jit: compile the step (True) or leave it as a Python function (for debugging).
    donate: donate the input state's buffers to the output (saves memory; the old state
      must not be used afterwards).

  Returns:
    A `TrainStep`.
  """
  if not isinstance(aggregator, TaskAggregator):
    raise TypeError("aggregator must be a TaskAggregator (e.g. ntkmtl_jax.ntkmtl(k) or "
                    "ntkmtl_jax.methods.get(name, num_tasks=k)); for a plain optax chain use "
                    "the aggregator's update in your own step.")
  strategy = kernel._check_strategy(strategy)
  f, enc = _normalise_model(loss_fn, encode, decode, has_state)
  needs = aggregator.needs
  num_chunks = aggregator.num_chunks
  if needs == "representation" and (enc is None or decode is None):
    raise ValueError(f"{aggregator.name} takes the kernel at the shared representation: give "
                     "make_train_step encode=... and decode=... instead of (or with) loss_fn.")
  if strategy == "streaming" and needs == "gradients":
    raise ValueError(f"{aggregator.name} needs the task gradients themselves, which the "
                     "'streaming' strategy never holds at once; use 'unroll', 'vmap' or "
                     "'chunked'.")
  eigen_method = aggregator.options.get("eigen_method", "auto")
  statistic = dict(statistic=aggregator.options.get("statistic", "max"),
                   top_r=aggregator.options.get("top_r", 3))
  head_sum = aggregator.head_gradients == "sum"
  representation_statistic = aggregator.options.get("representation_statistic", "eigenvalues")

  def weighted_pullback(pull, cotangent, head_cotangent, mask):
    """The update from one weighted backward pass: `pull(cotangent)` on the shared leaves;
    on the heads the same, or with `head_gradients="sum"` a second pass with the unweighted
    `head_cotangent` (XLA prunes its unused shared part)."""
    shared_grad = pull(cotangent)
    if not head_sum:
      return shared_grad
    return _tree.merge(_tree.split(shared_grad, mask)[0],
                       _tree.split(pull(head_cotangent), mask)[1], mask)

  def step_fn(state: TrainState, batch):
    params, ms = state.params, state.model_state
    mask = _tree.resolve_mask(aggregator.shared, params)
    key = jax.random.fold_in(state.key, state.step)
    agg_state = state.aggregator_state

    if needs == "representation":
      z, enc_vjp, ms_new = _vjp_encoder(enc, params, ms, batch)
      losses, dec_vjp = jax.vjp(lambda p, zz: decode(p, zz, batch), params, z)
      _tree.check_losses(losses, where="decode")
      if representation_statistic == "gram":
        # Gram of d l_i / d z: k backward passes through the heads only (MGDA-UB).
        eye = jnp.eye(losses.shape[0], dtype=losses.dtype)
        dz = jnp.stack([dec_vjp(eye[i])[1].reshape(-1) for i in range(losses.shape[0])])
        stats = TaskStats(losses=losses, gram=dz @ dz.T, key=key)
      else:
        eig, _ = kernel.representation_eigenvalues(decode, params, jax.lax.stop_gradient(z),
                                                   batch, num_chunks=num_chunks)
        stats = TaskStats(losses=losses, eigenvalues=eig, key=key)
      weights, agg_state = aggregator.weighting(stats, agg_state)

      def pull(cotangent):  # heads, then the encoder through d loss / d z
        dp, dz = dec_vjp(cotangent)
        return jax.tree.map(jnp.add, dp, enc_vjp(dz))

      update = weighted_pullback(pull, weights.astype(losses.dtype), jnp.ones_like(losses),
                                 mask)

    elif needs == "kernel":
      chunks = _tree.split_batch(batch, num_chunks)

      def chunk_losses(p):
        out, ms_c = jax.vmap(lambda c: f(p, ms, c))(chunks)  # (n, k)
        return out.T.reshape(-1), (out, ms_c)

      flat, vjp_fn, (per_chunk, ms_c) = jax.vjp(chunk_losses, params, has_aux=True)
      ms_new = _mean_over_chunks(ms_c) if ms is not None else None
      k = per_chunk.shape[1]
      losses = jnp.mean(per_chunk, axis=0)
      pull = lambda c: vjp_fn(c)[0]
      if strategy == "streaming":
        eig = []
        eye = jnp.eye(flat.shape[0], dtype=flat.dtype)
        for i in range(k):
          rows = [_tree.split(pull(eye[i * num_chunks + a]), mask)[0]
                  for a in range(num_chunks)]
          jac_i = jax.tree.map(lambda *xs: jnp.stack(xs)[None], *rows)
          eig.append(kernel.eigenvalues_from_jacobian(jac_i, eigen_method=eigen_method,
                                                      **statistic)[0])
        eig = jnp.stack(eig)
        weights, agg_state = aggregator.weighting(TaskStats(losses=losses, eigenvalues=eig,
                                                            key=key), agg_state)
        chunk_w = jnp.repeat(weights, num_chunks) / num_chunks
        update = weighted_pullback(pull, chunk_w.astype(flat.dtype),
                                   jnp.full_like(flat, 1.0 / num_chunks), mask)
      else:
        rows = kernel.pullback_rows(pull, flat.shape[0], flat.dtype, strategy=strategy,
                                    chunk_size=chunk_size)
        jac = jax.tree.map(lambda x: x.reshape((k, num_chunks) + x.shape[1:]), rows)
        eig = kernel.eigenvalues_from_jacobian(_tree.split(jac, mask)[0],
                                               eigen_method=eigen_method, **statistic)
        task_grads = jax.tree.map(lambda x: jnp.mean(x, axis=1), jac)
        update, agg_state = aggregator.update(task_grads, agg_state, params, losses=losses,
                                              eigenvalues=eig, key=key)

    else:
      (losses, vjp_fn, ms_new) = _vjp_loss(f, params, ms, batch)
      k = losses.shape[0]
      pull = lambda c: vjp_fn(c)[0]
      if needs == "losses":
        weights, agg_state = aggregator.weighting(TaskStats(losses=losses, key=key), agg_state)
        update = weighted_pullback(pull, weights.astype(losses.dtype),
                                   jnp.ones_like(losses), mask)
      elif strategy == "streaming":
        stats = _streaming_stats(f, params, ms, batch, mask, pull, k, losses.dtype,
                                 full_gram=(needs == "gram"))
        weights, agg_state = aggregator.weighting(stats._replace(losses=losses, key=key),
                                                  agg_state)
        update = weighted_pullback(pull, weights.astype(losses.dtype),
                                   jnp.ones_like(losses), mask)
      else:
        task_grads = kernel.pullback_rows(pull, k, losses.dtype, strategy=strategy,
                                          chunk_size=chunk_size)
        update, agg_state = aggregator.update(task_grads, agg_state, params, losses=losses,
                                              key=key)

    updates, opt_state = optimizer.update(update, state.optimizer_state, params)
    new_params = optax.apply_updates(params, updates)
    finite = _tree.all_finite(losses) & _tree.all_finite(update)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = TrainState(
        params=keep(new_params, params),
        model_state=keep(ms_new, ms) if ms is not None else None,
        aggregator_state=keep(agg_state, state.aggregator_state),
        optimizer_state=keep(opt_state, state.optimizer_state),
        step=state.step + 1,
        skipped=state.skipped + jnp.where(finite, 0, 1).astype(jnp.int32),
        key=state.key)
    metrics = dict(losses=losses, finite=finite, skipped=new_state.skipped,
                   grad_norm=jnp.sqrt(_tree.sq_norm(update, mask)))
    # Every method's state records its last weights; NTK methods also their eigenvalues,
    # solvers their diagnostics (conflicting pairs, iterations, failures): report every
    # scalar or per-task field of the state, never the large buffers some methods keep.
    weights_now = getattr(agg_state, "weights", None)
    metrics["weights"] = weights_now if weights_now is not None else jnp.ones_like(losses)
    for name, value in getattr(agg_state, "_asdict", dict)().items():
      if (name not in metrics and name != "count" and isinstance(value, jax.Array)
          and (value.ndim == 0 or value.shape == losses.shape)):
        metrics[name] = value
    return new_state, metrics

  return TrainStep(step_fn, aggregator, optimizer, jit=jit, donate=donate)


def _vjp_loss(f, params, ms, batch):
  losses, vjp_fn, ms_new = jax.vjp(lambda p: f(p, ms, batch), params, has_aux=True)
  return losses, vjp_fn, ms_new


def _vjp_encoder(enc, params, ms, batch):
  z, vjp_fn, ms_new = jax.vjp(lambda p: enc(p, ms, batch), params, has_aux=True)
  return z, (lambda dz: vjp_fn(dz)[0]), ms_new


def _streaming_stats(f, params, ms, batch, mask, pull, k, dtype, full_gram):
  """Squared norms (or the Gram) of the shared task gradients, one task at a time.

  The Gram row of task i is J g_i, one forward-mode product along g_i, so the k gradients
  are never held together.
  """
  eye = jnp.eye(k, dtype=dtype)

  def after(previous, i):
    # The cotangent of task i depends (through an optimisation barrier) on task i-1's
    # result, so XLA runs the k backward passes one after another and can free each
    # gradient before the next starts, instead of scheduling them side by side.
    if previous is None:
      return eye[i]
    cotangent, _ = jax.lax.optimization_barrier((eye[i], previous))
    return cotangent

  if not full_gram:
    sq = []
    for i in range(k):
      sq.append(_tree.sq_norm(pull(after(sq[-1] if sq else None, i)), mask))
    return TaskStats(sq_norms=jnp.stack(sq))
  shared_params, rest = _tree.split(params, mask)
  of_shared = lambda sp: f(_tree.merge(sp, rest, mask), ms, batch)[0]
  rows = []
  for i in range(k):
    g_shared = _tree.split(pull(after(rows[-1] if rows else None, i)), mask)[0]
    rows.append(jax.jvp(of_shared, (shared_params,), (g_shared,))[1])
  gram = jnp.stack(rows)
  gram = 0.5 * (gram + gram.T)
  return TaskStats(gram=gram, sq_norms=jnp.diagonal(gram))
