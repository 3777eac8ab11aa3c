"""Shared fixtures: fixed random seeds, float32 matmuls pinned to full precision, and a
small multi-task MLP with a hand-written float64 NumPy reference of its per-task gradients."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Every test that takes `seed` runs once per seed here, so a run is reproducible and a
# failure names its seed in the test id (`test_x[seed1]`). NTKMTL_TEST_SEEDS="5,6,7" tries
# others. Slow tests (end-to-end training, notebooks, pipelines) take the first seed only:
# mark them `@pytest.mark.one_seed`.
SEEDS = tuple(int(s) for s in os.environ.get("NTKMTL_TEST_SEEDS", "0,1,2").split(","))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout


def enable_x64(enabled: bool = True):
  """Context manager for 64-bit jax numbers: `jax.enable_x64` where it exists (newer jax),
  `jax.experimental.enable_x64` on the oldest supported jax (0.5.3)."""
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(enabled)
  from jax.experimental import enable_x64 as experimental_enable_x64

  return experimental_enable_x64(enabled)


def pytest_configure(config):
  # The `ntkmtl` command keeps compiled steps on disk by default; the tests that call it in
  # process must not fill the user's cache (tests/test_cli.py checks the cache on its own).
  os.environ.setdefault("NTKMTL_NO_COMPILATION_CACHE", "1")
  config.addinivalue_line("markers", "one_seed: a slow test, run with the first seed only")
  config.addinivalue_line(
    "markers",
    "default_precision: run at the backend's default matmul precision instead "
    "of 'highest' (e.g. TF32 on NVIDIA GPUs, bfloat16 passes on TPU)",
  )


def pytest_generate_tests(metafunc):
  if "seed" in metafunc.fixturenames:
    seeds = SEEDS[:1] if metafunc.definition.get_closest_marker("one_seed") else SEEDS
    metafunc.parametrize("seed", seeds, ids=[f"seed{s}" for s in seeds])


@pytest.fixture(autouse=True)
def highest_matmul_precision(request, monkeypatch):
  """Float32 matmuls and convolutions at full float32 precision, here and in subprocesses.

  The tests compare float32 results with float64 NumPy references at float32 tolerances.
  On NVIDIA GPUs the default precision of a float32 matmul is TF32 (10-bit mantissa), on
  TPUs bfloat16 passes, so those comparisons would measure the backend's default precision
  instead of the code; tests/test_default_precision.py checks what that default gives.
  """
  if request.node.get_closest_marker("default_precision"):
    yield
    return
  monkeypatch.setenv("JAX_DEFAULT_MATMUL_PRECISION", "highest")
  with jax.default_matmul_precision("highest"):
    yield


class TanhMLP:
  """h = tanh(x W1 + b1); task i predicts h @ W2[:, i]; loss_i = mean_b (pred - y_i)^2.

  W1, b1 are shared; W2 (one column per task) holds the heads. `task_scales` multiplies task
  i's targets, so the task gradients (and kernel eigenvalues) differ in size.
  """

  def __init__(
    self, rng: np.random.Generator, num_tasks=3, in_dim=4, hidden=6, batch=8, task_scales=None
  ):
    self.k = num_tasks
    self.params64 = {
      "shared": {"w": rng.normal(size=(in_dim, hidden)) * 0.7, "b": rng.normal(size=hidden) * 0.1},
      "heads": {"w": rng.normal(size=(hidden, num_tasks)) * 0.7},
    }
    scales = np.ones(num_tasks) if task_scales is None else np.asarray(task_scales)
    self.x = rng.normal(size=(batch, in_dim))
    self.y = rng.normal(size=(batch, num_tasks)) * scales

  @property
  def params(self):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), self.params64)

  @property
  def batch(self):
    return {"x": jnp.asarray(self.x, jnp.float32), "y": jnp.asarray(self.y, jnp.float32)}

  @staticmethod
  def loss_fn(params, batch):
    h = jnp.tanh(batch["x"] @ params["shared"]["w"] + params["shared"]["b"])
    return jnp.mean((h @ params["heads"]["w"] - batch["y"]) ** 2, axis=0)

  @staticmethod
  def shared(params):
    return {"shared": {"w": True, "b": True}, "heads": {"w": False}}

  def ntk_weights(self, num_chunks, **kwargs):
    """`ntk_weights` of this model's loss on its batch, `num_chunks` chunks, W1 and b1 shared."""
    import ntkmtl_jax as nm

    return nm.ntk_weights(
      self.loss_fn, self.params, self.batch, num_chunks=num_chunks, shared=self.shared, **kwargs
    )

  def numpy_task_gradients(self, x=None, y=None):
    """Float64 per-task gradients by hand: (k, P_shared) and head gradients (k, hidden, k)."""
    x = self.x if x is None else x
    y = self.y if y is None else y
    p = self.params64
    a = x @ p["shared"]["w"] + p["shared"]["b"]
    h = np.tanh(a)
    err = h @ p["heads"]["w"] - y  # (m, k)
    m = x.shape[0]
    shared_rows, head_rows = [], []
    for i in range(self.k):
      dh = (2.0 / m) * err[:, i : i + 1] * p["heads"]["w"][:, i][None, :]
      da = dh * (1.0 - h**2)
      shared_rows.append(np.concatenate([(x.T @ da).ravel(), da.sum(0)]))
      head = np.zeros_like(p["heads"]["w"])
      head[:, i] = (2.0 / m) * h.T @ err[:, i]
      head_rows.append(head)
    return np.stack(shared_rows), np.stack(head_rows)

  def numpy_chunk_jacobian(self, num_chunks):
    """(k, n, P_shared) rows of the per-chunk task gradients, float64."""
    xs = np.split(self.x, num_chunks)
    ys = np.split(self.y, num_chunks)
    rows = [self.numpy_task_gradients(xc, yc)[0] for xc, yc in zip(xs, ys)]  # n x (k, P)
    return np.stack(rows, axis=1)


