"""ntkmtl_jax/models/layers.py: the BatchNorm that can keep PyTorch's unbiased running variance,
against flax's BatchNorm and a float64 NumPy version of PyTorch's documented update, and the
CelebA network and SegNet-MTAN built with it. (Float32 matmuls at "highest": conftest.py.)"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkmtl_jax.models.celeba import celeba_functions
from ntkmtl_jax.models.layers import BatchNorm
from ntkmtl_jax.models.mtan import mtan_functions

SHAPES = {"1d": (16, 5), "2d": (4, 3, 5, 6)}  # (B, C) and (B, H, W, C)
MOMENTUM, EPS = 0.9, 1e-5


def _inputs(seed, shape, count=1):
  rng = np.random.default_rng(seed)
  scale = rng.uniform(0.5, 3.0, shape[-1])
  shift = rng.normal(size=shape[-1])
  return [(rng.normal(size=shape) * scale + shift).astype(np.float32) for _ in range(count)]


def _random_variables(variables, seed):
  """`variables` with every leaf replaced by a random one (scale and var positive)."""
  rng = np.random.default_rng(seed + 100)
  return jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 2.0, a.shape), a.dtype), variables)


@pytest.mark.parametrize("kind", SHAPES)
@pytest.mark.parametrize("momentum", [0.9, 0.99])
def test_default_is_flax_batch_norm(seed, kind, momentum):
  x, x2 = _inputs(seed, SHAPES[kind], 2)
  ours = BatchNorm(use_running_average=False, momentum=momentum, epsilon=EPS)
  theirs = nn.BatchNorm(use_running_average=False, momentum=momentum, epsilon=EPS)
  variables = ours.init(jax.random.key(seed), x)
  want = theirs.init(jax.random.key(seed), x)
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(want)
  jax.tree.map(np.testing.assert_array_equal, variables, want)
  assert set(variables) == {"params", "batch_stats"}
  assert set(variables["params"]) == {"scale", "bias"}
  assert set(variables["batch_stats"]) == {"mean", "var"}
  variables = _random_variables(variables, seed)
  # Training mode: the outputs and the updated statistics, twice in a row.
  state = variables
  for batch in (x, x2):
    y, updates = ours.apply(state, batch, mutable=["batch_stats"])
    y_want, updates_want = theirs.apply(state, batch, mutable=["batch_stats"])
    np.testing.assert_array_equal(y, y_want)
    jax.tree.map(np.testing.assert_array_equal, updates, updates_want)
    state = {**state, **updates}
  # Evaluation mode (the field, and the call argument that overrides it).
  for model, reference in (
    (ours.copy(use_running_average=True), theirs.copy(use_running_average=True)),
    (BatchNorm(momentum=momentum), nn.BatchNorm(momentum=momentum)),
  ):
    kwargs = {} if model.use_running_average else {"use_running_average": True}
    np.testing.assert_array_equal(
      model.apply(state, x, **kwargs), reference.apply(state, x, **kwargs)
    )


def test_a_model_using_it_has_flax_variable_names():
  """Inside a module it is auto-named `BatchNorm_i`, as flax's: checkpoints and weight maps
  written for `nn.BatchNorm` trees load unchanged."""

  def model(norm):
    class Net(nn.Module):
      @nn.compact
      def __call__(self, x):
        for _ in range(2):
          x = norm(use_running_average=False)(nn.Dense(4)(x))
        return x

    return Net()

  x = np.ones((3, 2), np.float32)
  got = jax.eval_shape(model(BatchNorm).init, jax.random.key(0), x)
  want = jax.eval_shape(model(nn.BatchNorm).init, jax.random.key(0), x)
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  assert set(got["batch_stats"]) == {"BatchNorm_0", "BatchNorm_1"}


def _torch_reference(xs, mean, var, scale, bias):
  """PyTorch's documented BatchNorm in float64: each batch normalised by its own mean and
  biased variance; running_mean <- 0.9 running_mean + 0.1 mean, running_var <-
  0.9 running_var + 0.1 unbiased variance. Returns the outputs and the running statistics."""
  mean, var = np.float64(mean), np.float64(var)
  outputs = []
  for x in xs:
    flat = np.float64(x).reshape(-1, x.shape[-1])
    batch_mean, biased = flat.mean(0), flat.var(0)
    unbiased = flat.var(0, ddof=1)
    outputs.append((x - batch_mean) / np.sqrt(biased + EPS) * scale + bias)
    mean = 0.9 * mean + 0.1 * batch_mean
    var = 0.9 * var + 0.1 * unbiased
  return outputs, mean, var


@pytest.mark.parametrize("kind", SHAPES)
@pytest.mark.parametrize("updates", [1, 3])
def test_unbiased_running_var_follows_pytorch(seed, kind, updates):
  xs = _inputs(seed, SHAPES[kind], updates)
  ours = BatchNorm(use_running_average=False, momentum=MOMENTUM, epsilon=EPS,
                   unbiased_running_var=True)  # fmt: skip
  flax_bn = ours.copy(unbiased_running_var=False)
  variables = _random_variables(ours.init(jax.random.key(seed), xs[0]), seed)
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
    flax_bn.init(jax.random.key(seed), xs[0])
  )
  scale, bias = (np.float64(variables["params"][k]) for k in ("scale", "bias"))
  stats = variables["batch_stats"]
  want_y, want_mean, want_var = _torch_reference(xs, stats["mean"], stats["var"], scale, bias)
  state, flax_state = variables, variables
  for x, y_ref in zip(xs, want_y):
    y, new = ours.apply(state, x, mutable=["batch_stats"])
    y_flax, flax_new = flax_bn.apply(flax_state, x, mutable=["batch_stats"])
    # Training outputs: flax's (the batch's biased variance), whatever the running stats.
    np.testing.assert_array_equal(y, y_flax, err_msg=f"seed={seed}")
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5, err_msg=f"seed={seed}")
    state, flax_state = {**state, **new}, {**flax_state, **flax_new}
  got = state["batch_stats"]
  np.testing.assert_allclose(got["mean"], want_mean, rtol=1e-6, atol=1e-6, err_msg=f"seed={seed}")
  np.testing.assert_allclose(got["var"], want_var, rtol=1e-6, err_msg=f"seed={seed}")
  np.testing.assert_array_equal(got["mean"], flax_state["batch_stats"]["mean"])
  assert np.all(got["var"] > flax_state["batch_stats"]["var"])
  # Evaluation mode normalises by the running statistics.
  x = xs[0]
  want_eval = (x - want_mean) / np.sqrt(want_var + EPS) * scale + bias
  got_eval = ours.copy(use_running_average=True).apply(state, x)
  np.testing.assert_allclose(got_eval, want_eval, rtol=1e-5, atol=1e-5, err_msg=f"seed={seed}")


@pytest.mark.parametrize(
  "shape", [(256, 512), (8, 4, 4, 3), (1, 3)], ids=["bn1d_256", "bn2d", "n1"]
)
def test_first_update_from_init_differs_by_the_correction(seed, shape):
  """From the init (mean 0, var 1), one update: flax's var is 0.9 + 0.1 v (v the biased batch
  variance), torch's 0.9 + 0.1 v n / (n - 1), a relative difference of
  0.1 v / (n - 1) / (0.9 + 0.1 v); the updates themselves (var - 0.9) differ by n/(n-1) - 1,
  1/255 = 0.39 % for the CelebA network's BatchNorm1d layers at batch 256. At n = 1 the
  batch variance is 0 and the factor 1 (PyTorch refuses to train on one value)."""
  (x,) = _inputs(seed, shape)
  n = int(np.prod(shape[:-1]))
  bn = BatchNorm(use_running_average=False, momentum=MOMENTUM, epsilon=EPS)
  variables = bn.init(jax.random.key(0), x)
  _, flax_stats = bn.apply(variables, x, mutable=["batch_stats"])
  _, torch_stats = bn.copy(unbiased_running_var=True).apply(variables, x, mutable=["batch_stats"])
  flax_var = np.float64(flax_stats["batch_stats"]["var"])
  torch_var = np.float64(torch_stats["batch_stats"]["var"])
  v = np.float64(x).reshape(n, -1).var(0)
  if n == 1:
    np.testing.assert_array_equal(torch_var, flax_var)
    np.testing.assert_allclose(flax_var, 0.9, rtol=1e-6)
    return
  want = 0.1 * v / (n - 1) / (0.9 + 0.1 * v)
  np.testing.assert_allclose(torch_var / flax_var - 1, want, rtol=2e-3, atol=1e-7)
  np.testing.assert_allclose(torch_var, 0.9 + 0.1 * v * n / (n - 1), rtol=1e-6)
  # From zero running variance the ratio is the correction itself.
  zero = {**variables, "batch_stats": jax.tree.map(jnp.zeros_like, variables["batch_stats"])}
  _, f = bn.apply(zero, x, mutable=["batch_stats"])
  _, t = bn.copy(unbiased_running_var=True).apply(zero, x, mutable=["batch_stats"])
  ratio = np.float64(t["batch_stats"]["var"]) / np.float64(f["batch_stats"]["var"])
  np.testing.assert_allclose(ratio, n / (n - 1), rtol=1e-6)
  if shape == (256, 512):
    np.testing.assert_allclose(ratio - 1, 1 / 255, rtol=2e-4)


def test_masked_and_sharded_counts(seed):
  """Under `mask` n is the masked count; with `axis_name` the count over the whole axis."""
  (x,) = _inputs(seed, (12, 4))
  bn = BatchNorm(use_running_average=False, momentum=MOMENTUM, unbiased_running_var=True)
  variables = bn.init(jax.random.key(0), x)
  keep = np.arange(12) % 3 != 0
  _, stats = bn.apply(variables, x, mask=keep[:, None], mutable=["batch_stats"])
  want = 0.9 + 0.1 * np.float64(x[keep]).var(0, ddof=1)
  np.testing.assert_allclose(stats["batch_stats"]["var"], want, rtol=1e-6)
  # Three shards of 4 rows with axis_name: the running stats of the whole batch of 12.
  sharded = bn.copy(axis_name="shards")
  update = lambda xs: sharded.apply(variables, xs, mutable=["batch_stats"])[1]
  stats = jax.vmap(update, axis_name="shards")(x.reshape(3, 4, 4))
  whole = 0.9 + 0.1 * np.float64(x).var(0, ddof=1)
  np.testing.assert_allclose(stats["batch_stats"]["var"], np.broadcast_to(whole, (3, 4)), rtol=1e-6)


def _zero_running_var(state):
  """The model state with every running variance 0: one update then leaves 0.1 * the batch
  variance (flax) or 0.1 * the unbiased one (torch), whose ratio is n / (n - 1)."""
  return jax.tree_util.tree_map_with_path(
    lambda path, a: jnp.zeros_like(a) if path[-1].key == "var" else a, state
  )


def _check_network(make, batch, counts):
  """Same variables at init, training losses and running means for both settings; each
  running variance (from 0) larger by n / (n - 1), n from `counts(path)`. (The training
  outputs do not read the running statistics, so the gradients are the same too.)"""
  biased, unbiased = make(False), make(True)
  assert biased != unbiased and len({biased: 0, unbiased: 1}) == 2  # jit caches keep both
  key = jax.random.key(0, impl="rbg")
  params, state = jax.jit(biased.init)(key, batch)
  shapes = jax.eval_shape(unbiased.init, key, batch)
  assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure((params, state))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), shapes) == jax.tree.map(
    lambda a: (a.shape, a.dtype), (params, state)
  )
  state = _zero_running_var(state)
  losses, new = biased.loss_fn(params, state, batch)
  losses_t, new_t = unbiased.loss_fn(params, state, batch)
  np.testing.assert_array_equal(losses_t, losses)
  flat = jax.tree_util.tree_flatten_with_path(new)[0]
  flat_t = jax.tree.leaves(new_t)
  assert len(flat) == len(flat_t)
  for (path, a), b in zip(flat, flat_t):
    name = jax.tree_util.keystr(path)
    if path[-1].key == "mean":
      np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7, err_msg=name)
    else:
      n = counts(path)
      np.testing.assert_allclose(
        np.float64(b) / np.float64(a), n / (n - 1), rtol=1e-5, err_msg=name
      )
  return new, new_t


@pytest.mark.one_seed
def test_celeba_network_keeps_the_unbiased_running_variance(seed):
  rng = np.random.default_rng(seed)
  b = 4
  batch = {"x": rng.random((b, 16, 16, 3), np.float32), "y": rng.integers(0, 2, (b, 3))}
  # The seven convolutions see 16, 8, 8, 4, 4, 2, 2 pixels a side; the dense layers 1.
  sides = (16, 8, 8, 4, 4, 2, 2, 1, 1)
  counts = lambda path: b * sides[int(path[1].key.split("_")[1])] ** 2
  _, new_t = _check_network(
    lambda unbiased: celeba_functions(3, unbiased_running_var=unbiased), batch, counts
  )
  assert set(new_t["batch_stats"]) == {f"BatchNorm_{i}" for i in range(9)}


@pytest.mark.one_seed
def test_mtan_keeps_the_unbiased_running_variance(seed):
  rng = np.random.default_rng(seed)
  batch = {
    "image": rng.random((2, 8, 8, 3), np.float32),
    "label": rng.integers(-1, 13, (2, 8, 8)).astype(np.int32),
    "depth": rng.uniform(0.0, 3.0, (2, 8, 8, 1)).astype(np.float32),
    "normal": rng.normal(size=(2, 8, 8, 3)).astype(np.float32),
  }
  # One stage: every BatchNorm works at the full 8x8 resolution.
  make = lambda unbiased: mtan_functions(
    13, ("segmentation", "depth", "normal"), (4,), unbiased_running_var=unbiased
  )
  new, _ = _check_network(make, batch, lambda path: 2 * 8 * 8)
  assert len(jax.tree.leaves(new)) == 2 * (6 + 3 * 4)  # 6 conv layers, 4 BN per task's masks
