"""Strategies: every way of running the task backward passes (Passes x materialize) gives the
reference's step, the names resolve per the table of ntkmtl_jax.strategy, and what cannot be
streamed is refused."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ntkmtl_jax as nm
from ntkmtl_jax import kernel, spectra
from ntkmtl_jax import step as step_module
from ntkmtl_jax import strategy as st
from ntkmtl_jax.method import Needs

from conftest import SEEDS, TanhMLP, assert_close, enable_x64, flat_shared

K = 3
REFERENCE = nm.Strategy(nm.Passes.VMAP, materialize=True)
# chunk_size 2 leaves a remainder group for both k = 3 passes and k * n = 6 rows.
COMBINATIONS = [nm.Strategy(p, m, chunk_size=2) for p in nm.Passes for m in (True, False)]


def _encode(p, b):
  return jnp.tanh(b["x"] @ p["shared"]["w"] + p["shared"]["b"])


def _decode(p, z, b):
  return jnp.mean((z @ p["heads"]["w"] - b["y"]) ** 2, axis=0)


# One method of each kind of `Needs` (pcgrad reads the Gram here; graddrop the gradients).
METHODS = {
  "uw": lambda: nm.methods.get("uw", K, shared=TanhMLP.shared),  # losses
  "ntkmtl": lambda: nm.ntkmtl(K, shared=TanhMLP.shared),  # sq_norms
  "mgda": lambda: nm.methods.get("mgda", K, shared=TanhMLP.shared),  # gram
  "pcgrad": lambda: nm.methods.get("pcgrad", K, shared=TanhMLP.shared),  # gram
  "graddrop": lambda: nm.methods.get("graddrop", K, shared=TanhMLP.shared),  # gradients
  "ntkmtl_n2": lambda: nm.ntkmtl(K, num_chunks=2, shared=TanhMLP.shared),  # kernel
  "ntkmtl_sr": lambda: nm.ntkmtl_sr(K, num_chunks=2, shared=TanhMLP.shared),  # representation
}


def _recording_sgd(learning_rate=0.1):
  """SGD whose state is the last update it was given: the method's update, as it came."""
  return optax.GradientTransformation(
    lambda params: jax.tree.map(jnp.zeros_like, params),
    lambda updates, state, params=None: (
      jax.tree.map(lambda u: -learning_rate * u, updates),
      updates,
    ),
  )


def _float64_model(seed):
  rng = np.random.default_rng(seed)
  model = TanhMLP(rng, num_tasks=K, batch=8, task_scales=rng.uniform(0.2, 5.0, K))
  params = jax.tree.map(jnp.asarray, model.params64)
  return model, params, {"x": jnp.asarray(model.x), "y": jnp.asarray(model.y)}


def _trajectories(method, strategy, steps=2):
  """Per seed and step, in float64: losses, weights, eigenvalues, the update, new params."""
  with enable_x64():
    step = nm.make_train_step(
      TanhMLP.loss_fn,
      METHODS[method](),
      _recording_sgd(),
      strategy=strategy,
      encode=_encode,
      decode=_decode,
    )
    runs = []
    for seed in SEEDS:
      _, params, batch = _float64_model(seed)
      state = step.init(params, key=jax.random.key(seed))
      for _ in range(steps):
        state, metrics = step(state, batch)
        assert bool(metrics["finite"]), f"{method} {strategy} seed={seed}"
        assert state.params["shared"]["w"].dtype == jnp.float64
        runs.append(
          dict(
            losses=metrics["losses"],
            weights=metrics["weights"],
            eigenvalues=metrics.get("eigenvalues"),
            update=state.optimizer_state,
            params=state.params,
            seed=seed,
          )
        )
    return jax.device_get(runs)


_REFERENCES = {}


