"""Masks as optax takes them (full, prefix, callable, from paths), the warning for an implicit
all-shared mask, and the glue between a model and the step: each misuse gets one message
that names the problem and the fix."""

from __future__ import annotations

import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TanhMLP
from flax import nnx

import ntkmtl_jax as nm
from ntkmtl_jax import _tree
from ntkmtl_jax.models import TaskFunctions, nnx_task_functions, task_functions
from ntkmtl_jax.models.multitask import LinearHeads

K = 2


@pytest.fixture(autouse=True)
def fresh_warning_registry(monkeypatch):
  """The all-shared warning is said once per process; every test starts before it."""
  monkeypatch.setattr(_tree, "_WARNED_ALL_SHARED", set())


def _linen_params(rng, num_heads=2):
  """A linen-style tree: {"params": {"trunk": {...}, "head_0": {...}, ...}}."""
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  inner = {"trunk": {"Dense_0": {"kernel": normal(4, 6), "bias": normal(6)}}}
  for i in range(num_heads):
    inner[f"head_{i}"] = {"kernel": normal(6, 1), "bias": normal(1)}
  return {"params": inner}


def _linen_losses(params, batch):
  p = params["params"]
  h = jnp.tanh(batch["x"] @ p["trunk"]["Dense_0"]["kernel"] + p["trunk"]["Dense_0"]["bias"])
  heads = sorted(name for name in p if name.startswith("head_"))
  preds = jnp.concatenate([h @ p[n]["kernel"] + p[n]["bias"] for n in heads], axis=1)
  return jnp.mean((preds - batch["y"]) ** 2, axis=0)