@pytest.fixture
def mlp(seed):
  rng = np.random.default_rng(seed)
  k = int(rng.integers(2, 6))
  return TanhMLP(rng, num_tasks=k, task_scales=rng.uniform(0.2, 5.0, k))


def run_python(args, cwd=None, timeout=600, **env):
  """`python ARGS` in a fresh interpreter that imports this checkout's ntkmtl_jax, with the
  environment variables `env` set; the completed process, its output captured as text."""
  pythonpath = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
  return subprocess.run(
    [sys.executable, *args],
    env=dict(os.environ, PYTHONPATH=pythonpath, **env),
    cwd=cwd,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def flat_shared(tree):
  """(P,) or (..., P) concatenation of the shared leaves in the order w, b (matching numpy)."""
  w, b = tree["shared"]["w"], tree["shared"]["b"]
  lead = w.shape[:-2]
  return np.concatenate(
    [np.asarray(w).reshape(lead + (-1,)), np.asarray(b).reshape(lead + (-1,))], axis=-1
  )


def assert_close(actual, desired, rtol=2e-4, err_msg=""):
  """Float32 vs float64 comparison: relative to each entry and to the largest entry."""
  desired = np.asarray(desired, np.float64)
  scale = float(np.abs(desired).max()) if desired.size else 0.0
  np.testing.assert_allclose(
    np.asarray(actual, np.float64), desired, rtol=rtol, atol=rtol * scale, err_msg=err_msg
  )


def random_jacobian(rng, k=None, p=None):
  """Task gradients (k, P) of different sizes, k in 2..6 and P in 5..50 unless given."""
  k = int(rng.integers(2, 7)) if k is None else k
  p = int(rng.integers(5, 51)) if p is None else p
  return rng.normal(size=(k, p)) * rng.uniform(0.2, 5.0, size=(k, 1))


def random_wide_jacobian(rng, k=None, p=None):
  """`random_jacobian` with P in k+2..40 unless given: more directions than tasks."""
  k = int(rng.integers(2, 7)) if k is None else k
  p = int(rng.integers(k + 2, 41)) if p is None else p
  return random_jacobian(rng, k, p)


def gram32(jac):
  return jnp.asarray(jac @ jac.T, jnp.float32)


def run_gram_weighting(agg, gram, key=None, losses=None, state=None):
  """One jitted step of `agg.weights` on a Gram matrix: (weights as float64, state)."""
  from ntkmtl_jax.method import TaskStats

  state = agg.init(None) if state is None else state
  stats = TaskStats(gram=gram, losses=losses, key=key)
  weights, state = jax.jit(agg.weights)(stats, state)
  return np.asarray(weights, np.float64), state


def random_losses(rng, steps, k):
  return rng.uniform(0.1, 3.0, size=(steps, k))


def run_loss_weighting(agg, losses, sq_norms=None, keys=None, jit=False):
  """Runs `agg.weights` over a sequence of steps; returns the weights (steps, k) and state."""
  from ntkmtl_jax.method import TaskStats

  weighting = jax.jit(agg.weights) if jit else agg.weights
  state = agg.init(None)
  out = []
  for t, l in enumerate(losses):
    stats = TaskStats(
      losses=jnp.asarray(l, jnp.float32),
      sq_norms=None if sq_norms is None else jnp.asarray(sq_norms[t], jnp.float32),
      key=None if keys is None else keys[t],
    )
    w, state = weighting(stats, state)
    out.append(np.asarray(w, np.float64))
  return np.stack(out), state


class NumpyAdam:
  """PyTorch's Adam, with its L2 `weight_decay` added to the gradient, in float64."""

  def __init__(self, lr, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8):
    self.lr, self.wd, self.b1, self.b2, self.eps = lr, weight_decay, b1, b2, eps
    self.m = self.v = 0.0
    self.t = 0

  def step(self, x, g):
    g = g + self.wd * x
    self.t += 1
    self.m = self.b1 * self.m + (1 - self.b1) * g
    self.v = self.b2 * self.v + (1 - self.b2) * g**2
    m_hat = self.m / (1 - self.b1**self.t)
    v_hat = self.v / (1 - self.b2**self.t)
    return x - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


def check_jit_and_eager(seed, method):
  """The method's update of random (3, 12) task gradients of different sizes is the same
  jitted and eager."""
  rng = np.random.default_rng(seed)
  jac = rng.normal(size=(3, 12)) * rng.uniform(0.2, 5.0, size=(3, 1))
  grads = {"w": jnp.asarray(jac, jnp.float32)}
  params = {"w": jnp.zeros(12)}
  kwargs = dict(key=jax.random.key(seed), losses=jnp.asarray(rng.uniform(0.5, 2.0, 3), jnp.float32))
  eager, s1 = method.update(grads, method.init(params), params, **kwargs)
  jitted, s2 = jax.jit(method.update)(grads, method.init(params), params, **kwargs)
  np.testing.assert_allclose(
    jitted["w"],
    eager["w"],
    rtol=1e-4,
    atol=1e-5 * np.abs(np.asarray(eager["w"])).max(),
    err_msg=f"seed={seed}",
  )
  np.testing.assert_allclose(s2.weights, s1.weights, rtol=1e-4, atol=1e-6)


def check_end_to_end(seed, model, aggregator, strategies=("unroll",), steps=3):
  """Runs `steps` jitted train steps with each strategy: finite losses and weights, nothing
  skipped, the parameters move, and every strategy ends at the same parameters."""
  import optax

  from ntkmtl_jax.step import make_train_step

  finals = []
  for strategy in strategies:
    step = make_train_step(model.loss_fn, aggregator, optax.sgd(1e-2), strategy=strategy)
    state = step.init(model.params, key=jax.random.key(seed))
    for _ in range(steps):
      state, metrics = step(state, model.batch)
      assert bool(metrics["finite"]) and np.all(np.isfinite(metrics["losses"])), f"seed={seed}"
      assert np.all(np.isfinite(metrics["weights"]))
    assert int(state.step) == steps and int(state.skipped) == 0
    finals.append(state.params)
  moved = jax.tree.map(
    lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), finals[0], model.params
  )
  assert max(jax.tree.leaves(moved)) > 0, f"seed={seed}"
  for other in finals[1:]:
    # E.g. the Gram from forward-mode products (streaming) equals the stacked one up to
    # rounding.
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"seed={seed}"),
      other,
      finals[0],
    )