@pytest.mark.parametrize(
  "strategy",
  COMBINATIONS,
  ids=[f"{s.passes.value}-{'held' if s.materialize else 'streamed'}" for s in COMBINATIONS],
)
@pytest.mark.parametrize("method", list(METHODS))
def test_every_combination_gives_the_reference_step(method, strategy):
  if not strategy.materialize and METHODS[method]().needs.kind == "gradients":
    pytest.skip(
      "refused: tests/test_strategy.py::test_streaming_is_refused_where_gradients_are_needed"
    )
  if method not in _REFERENCES:
    _REFERENCES[method] = _trajectories(method, REFERENCE)
  # In float64 the statistics agree to ~1e-15 however they are computed (forward-mode Gram
  # rows when streamed, stacked gradients when held), MGDA's solver included.
  for got, want in zip(_trajectories(method, strategy), _REFERENCES[method]):
    for field in ("losses", "weights", "eigenvalues", "update", "params"):
      jax.tree.map(
        lambda a, b: assert_close(a, b, rtol=1e-10, err_msg=f"{field} seed={want['seed']}"),
        got[field],
        want[field],
      )


def test_materialize_decides_whether_the_task_gradients_are_held():
  """The oracle of each statistics kind keeps the task gradients exactly when asked to, and
  otherwise hands the step a pullback for one weighted backward pass."""
  model = TanhMLP(np.random.default_rng(0), num_tasks=K, batch=8)
  plain = step_module.Model(lambda p, s, b: (TanhMLP.loss_fn(p, b), s), None, None)
  mask = TanhMLP.shared(model.params)
  for needs in (Needs("sq_norms"), Needs("gram"), Needs("kernel", num_chunks=2)):
    for strategy in COMBINATIONS:
      seen = []

      def observe(params, batch):  # traced only (jax.eval_shape): nothing is compiled
        obs = step_module.ORACLES[needs.kind](
          plain, needs, st.resolve(strategy, needs), params, None, batch, mask, jax.random.key(0)
        )
        seen.append((obs.task_grads is not None, obs.pullback is not None))
        return obs.losses

      jax.eval_shape(observe, model.params, model.batch)
      assert seen == [(strategy.materialize, not strategy.materialize)], (needs.kind, strategy)


def test_streaming_is_refused_where_gradients_are_needed():
  model = TanhMLP(np.random.default_rng(0), num_tasks=K)
  for method in (
    nm.methods.get("graddrop", K, shared=TanhMLP.shared),
    nm.ntkmtl(K, shared=TanhMLP.shared).aggregator,
  ):  # a plain optax aggregator
    for strategy in ["streaming"] + [nm.Strategy(p, materialize=False) for p in nm.Passes]:
      with pytest.raises(ValueError, match="needs the task gradients themselves.*materialize=True"):
        nm.make_train_step(model.loss_fn, method, optax.sgd(0.1), strategy=strategy)
  for strategy in ("streaming", nm.Strategy(materialize=False)):
    with pytest.raises(ValueError, match="task_jacobian needs the task gradients"):
      nm.task_jacobian(model.loss_fn, model.params, model.batch, strategy=strategy)
    with pytest.raises(ValueError, match="ntk_weights needs the task gradients"):
      nm.ntk_weights(model.loss_fn, model.params, model.batch, strategy=strategy)
    with pytest.raises(ValueError, match="task_spectra needs the task gradients"):
      spectra.task_spectra(
        model.loss_fn, model.params, model.batch, num_chunks=2, strategy=strategy
      )
    with pytest.raises(ValueError, match="SpectrumTracker needs the task gradients"):
      spectra.SpectrumTracker(model.loss_fn, model.batch, num_chunks=2, strategy=strategy)
    with pytest.raises(ValueError, match="pullback_rows needs the task gradients"):
      kernel.pullback_rows(lambda c: c, 3, jnp.float32, strategy=strategy)


