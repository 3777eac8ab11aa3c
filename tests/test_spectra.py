"""Spectra, task affinity, task groups, the tracker, and the weighting statistics of
ntk_weights / ntkmtl, against float64 NumPy and SciPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
from scipy.cluster import hierarchy

import ntkmtl_jax as nm
from ntkmtl_jax import kernel, spectra

from conftest import TanhMLP, assert_close


def numpy_statistic(blocks_ii, statistic, top_r):
  """Float64 reference of each statistic of one PSD block."""
  mu = np.clip(np.linalg.eigvalsh(blocks_ii)[::-1], 0.0, None)
  if statistic == "max":
    return mu[0]
  if statistic == "trace":
    return np.trace(blocks_ii)
  if statistic == "top_r":
    return mu[: min(top_r, mu.size)].mean()
  erank = np.exp(scipy.stats.entropy(mu))  # entropy() normalises mu to a distribution
  return mu.sum() / erank


def random_model(seed, batch=8):
  rng = np.random.default_rng(seed)
  k = int(rng.integers(2, 5))
  return rng, k, TanhMLP(rng, num_tasks=k, task_scales=rng.uniform(0.2, 5.0, k), batch=batch)


@pytest.mark.parametrize("statistic", kernel.STATISTICS)
def test_ntk_weights_statistic_matches_numpy(seed, statistic):
  rng, k, model = random_model(seed)
  n = int(rng.choice([2, 4, 8]))
  top_r = int(rng.integers(1, 4))
  exponent = float(rng.choice([0.5, 0.75]))
  jac = model.numpy_chunk_jacobian(n)
  blocks = np.einsum("iap,ibp->iab", jac, jac)
  stats = np.array([numpy_statistic(blocks[i], statistic, top_r) for i in range(k)])
  out = model.ntk_weights(n, statistic=statistic, top_r=top_r, exponent=exponent)
  msg = f"seed={seed} statistic={statistic} n={n} r={top_r}"
  np.testing.assert_allclose(out.eigenvalues, stats, rtol=5e-4, err_msg=msg)
  np.testing.assert_allclose(out.weights, (stats.sum() / stats) ** exponent, rtol=5e-4, err_msg=msg)


def test_one_chunk_every_statistic_is_the_squared_gradient_norm(seed):
  _, k, model = random_model(seed)
  g, _ = model.numpy_task_gradients()
  sq = np.sum(g**2, axis=1)
  for statistic in kernel.STATISTICS:
    out = model.ntk_weights(1, statistic=statistic, top_r=3)
    np.testing.assert_allclose(
      out.eigenvalues, sq, rtol=2e-4, err_msg=f"seed={seed} statistic={statistic}"
    )


def test_statistics_defining_properties(seed):
  rng = np.random.default_rng(seed)
  k, n = 3, int(rng.integers(3, 9))
  a = rng.normal(size=(k, n, 2 * n)) * rng.uniform(0.1, 10.0, (k, 1, 1))
  blocks = jnp.asarray(a @ np.swapaxes(a, 1, 2), jnp.float32)
  mu = np.sort(np.linalg.eigvalsh(np.asarray(blocks, np.float64)), axis=1)[:, ::-1]
  stat = lambda s, **kw: np.asarray(kernel.block_statistic(blocks, s, **kw), np.float64)
  msg = f"seed={seed}"
  np.testing.assert_allclose(stat("top_r", top_r=1), mu[:, 0], rtol=1e-4, err_msg=msg)
  np.testing.assert_allclose(stat("top_r", top_r=n + 5), mu.mean(axis=1), rtol=1e-4, err_msg=msg)
  np.testing.assert_allclose(stat("trace"), mu.sum(axis=1), rtol=1e-4, err_msg=msg)
  # tr / erank lies between the mean eigenvalue and the largest one.
  eff = stat("effective_rank")
  assert np.all(eff <= mu[:, 0] * (1 + 1e-4)) and np.all(eff >= mu.mean(axis=1) * (1 - 1e-4)), msg
  # Effective rank: n for a flat spectrum, 1 for a single direction.
  flat = jnp.full((n,), float(rng.uniform(0.5, 2.0)))
  one = jnp.zeros((n,)).at[0].set(float(rng.uniform(0.5, 2.0)))
  np.testing.assert_allclose(kernel.effective_rank(flat), n, rtol=1e-5)
  np.testing.assert_allclose(kernel.effective_rank(one), 1.0, rtol=1e-6)
  np.testing.assert_allclose(kernel.spectrum_statistic(flat, "effective_rank"), flat[0], rtol=1e-5)


@pytest.mark.parametrize("strategy", ["unroll", "streaming"])
@pytest.mark.one_seed
def test_train_step_uses_the_statistic(seed, strategy):
  rng, k, model = random_model(seed)
  n = 4
  jac = model.numpy_chunk_jacobian(n)
  blocks = np.einsum("iap,ibp->iab", jac, jac)
  for statistic in ("trace", "effective_rank"):
    stats = np.array([numpy_statistic(blocks[i], statistic, 3) for i in range(k)])
    agg = nm.ntkmtl(k, num_chunks=n, shared=model.shared, statistic=statistic)
    step = nm.make_train_step(model.loss_fn, agg, optax.sgd(0.0), strategy=strategy)
    _, metrics = step(step.init(model.params), model.batch)
    msg = f"seed={seed} statistic={statistic} strategy={strategy}"
    np.testing.assert_allclose(metrics["eigenvalues"], stats, rtol=5e-4, err_msg=msg)
    # The weights the step applies: k (the official scaling, on by default) times the rule's.
    np.testing.assert_allclose(
      metrics["weights"], k * np.sqrt(stats.sum() / stats), rtol=5e-4, err_msg=msg
    )


def test_bad_statistic_options_are_reported():
  model = TanhMLP(np.random.default_rng(0))
  with pytest.raises(ValueError, match="statistic"):
    nm.ntk_weights(model.loss_fn, model.params, model.batch, statistic="median")
  with pytest.raises(ValueError, match="top_r"):
    nm.ntkmtl(3, num_chunks=2, statistic="top_r", top_r=0)
  with pytest.raises(ValueError, match="power"):
    nm.ntkmtl(3, num_chunks=2, statistic="effective_rank", eigen_method="power")
  with pytest.raises(ValueError, match="statistic"):
    spectra.SpectrumTracker(model.loss_fn, model.batch, statistic="min")


def test_spectra_and_affinity_match_numpy(seed):
  rng, k, model = random_model(seed)
  n = int(rng.choice([2, 4]))
  jac = model.numpy_chunk_jacobian(n)  # (k, n, P)
  blocks = np.einsum("iap,jbp->ijab", jac, jac)
  spec = jax.jit(
    lambda p, b: spectra.task_spectra(model.loss_fn, p, b, num_chunks=n, shared=model.shared)
  )(model.params, model.batch)
  msg = f"seed={seed}"
  expected = np.stack([np.linalg.eigvalsh(blocks[i, i])[::-1] for i in range(k)])
  assert_close(spec.spectra, np.clip(expected, 0, None), rtol=5e-4, err_msg=msg)
  assert np.all(np.diff(np.asarray(spec.spectra), axis=1) <= 0), msg
  np.testing.assert_allclose(spec.eigenvalues, expected[:, 0], rtol=5e-4, err_msg=msg)
  flat = jac.reshape(k, -1)
  cos = flat @ flat.T / np.outer(np.linalg.norm(flat, axis=1), np.linalg.norm(flat, axis=1))
  np.testing.assert_allclose(spec.affinity, cos, atol=5e-4, err_msg=msg)
  gram = np.einsum("iap,iaq->ipq", jac, jac)  # parameter-space kernels J_i^T J_i
  fro = np.linalg.norm(gram.reshape(k, -1), axis=1)
  align = np.einsum("ipq,jpq->ij", gram, gram) / np.outer(fro, fro)
  np.testing.assert_allclose(
    spectra.task_affinity(jnp.asarray(blocks, jnp.float32), "alignment"),
    align,
    atol=5e-4,
    err_msg=msg,
  )
  # One chunk: the cosine affinity is the cosine between task gradients.
  g, _ = model.numpy_task_gradients()
  one = spectra.task_spectra(
    model.loss_fn, model.params, model.batch, num_chunks=1, shared=model.shared
  )
  gcos = g @ g.T / np.outer(np.linalg.norm(g, axis=1), np.linalg.norm(g, axis=1))
  np.testing.assert_allclose(one.affinity, gcos, atol=5e-4, err_msg=msg)
  # Leading axes are kept: a stack of two kernels gives a stack of two affinities.
  stacked = jnp.asarray(np.stack([blocks, 4.0 * blocks[::-1, ::-1]]), jnp.float32)
  for kind in spectra.AFFINITY_KINDS:
    both = spectra.task_affinity(stacked, kind)
    np.testing.assert_allclose(both[0], spectra.task_affinity(stacked[0], kind), atol=1e-6)
    np.testing.assert_allclose(
      both[1], np.asarray(both[0])[::-1, ::-1], atol=1e-5, err_msg=msg
    )  # scale-free, and follows the task order
  with pytest.raises(ValueError, match="kind"):
    spectra.task_affinity(jnp.asarray(blocks), "pearson")


def same_partition(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return np.array_equal(a[:, None] == a[None, :], b[:, None] == b[None, :])


def test_group_tasks_matches_scipy_average_linkage(seed):
  rng = np.random.default_rng(seed)
  k = int(rng.integers(4, 9))
  x = rng.normal(size=(k, 5))
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  affinity = x @ x.T  # cosines, continuous: no ties
  distance = 1.0 - affinity
  np.fill_diagonal(distance, 0.0)
  tree = hierarchy.linkage(scipy_condensed(distance), method="average")
  for num_groups in range(1, k + 1):
    got = spectra.group_tasks(affinity, num_groups)
    expected = hierarchy.fcluster(tree, num_groups, criterion="maxclust")
    assert got.labels.max() + 1 == num_groups
    assert same_partition(got.labels, expected), f"seed={seed} groups={num_groups}"
    # Merge heights are UPGMA heights: scipy's distances are 1 - our affinities.
    np.testing.assert_allclose(
      [1 - m[2] for m in got.merges], tree[: k - num_groups, 2], rtol=1e-9, atol=1e-12
    )


def scipy_condensed(distance):
  from scipy.spatial.distance import squareform

  return squareform(distance, checks=False)


def test_group_tasks_threshold_recovers_blocks(seed):
  rng = np.random.default_rng(seed)
  sizes = rng.integers(1, 4, size=int(rng.integers(2, 4)))
  truth = np.repeat(np.arange(sizes.size), sizes)
  perm = rng.permutation(truth.size)
  truth = truth[perm]
  same = truth[:, None] == truth[None, :]
  noise = rng.uniform(-0.1, 0.1, size=same.shape)
  affinity = np.where(same, 0.8, -0.4) + 0.5 * (noise + noise.T)
  np.fill_diagonal(affinity, 1.0)
  got = spectra.group_tasks(affinity)
  assert same_partition(got.labels, truth), f"seed={seed}"
  assert got.labels[0] == 0 and set(got.labels) == set(range(sizes.size))
  assert sorted(sum(got.groups, [])) == list(range(truth.size))
  with pytest.raises(ValueError, match="symmetric"):
    spectra.group_tasks(affinity + np.triu(np.ones_like(affinity), 1))
  with pytest.raises(ValueError, match="num_groups"):
    spectra.group_tasks(affinity, num_groups=0)


@pytest.mark.one_seed
def test_tracker_records_the_probe_at_the_right_steps(seed):
  rng, k, model = random_model(seed)
  n, every = 2, 2
  agg = nm.ntkmtl(k, shared=model.shared)
  step = nm.make_train_step(model.loss_fn, agg, optax.sgd(0.05))
  state = step.init(model.params)
  tracker = spectra.SpectrumTracker(
    model.loss_fn, model.batch, num_chunks=n, every=every, shared=model.shared, statistic="trace"
  )
  tracker.record(0, state.params)
  params_at, weights_at = {0: state.params}, {}
  for t in range(1, 6):
    state, metrics = step(state, model.batch)
    tracker(t, state, metrics)
    params_at[t], weights_at[t] = state.params, np.asarray(metrics["weights"])
  history = tracker.history()
  np.testing.assert_array_equal(history.steps, [0, 2, 4])
  assert history.spectra.shape == (3, k, n) and history.affinity.shape == (3, k, k)
  assert np.all(np.isnan(history.weights[0]))
  for r, t in enumerate(history.steps):
    ref = spectra.task_spectra(
      model.loss_fn, params_at[t], model.batch, num_chunks=n, shared=model.shared
    )
    msg = f"seed={seed} step={t}"
    np.testing.assert_allclose(
      history.spectra[r], ref.spectra, rtol=1e-4, atol=1e-6 * float(ref.spectra.max()), err_msg=msg
    )
    np.testing.assert_allclose(
      history.statistic[r], ref.spectra.sum(axis=1), rtol=1e-4, err_msg=msg
    )
    np.testing.assert_allclose(history.affinity[r], ref.affinity, atol=1e-4, err_msg=msg)
    np.testing.assert_allclose(
      history.blocks[r],
      ref.blocks,
      rtol=1e-4,
      atol=1e-6 * float(np.abs(ref.blocks).max()),
      err_msg=msg,
    )
    np.testing.assert_allclose(history.losses[r], ref.losses.mean(axis=1), rtol=1e-5, err_msg=msg)
    if t:
      np.testing.assert_allclose(history.weights[r], weights_at[t], rtol=1e-6, err_msg=msg)


def test_imbalance_is_largest_over_smallest(seed):
  values = np.random.default_rng(seed).uniform(0.1, 10.0, size=(3, 5))
  np.testing.assert_allclose(
    spectra.imbalance(jnp.asarray(values)), values.max(axis=1) / values.min(axis=1), rtol=1e-6
  )
