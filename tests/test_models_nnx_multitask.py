"""Flax NNX models through `nnx_task_functions`: the same losses, updates, batch statistics and
NTK weights as the equivalent linen model with the same weights; Dropout that advances from
step to step and replays from its seed; every method family trains without glue."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ntkmtl_jax as nm
from ntkmtl_jax import spectra
from ntkmtl_jax.models import nnx_task_functions, task_functions, update_module
from ntkmtl_jax.models.multitask import LinearHeads

K, D_IN, D_HID, BATCH = 3, 4, 8, 8


def _task_losses(out, batch):
  return jnp.mean((out - batch["y"]) ** 2, axis=0)


class _LinenEncoder(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    x = nn.Dense(D_HID)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
    return nn.relu(x)


class _Trunk(nnx.Module):
  def __init__(self, dropout: float, rngs: nnx.Rngs):
    self.linear = nnx.Linear(D_IN, D_HID, rngs=rngs)
    self.bn = nnx.BatchNorm(D_HID, momentum=0.5, rngs=rngs)
    self.drop = nnx.Dropout(dropout, rngs=rngs) if dropout else None

  def __call__(self, x):
    x = nnx.relu(self.bn(self.linear(x)))
    return self.drop(x) if self.drop is not None else x


class _MultiTask(nnx.Module):
  """Shared trunk (Linear, BatchNorm, optional Dropout) and k linear heads."""

  def __init__(self, *, dropout: float = 0.0, head_dropout: float = 0.0, seed: int = 0):
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
    self.encoder = _Trunk(dropout, rngs)
    self.heads = nnx.Linear(D_HID, K, rngs=rngs)
    self.head_drop = nnx.Dropout(head_dropout, rngs=rngs) if head_dropout else None

  def __call__(self, x):
    return self.decode(self.encoder(x))

  def decode(self, z):
    return self.heads(self.head_drop(z) if self.head_drop is not None else z)


def _batch(seed):
  rng = np.random.default_rng(seed)
  return {
    "x": jnp.asarray(rng.normal(size=(BATCH, D_IN)) + 2.0, jnp.float32),
    "y": jnp.asarray(rng.normal(size=(BATCH, K)), jnp.float32),
  }


def _linen_to_nnx(params, model_state, nnx_state):
  """The linen model's values in the NNX model's pure-dict layout."""
  enc = params["encoder"]
  nnx_params = {
    "encoder": {"linear": dict(enc["Dense_0"]), "bn": dict(enc["BatchNorm_0"])},
    "heads": dict(params["heads"]),
  }
  state = jax.tree.map(lambda x: x, nnx_state)
  state["encoder"]["bn"] = dict(model_state["batch_stats"]["BatchNorm_0"])
  return nnx_params, state


def _pair(seed):
  """(linen fns, linen params, linen state), (nnx fns, the same values in NNX layout)."""
  batch = _batch(seed)
  lin = task_functions(_LinenEncoder(), LinearHeads(K), _task_losses)
  lp, ls = lin.init(jax.random.key(seed), batch)
  model = _MultiTask(seed=seed)
  fns = nnx_task_functions(model, _task_losses, trunk="encoder")
  _, ns0 = fns.init()
  npar, nst = _linen_to_nnx(lp, ls, ns0)
  return batch, (lin, lp, ls), (fns, npar, nst)


METHODS = {
  "ls": lambda s: nm.methods.get("ls", K, shared=s),
  "mgda": lambda s: nm.methods.get("mgda", K, shared=s),
  "ntkmtl_n2": lambda s: nm.ntkmtl(K, num_chunks=2, shared=s),
  "ntkmtl_sr": lambda s: nm.ntkmtl_sr(K, num_chunks=2, shared=s),
}


def _one_step(fns, method, params, model_state, batch):
  step = nm.make_train_step(
    fns.loss_fn,
    METHODS[method](fns.shared),
    optax.sgd(0.1),
    has_state=True,
    encode=fns.encode,
    decode=fns.decode,
  )
  return step(step.init(params, model_state), batch)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_nnx_step_matches_linen(seed, method):
  batch, (lin, lp, ls), (fns, npar, nst) = _pair(seed)
  np.testing.assert_allclose(
    fns.loss_fn(npar, nst, batch)[0], lin.loss_fn(lp, ls, batch)[0], rtol=1e-6, atol=1e-6
  )
  lin_state, lin_metrics = _one_step(lin, method, lp, ls, batch)
  nnx_state, nnx_metrics = _one_step(fns, method, npar, nst, batch)
  assert bool(nnx_metrics["finite"])
  for name in ("losses", "weights"):
    np.testing.assert_allclose(nnx_metrics[name], lin_metrics[name], rtol=1e-5, atol=1e-6)
  want_params, want_state = _linen_to_nnx(
    lin_state.params, lin_state.model_state, nnx_state.model_state
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    nnx_state.params,
    want_params,
  )
  # BatchNorm statistics after the step (moved from their zero / one init).
  got_bn, want_bn = nnx_state.model_state["encoder"]["bn"], want_state["encoder"]["bn"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got_bn, want_bn)
  assert float(jnp.abs(got_bn["mean"]).max()) > 0.0
  np.testing.assert_allclose(
    fns.predict(nnx_state.params, nnx_state.model_state, batch),
    lin.predict(lin_state.params, lin_state.model_state, batch),
    rtol=1e-5,
    atol=1e-5,
  )


def test_ntk_weights_match_linen(seed):
  batch, (lin, lp, ls), (fns, npar, nst) = _pair(seed)
  got = nm.ntk_weights(fns.losses_at(nst), npar, batch, num_chunks=2, shared=fns.shared)
  want = nm.ntk_weights(lin.losses_at(ls), lp, batch, num_chunks=2, shared=lin.shared)
  np.testing.assert_allclose(got.eigenvalues, want.eigenvalues, rtol=1e-4)
  np.testing.assert_allclose(got.weights, want.weights, rtol=1e-4)
  spec = spectra.task_spectra(fns.losses_at(nst), npar, batch, num_chunks=2, shared=fns.shared)
  np.testing.assert_allclose(spec.eigenvalues, want.eigenvalues, rtol=1e-4)


def _dropout_count(dropout_state) -> int:
  """A Dropout module's RNG counter (flax 0.10 keeps the whole Rngs there, flax 0.12 one
  stream)."""
  rngs = dropout_state["rngs"]
  return int(rngs["dropout"]["count"] if "dropout" in rngs else rngs["count"])


def _dropout_losses(seed, steps=3):
  model = _MultiTask(dropout=0.5, seed=seed)
  fns = nnx_task_functions(model, _task_losses)
  step = nm.make_train_step(
    fns.loss_fn, nm.methods.get("ls", K, shared=fns.shared), optax.sgd(0.0), has_state=True
  )
  state = step.init(*fns.init())
  out = []
  for _ in range(steps):
    state, metrics = step(state, _batch(0))
    out.append(np.asarray(metrics["losses"]))
  return np.stack(out), state


def test_dropout_advances_and_replays():
  first, state = _dropout_losses(seed=1)
  again, _ = _dropout_losses(seed=1)
  other, _ = _dropout_losses(seed=2)
  # sgd(0) keeps the parameters: losses change from step to step only through the masks.
  assert not np.allclose(first[0], first[1])
  assert not np.allclose(first[1], first[2])
  np.testing.assert_array_equal(first, again)
  assert not np.allclose(first[0], other[0])
  assert _dropout_count(state.model_state["encoder"]["drop"]) == 3


@pytest.mark.parametrize("method", ["famo", "nash_mtl", "ntkmtl_n2", "mgda_ub", "pcgrad"])
def test_every_family_trains(method):
  """Losses, Gram, kernel over 2 chunks, representation and gradient methods, with Dropout
  whose counter advances once per step whatever the method computes."""
  model = _MultiTask(dropout=0.1, seed=3)
  fns = nnx_task_functions(model, _task_losses)
  agg = (
    nm.ntkmtl(K, num_chunks=2, shared=fns.shared)
    if method == "ntkmtl_n2"
    else nm.methods.get(method, K, shared=fns.shared)
  )
  step = nm.make_train_step(
    fns.loss_fn, agg, optax.adam(1e-2), has_state=True, encode=fns.encode, decode=fns.decode
  )
  state = step.init(*fns.init())
  for _ in range(2):
    state, metrics = step(state, _batch(3))
  assert bool(metrics["finite"]) and int(state.skipped) == 0
  assert _dropout_count(state.model_state["encoder"]["drop"]) == 2
  update_module(model, state.params, state.model_state)
  written = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  np.testing.assert_array_equal(written["heads"]["kernel"], state.params["heads"]["kernel"])


def test_stateful_heads_refuse_decode():
  model = _MultiTask(head_dropout=0.5)
  fns = nnx_task_functions(model, _task_losses)
  params, model_state = fns.init()
  batch = _batch(0)
  z, _ = fns.encode(params, model_state, batch)
  with pytest.raises(ValueError, match="keep BatchNorm and Dropout in the trunk"):
    fns.decode(params, z, batch)
  losses, new_state = fns.loss_fn(params, model_state, batch)  # the whole model is fine
  assert losses.shape == (K,) and _dropout_count(new_state["head_drop"]) == 1


def test_plain_call_and_trunk_errors():
  seq = nnx.Sequential(
    nnx.Linear(D_IN, D_HID, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(D_HID, K, rngs=nnx.Rngs(1))
  )
  fns = nnx_task_functions(seq, _task_losses, trunk="layers.0")
  params, model_state = fns.init()
  assert fns.encode is None and fns.decode is None and model_state is None
  mask = fns.shared(params)
  assert mask["layers"][0]["kernel"] and not mask["layers"][2]["kernel"]
  step = nm.make_train_step(
    fns.loss_fn, nm.ntkmtl(K, shared=fns.shared), optax.sgd(0.1), has_state=True
  )
  state, metrics = step(step.init(params, model_state), _batch(0))
  assert bool(metrics["finite"])
  with pytest.raises(ValueError, match="holds no nnx.Param"):
    nnx_task_functions(seq, _task_losses, trunk="backbone")
  with pytest.raises(TypeError, match="task_functions"):
    nnx_task_functions(_LinenEncoder(), _task_losses)