# The table of the module docstring, written out on its own: name -> (passes, materialize for
# a method that reads statistics, for one that needs the gradients; None: refused).
TABLE = {
  "vmap": ("vmap", True, True),
  "unroll": ("unroll", True, True),
  "chunked": ("chunked", True, True),
  "sequential": ("sequential", False, True),
  "streaming": ("unroll", False, None),
}
AUTO = {
  "cpu": ("unroll", True, True),
  "gpu": ("sequential", False, True),
  "tpu": ("sequential", False, True),
}
STATISTIC_NEEDS = (Needs("sq_norms"), Needs("gram"), Needs("kernel", num_chunks=2))


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
def test_names_resolve_per_the_table(backend):
  for name, (passes, statistics, gradients) in dict(TABLE, auto=AUTO[backend]).items():
    for needs in STATISTIC_NEEDS:
      assert st.resolve(name, needs, backend=backend) == nm.Strategy(passes, statistics), name
    for needs in (Needs("gradients"), None):
      if gradients is None:
        with pytest.raises(ValueError, match="needs the task gradients themselves"):
          st.resolve(name, needs, backend=backend)
      else:
        assert st.resolve(name, needs, backend=backend) == nm.Strategy(passes, gradients)
  default = nm.default_strategy(backend)
  assert default.passes.value == AUTO[backend][0] and default.materialize is None
  # A `Passes` member is its name; a `Strategy` with explicit choices keeps them.
  assert st.resolve(nm.Passes.SEQUENTIAL, Needs("gram")) == st.resolve("sequential", Needs("gram"))
  for strategy in COMBINATIONS:
    assert st.resolve(strategy, Needs("gram"), backend=backend) == strategy


def test_the_step_runs_the_resolved_strategy():
  model = TanhMLP(np.random.default_rng(0), num_tasks=K)
  backend = jax.default_backend()
  for name, (passes, statistics, gradients) in dict(TABLE, auto=AUTO[backend]).items():
    for method, materialize in (
      (nm.methods.get("mgda", K, shared=TanhMLP.shared), statistics),
      (nm.methods.get("moco", K, shared=TanhMLP.shared), gradients),
    ):
      if materialize is None:
        continue
      step = nm.make_train_step(model.loss_fn, method, optax.sgd(0.1), strategy=name, jit=False)
      assert step.strategy == nm.Strategy(passes, materialize), (name, method.name)
  step = nm.make_train_step(
    model.loss_fn, nm.ntkmtl(K), optax.sgd(0.1), strategy="chunked", chunk_size=2
  )
  assert step.strategy == nm.Strategy("chunked", True, chunk_size=2)


def test_unknown_names_and_bad_fields_are_reported():
  model = TanhMLP(np.random.default_rng(0), num_tasks=K)
  with pytest.raises(ValueError, match="Unknown strategy 'fast'"):
    nm.make_train_step(model.loss_fn, nm.ntkmtl(K), optax.sgd(0.1), strategy="fast")
  with pytest.raises(ValueError, match="Unknown strategy"):
    nm.task_jacobian(model.loss_fn, model.params, model.batch, strategy="jacrev")
  with pytest.raises(ValueError, match="Unknown passes 'streaming'.*materialize=False"):
    nm.Strategy(passes="streaming")
  with pytest.raises(TypeError, match="materialize"):
    nm.Strategy(materialize="yes")
  for chunk_size in (0, 2.5, True):
    with pytest.raises(ValueError, match="chunk_size"):
      nm.Strategy(chunk_size=chunk_size)
  with pytest.raises(TypeError, match="strategy must be"):
    st.resolve(3)