def _numpy_weights(params, batch, shared_names):
  """NTKMTL n = 1 weights in float64 NumPy: (sum_j ||g_j||^2 / ||g_i||^2) ** 0.5, with g_i
  task i's gradient over the parameters under `shared_names` (finite parts by hand)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  x, y = np.asarray(batch["x"], np.float64), np.asarray(batch["y"], np.float64)
  w1, b1 = p["trunk"]["Dense_0"]["kernel"], p["trunk"]["Dense_0"]["bias"]
  h = np.tanh(x @ w1 + b1)
  m = x.shape[0]
  sq = []
  for i in range(y.shape[1]):
    head = p[f"head_{i}"]
    err = h @ head["kernel"][:, 0] + head["bias"][0] - y[:, i]  # (m,)
    parts = {}
    da = (2.0 / m) * err[:, None] * head["kernel"][:, 0][None, :] * (1.0 - h**2)
    parts["trunk"] = np.sum((x.T @ da) ** 2) + np.sum(da.sum(0) ** 2)
    head_sq = np.sum(((2.0 / m) * h.T @ err) ** 2) + ((2.0 / m) * err.sum()) ** 2
    for j in range(y.shape[1]):
      parts[f"head_{j}"] = head_sq if j == i else 0.0
    sq.append(sum(parts[name] for name in shared_names))
  sq = np.asarray(sq)
  return (sq.sum() / sq) ** 0.5


def _hard_batch(rng, num_tasks, scales):
  x = rng.normal(size=(8, 4))
  y = rng.normal(size=(8, num_tasks)) * np.asarray(scales)
  return {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)}


def _jitted_weights(apply_fn, shared):
  """`ntk_weights(...).weights` as one compiled call (n = 1)."""
  return jax.jit(lambda p, b: nm.ntk_weights(apply_fn, p, b, shared=shared).weights)


# ------------------------------------------------------------------------------ the mask


@pytest.mark.parametrize("scales", [(1.0, 1e4), (1e2, 1.0, 1e-2)])
def test_prefix_callable_and_path_masks_give_the_numpy_weights(seed, scales):
  rng = np.random.default_rng(seed)
  params = _linen_params(rng, num_heads=len(scales))
  batch = _hard_batch(rng, len(scales), scales)
  heads = {f"head_{i}": False for i in range(len(scales))}
  prefix = {"params": {"trunk": True, **heads}}
  full = jax.tree_util.tree_map_with_path(
    lambda path, _: path[1].key == "trunk", params
  )  # what a linen user wrote by hand before
  masks = {
    "prefix": prefix,
    "full": full,
    "callable": lambda p: prefix,
    "shared_mask": nm.shared_mask(params, include="trunk"),
    "shared_mask fn": nm.shared_mask(include="params/trunk"),
    "regex": nm.shared_mask(params, exclude=re.compile(r"/head_\d+/")),
    "predicate": nm.shared_mask(
      params, include=lambda path, leaf: leaf.shape[0] == 4 or path[-2] == "Dense_0"
    ),
  }
  full_bools = _tree.resolve_mask(full, params)
  for name, mask in masks.items():  # every form resolves to the same bools
    assert _tree.resolve_mask(mask, params) == full_bools, name
  want = _numpy_weights(params, batch, ["trunk"])
  with warnings.catch_warnings():
    warnings.simplefilter("error", nm.AllSharedWarning)
    got = _jitted_weights(_linen_losses, prefix)(params, batch)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4)
  # All shared (True, or None with its warning): the heads' gradients enter the norms.
  everything = _numpy_weights(params, batch, ["trunk", *heads])
  got = _jitted_weights(_linen_losses, True)(params, batch)
  np.testing.assert_allclose(np.asarray(got), everything, rtol=2e-4)
  assert not np.allclose(everything, want, rtol=1e-3)  # the mask changes the numbers


def test_prefix_mask_resolves_to_the_full_mask():
  params = _linen_params(np.random.default_rng(0))
  resolved = _tree.resolve_mask({"params": {"trunk": True, "head_0": False, "head_1": 0}}, params)
  assert resolved == {
    "params": {
      "trunk": {"Dense_0": {"kernel": True, "bias": True}},
      "head_0": {"kernel": False, "bias": False},
      "head_1": {"kernel": False, "bias": False},
    }
  }
  assert _tree.resolve_mask(True, params) == jax.tree.map(lambda _: True, params)


def test_the_step_takes_a_prefix_mask():
  rng = np.random.default_rng(1)
  params = _linen_params(rng)
  batch = _hard_batch(rng, 2, (1.0, 30.0))
  prefix = {"params": {"trunk": True, "head_0": False, "head_1": False}}
  step = nm.make_train_step(_linen_losses, nm.ntkmtl(2, shared=prefix), optax.sgd(0.1))
  state, metrics = step(step.init(params), batch)
  want = _numpy_weights(params, batch, ["trunk"])
  got = np.asarray(metrics["weights"], np.float64)
  np.testing.assert_allclose(got / got.sum(), want / want.sum(), rtol=2e-4)
  # official NTKMTL: the heads get their plain gradients, whatever the trunk's weights
  for i in range(2):
    head = f"head_{i}"
    moved = state.params["params"][head]["bias"] - params["params"][head]["bias"]
    err = (
      jnp.tanh(
        batch["x"] @ params["params"]["trunk"]["Dense_0"]["kernel"]
        + params["params"]["trunk"]["Dense_0"]["bias"]
      )
      @ params["params"][head]["kernel"][:, 0]
      + params["params"][head]["bias"][0]
      - batch["y"][:, i]
    )
    np.testing.assert_allclose(moved, -0.1 * 2.0 * jnp.mean(err)[None], rtol=1e-4)


@pytest.mark.parametrize(
  "mask, where, both",
  [
    (
      {"params": {"trunk": True, "head_0": False}},
      "at ['params']",
      "the mask has keys ['head_0', 'trunk'], the parameters have keys "
      "['head_0', 'head_1', 'trunk'] (missing from the mask: ['head_1'])",
    ),
    (
      {"params": {"trunk": True, "heads": False, "head_0": False, "head_1": False}},
      "at ['params']",
      "(not in the parameters: ['heads'])",
    ),
    (
      {"trunk": True, "head_0": False, "head_1": False},
      "at the top level",
      "the mask has keys ['head_0', 'head_1', 'trunk'], the parameters have keys ['params']",
    ),
    (
      {
        "params": {
          "trunk": {"Dense_0": {"kernel": {"w": True}, "bias": True}},
          "head_0": False,
          "head_1": False,
        }
      },
      "at ['params']['trunk']['Dense_0']['kernel']",
      "the mask has keys ['w'] where the parameters have an array of shape (4, 6)",
    ),
  ],
)
def test_mismatched_mask_names_the_first_differing_key(mask, where, both):
  params = _linen_params(np.random.default_rng(0))
  with pytest.raises(ValueError) as info:
    nm.ntk_weights(
      _linen_losses, params, _hard_batch(np.random.default_rng(0), 2, (1, 1)), shared=mask
    )
  message = str(info.value)
  assert "does not match the parameter tree " + where in message
  assert both in message
  assert "shared_mask" in message and "prefix" in message  # the fix
  assert "PyTreeDef" not in message  # not a dump of the whole structure


def test_mask_from_a_function_and_a_bad_leaf_are_named():
  params = _linen_params(np.random.default_rng(0))
  with pytest.raises(
    ValueError,
    match=r"The mask that `shared\(params\)` returned does not "
    r"match the parameter tree at the top level",
  ):
    _tree.resolve_mask(lambda p: {"encoder": True}, params)
  elementwise = {
    "params": {
      "trunk": {"Dense_0": {"kernel": jnp.ones((4, 6), bool), "bias": True}},
      "head_0": False,
      "head_1": False,
    }
  }
  with pytest.raises(
    ValueError,
    match=re.escape(
      "has an array of shape (4, 6) and dtype bool at ['params']['trunk']['Dense_0']"
      "['kernel'], where a bool (True: shared) or a subtree of bools belongs"
    ),
  ):
    _tree.resolve_mask(elementwise, params)


def test_shared_mask_refuses_a_pattern_that_matches_nothing():
  params = _linen_params(np.random.default_rng(0))
  with pytest.raises(
    ValueError,
    match=r"the pattern 'trnk' matches no parameter; the "
    r"parameter paths are \['params/head_0/bias', 'params/head_0/kernel'",
  ):
    nm.shared_mask(params, include="trnk")
  with pytest.raises(ValueError, match="exclude=.*leaves no parameter shared"):
    nm.shared_mask(params, exclude=["trunk", "head_0", "head_1"])
  with pytest.raises(TypeError, match=r"compiled regular expressions \(re.compile\)"):
    nm.shared_mask(params, include=3)
  # Runs of names match consecutive keys only; "." separates like "/".
  mask = nm.shared_mask(params, include="trunk.Dense_0.bias")
  assert jax.tree.leaves(mask).count(True) == 1


# ------------------------------------------------------------------- shared=None warns


def _catch(build):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    build()
  return [w for w in caught if issubclass(w.category, nm.AllSharedWarning)]


@pytest.mark.parametrize(
  "name, make",
  [
    ("ntkmtl", lambda: nm.ntkmtl(K)),
    ("ntkmtl n=2", lambda: nm.ntkmtl(K, num_chunks=2)),
    ("official", lambda: nm.official_ntkmtl(K)[0]),
    ("mgda", lambda: nm.methods.get("mgda", K)),
    ("pcgrad", lambda: nm.methods.get("pcgrad", K)),
    ("nash_mtl", lambda: nm.methods.get("nash_mtl", K)),
    ("ntkmtl_sr, sum heads", lambda: nm.ntkmtl_sr(K, head_gradients="sum")),
  ],
)
def test_shared_none_warns_once_saying_the_heads_count_as_shared(name, make):
  model = TanhMLP(np.random.default_rng(0), num_tasks=K)
  build = lambda: nm.make_train_step(
    model.loss_fn, make(), optax.sgd(0.1), encode=lambda p, b: b["x"], decode=lambda p, z, b: z
  )
  first = _catch(build)
  assert len(first) == 1, name
  message = str(first[0].message)
  assert "shared=None treats every parameter as shared, the task heads included" in message
  assert "shared=True" in message and "shared_mask" in message
  assert _catch(build) == []  # once


@pytest.mark.parametrize(
  "make",
  [
    lambda: nm.methods.get("ls", K),  # its update never reads the mask
    lambda: nm.ntkmtl_sr(K),  # weighted heads: one backward pass of sum_i w_i l_i
    lambda: nm.ntkmtl(K, shared=True),
    lambda: nm.ntkmtl(K, shared=TanhMLP.shared),
    lambda: nm.methods.get("mgda", K, shared={"shared": True, "heads": False}),
  ],
)
def test_no_warning_where_the_mask_changes_nothing_or_is_explicit(make):
  model = TanhMLP(np.random.default_rng(0), num_tasks=K)
  build = lambda: nm.make_train_step(
    model.loss_fn, make(), optax.sgd(0.1), encode=lambda p, b: b["x"], decode=lambda p, z, b: z
  )
  assert _catch(build) == []


def test_ntk_weights_warns_for_shared_none_and_true_is_the_same_numbers():
  model = TanhMLP(np.random.default_rng(2), num_tasks=3, task_scales=(1.0, 1e2, 1e4))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    implicit = _jitted_weights(model.loss_fn, None)(model.params, model.batch)
    explicit = _jitted_weights(model.loss_fn, True)(model.params, model.batch)
  caught = [w for w in caught if issubclass(w.category, nm.AllSharedWarning)]
  assert len(caught) == 1 and "ntk_weights: shared=None" in str(caught[0].message)
  np.testing.assert_array_equal(np.asarray(implicit), np.asarray(explicit))


# ------------------------------------------------------------------------------ the glue


class _NNXModel(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.encoder = nnx.Sequential(nnx.Linear(4, 8, rngs=rngs), nnx.BatchNorm(8, rngs=rngs))
    self.heads = nnx.Linear(8, K, rngs=rngs)

  def encode(self, x):
    return nnx.tanh(self.encoder(x))

  def decode(self, z):
    return self.heads(z)

  def __call__(self, x):
    return self.decode(self.encode(x))


def _task_losses(outputs, batch):
  return jnp.mean((outputs - batch["y"]) ** 2, axis=0)


def _batch(seed=0, scales=(1.0, 50.0)):
  rng = np.random.default_rng(seed)
  return {
    "x": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
    "y": jnp.asarray(rng.normal(size=(8, K)) * np.asarray(scales), jnp.float32),
  }


@pytest.fixture
def nnx_fns():
  return nnx_task_functions(_NNXModel(nnx.Rngs(0)), _task_losses, trunk="encoder")


class _Encoder(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    return nn.tanh(nn.Dense(8)(x))


def test_task_functions_carry_has_state_encode_decode_and_mask(nnx_fns):
  linen = task_functions(_Encoder(), LinearHeads(K), _task_losses)
  for fns in (nnx_fns, linen):
    assert isinstance(fns, TaskFunctions) and fns.has_state is True
    assert callable(fns.encode) and callable(fns.decode) and callable(fns.shared)


def test_the_step_takes_the_object_and_its_mask(nnx_fns):
  params, model_state = nnx_fns.init()
  batch = _batch()
  explicit = nm.make_train_step(
    nnx_fns.loss_fn,
    nm.ntkmtl(K, shared=nnx_fns.shared),
    optax.sgd(0.1),
    has_state=True,
    encode=nnx_fns.encode,
    decode=nnx_fns.decode,
  )
  with warnings.catch_warnings():
    warnings.simplefilter("error", nm.AllSharedWarning)  # the object's mask is taken
    whole = nm.make_train_step(nnx_fns, nm.ntkmtl(K), optax.sgd(0.1))
    method_step = nnx_fns.train_step(nm.ntkmtl(K), optax.sgd(0.1))
    sr = nnx_fns.train_step(nm.ntkmtl_sr(K, num_chunks=2), optax.sgd(0.1))  # needs encode
  for step in (whole, method_step, sr):
    assert step.method.shared is nnx_fns.shared
  results = [s(s.init(params, model_state), batch) for s in (explicit, whole)]
  jax.tree.map(np.testing.assert_array_equal, results[1][0].params, results[0][0].params)
  np.testing.assert_array_equal(results[1][1]["weights"], results[0][1]["weights"])
  # A method's own mask wins over the object's.
  own = nm.shared_mask(include="encoder.layers.0")
  assert nnx_fns.train_step(nm.ntkmtl(K, shared=own), optax.sgd(0.1)).method.shared is own


def test_the_object_with_contradicting_options_is_refused(nnx_fns):
  with pytest.raises(
    ValueError,
    match=r"has_state=False contradicts the TaskFunctions given, "
    r"whose functions have has_state=True: leave has_state out",
  ):
    nm.make_train_step(nnx_fns, nm.ntkmtl(K), optax.sgd(0.1), has_state=False)
  with pytest.raises(ValueError, match="either a TaskFunctions .* or encode=/decode=, not both"):
    nm.make_train_step(nnx_fns, nm.ntkmtl(K), optax.sgd(0.1), encode=nnx_fns.encode)


def test_stateful_functions_without_has_state_name_it(nnx_fns):
  method = nm.ntkmtl(K, shared=nnx_fns.shared)
  with pytest.raises(
    TypeError,
    match=r"has_state=False calls loss_fn\(params, batch\), but "
    r"loss_fn takes three arguments .*pass has_state=True, or give "
    r"make_train_step the TaskFunctions object itself",
  ):
    nm.make_train_step(nnx_fns.loss_fn, method, optax.sgd(0.1))
  with pytest.raises(TypeError, match=r"has_state=False calls encode\(params, batch\)"):
    nm.make_train_step(
      None,
      nm.ntkmtl_sr(K, shared=nnx_fns.shared),
      optax.sgd(0.1),
      encode=nnx_fns.encode,
      decode=nnx_fns.decode,
    )


def test_stateless_functions_with_has_state_name_it():
  model = TanhMLP(np.random.default_rng(0), num_tasks=K)
  with pytest.raises(
    TypeError,
    match=r"has_state=True calls loss_fn\(params, model_state, "
    r"batch\), but loss_fn takes \(params, batch\): pass has_state=False",
  ):
    nm.make_train_step(
      model.loss_fn, nm.ntkmtl(K, shared=model.shared), optax.sgd(0.1), has_state=True
    )
  with pytest.raises(
    TypeError,
    match=r"has_state=True calls encode\(params, model_state, "
    r"batch\), but encode takes \(params, batch\)",
  ):
    nm.make_train_step(
      None,
      nm.ntkmtl_sr(K, shared=model.shared),
      optax.sgd(0.1),
      has_state=True,
      encode=lambda p, b: b["x"],
      decode=lambda p, z, b: z,
    )


def test_ntk_weights_given_stateful_functions_names_losses_at(nnx_fns):
  params, model_state = nnx_fns.init()
  for apply_fn in (nnx_fns.loss_fn, nnx_fns):
    with pytest.raises(TypeError, match=r"ntk_weights .*pass fns\.losses_at\(model_state\)"):
      nm.ntk_weights(apply_fn, params, _batch(), shared=nnx_fns.shared)
  ok = _jitted_weights(nnx_fns.losses_at(model_state), nnx_fns.shared)(params, _batch())
  assert np.all(np.isfinite(ok))


@pytest.mark.parametrize("builder", ["nnx_task_functions", "task_functions"])
def test_a_batch_without_the_input_key_names_the_option(builder, nnx_fns):
  if builder == "nnx_task_functions":
    fns = nnx_fns
    params, model_state = fns.init()
  else:
    fns = task_functions(_Encoder(), LinearHeads(K), _task_losses)
    params, model_state = fns.init(jax.random.key(0), _batch())
  step = fns.train_step(nm.ntkmtl(K), optax.sgd(0.1))
  batch = {"image": _batch()["x"], "y": _batch()["y"]}
  with pytest.raises(
    KeyError,
    match=re.escape(
      f"The batch has no entry 'x', which {builder} feeds to the model (input_key='x'); its "
      f"entries are ['image', 'y']. Pass {builder}(..., input_key=...) the name of the "
      "input entry."
    ),
  ):
    step(step.init(params, model_state), batch)
  with pytest.raises(
    TypeError,
    match=r"The batch is a tuple, but .* batch\['x'\] \(its "
    r"input_key option\): give batches as dicts",
  ):
    fns.predict(params, model_state, (batch["image"], batch["y"]))


def test_integer_parameters_are_refused_in_one_line():
  model = TanhMLP(np.random.default_rng(0), num_tasks=K)
  params = dict(model.params, heads={"w": jnp.ones((6, K), jnp.int32)})
  message = (
    r"the parameter at \['heads'\]\['w'\] has dtype int32, and only floating-point "
    r"parameters have gradients; cast it \(x.astype\(jnp.float32\)\)"
  )
  step = nm.make_train_step(model.loss_fn, nm.ntkmtl(K, shared=model.shared), optax.sgd(0.1))
  with pytest.raises(TypeError, match="make_train_step: " + message) as info:
    step(step.init(params), model.batch)
  assert "\n" not in str(info.value)
  with pytest.raises(TypeError, match="ntk_weights: " + message):
    nm.ntk_weights(model.loss_fn, params, model.batch, shared=model.shared)


def test_representation_methods_without_encode_decode_name_the_options():
  class Whole(nnx.Module):  # no encode/decode methods: the losses come from model(x)
    def __init__(self, rngs):
      self.encoder = nnx.Linear(4, 8, rngs=rngs)
      self.out = nnx.Linear(8, K, rngs=rngs)

    def __call__(self, x):
      return self.out(self.encoder(x))

  fns = nnx_task_functions(Whole(nnx.Rngs(0)), _task_losses, trunk="encoder")
  assert fns.decode is None
  with pytest.raises(
    ValueError,
    match=r"ntkmtl_sr takes the kernel at the shared "
    r"representation: .*its encode= and decode= options",
  ):
    fns.train_step(nm.ntkmtl_sr(K), optax.sgd(0.1))