def check_published_delta_m(scoring, rows, published, tolerance):
  """Delta m % of each published row against the paper's STL row matches the paper's value
  within `tolerance` (published values are seed means of Delta m, not Delta m of the mean
  row)."""
  for method, value in published.items():
    got = scoring.delta_m(dict(zip(scoring.metric_names, rows[method])))
    assert got == pytest.approx(value, abs=tolerance), method


def write_mtan_files(root, name, height=32, width=64):
  """Random MTAN-layout files of `name` ("nyuv2" or "cityscapes"): 8 train, 4 val images."""
  from ntkmtl_jax.data import mtan as layout

  classes, label_dir, normals, seed = {
    "nyuv2": (13, "label", True, 1),
    "cityscapes": (7, "label_7", False, 3),
  }[name]
  for split, num in (("train", 8), ("val", 4)):
    layout.write_example_files(
      root,
      split,
      num,
      height,
      width,
      classes,
      label_dir,
      normals=normals,
      seed=seed + (split == "val"),
    )
  return root


def tiny_mtan_splits(name, data_dir):
  """(train, test) splits of the tiny preset of benchmark `name` on `data_dir`: the MTAN
  layout's val/ is the test set (4 images); 2 of the 8 train/ images are held out for
  validation."""
  from ntkmtl_jax import benchmarks

  config = benchmarks.get_config(name, "tiny")
  bench = benchmarks.from_config(config.replace(data_dir=data_dir))
  assert (len(bench.train), len(bench.val), len(bench.test)) == (6, 2, 4)
  return bench.train, bench.test