@pytest.mark.parametrize("passes", list(nm.Passes))
def test_every_runner_stacks_what_the_python_loop_gives(passes):
  """`run_passes` == the plain Python loop, for a pytree per task, whatever the grouping."""
  per_task = lambda i, after: {
    "row": after(st.unit(i, 5, jnp.float32)) * (i + 1.0),
    "sq": jnp.square(i + 0.5),
  }
  for chunk_size in (1, 2, 8):
    got = st.run_passes(nm.Strategy(passes, True, chunk_size), per_task, 5)
    np.testing.assert_array_equal(got["row"], np.diag(np.arange(1.0, 6.0)))
    np.testing.assert_array_equal(got["sq"], (np.arange(5) + 0.5) ** 2)
  with pytest.raises(ValueError, match="resolve"):
    st.run_passes(nm.Strategy(), per_task, 5)


@pytest.mark.parametrize(
  "strategy",
  [nm.Strategy(p, True, chunk_size=4) for p in nm.Passes],
  ids=[p.value for p in nm.Passes],
)
def test_task_jacobian_with_every_passes_matches_numpy(seed, strategy):
  with enable_x64():
    model, params, batch = _float64_model(seed)
    losses, jac = nm.task_jacobian(
      TanhMLP.loss_fn, params, batch, num_chunks=4, shared=TanhMLP.shared, strategy=strategy
    )
  np.testing.assert_allclose(
    flat_shared(jac), model.numpy_chunk_jacobian(4), rtol=1e-10, atol=1e-12
  )
  assert losses.shape == (K, 4) and jac["heads"]["w"] is None


@pytest.mark.parametrize("passes", list(nm.Passes))
@pytest.mark.one_seed
def test_strategies_and_eigen_methods_agree(seed, passes):
  rng = np.random.default_rng(seed)
  model = TanhMLP(rng, num_tasks=3, batch=12)
  reference = model.ntk_weights(3, strategy="vmap", eigen_method="eigh")
  for eigen_method in ("eigh", "power"):
    got = model.ntk_weights(
      3, strategy=nm.Strategy(passes), eigen_method=eigen_method, power_iterations=200
    )
    np.testing.assert_allclose(
      got.eigenvalues,
      reference.eigenvalues,
      rtol=1e-3,
      err_msg=f"{passes}/{eigen_method} seed={seed}",
    )


def _run(model, agg, strategy, steps=2):
  step = nm.make_train_step(model.loss_fn, agg, optax.sgd(0.05), strategy=strategy)
  state = step.init(model.params)
  for _ in range(steps):
    state, metrics = step(state, model.batch)
  return state, metrics


@pytest.mark.parametrize("aggregator", ["ntkmtl", "ntkmtl_n2", "ls", "official", "mgda"])
@pytest.mark.one_seed
def test_names_agree_in_float32(seed, aggregator):
  """Each name of the table in the step, in float32: the same parameters as "vmap"."""
  rng = np.random.default_rng(seed)
  model = TanhMLP(rng, num_tasks=3, batch=8, task_scales=rng.uniform(0.2, 5.0, 3))
  make = {
    "ntkmtl": lambda: nm.ntkmtl(3, shared=model.shared),
    "ntkmtl_n2": lambda: nm.ntkmtl(3, num_chunks=2, shared=model.shared),
    "ls": lambda: nm.methods.get("ls", 3, shared=model.shared),
    "official": lambda: nm.official_ntkmtl(3, model.shared)[0],
    "mgda": lambda: nm.methods.get("mgda", 3, shared=model.shared),
  }[aggregator]
  reference, _ = _run(model, make(), "vmap")
  # MGDA's Frank-Wolfe solver stops at a duality gap of 1e-6: Grams that differ by rounding
  # (forward-mode rows when streamed, stacked gradients otherwise) move its weights by up to
  # ~1e-3 of their size; the other methods' weights are closed forms of the statistics.
  rtol = 1e-3 if aggregator == "mgda" else 1e-4
  for name in ("unroll", "chunked", "streaming", "sequential", "auto"):
    state, metrics = _run(model, make(), name)
    jax.tree.map(
      lambda a, b: assert_close(a, b, rtol=rtol, err_msg=f"{name} seed={seed}"),
      state.params,
      reference.params,
    )
    assert bool(metrics["finite"])
