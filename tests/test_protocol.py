"""The two protocols (`Config.protocol`): what `protocol="official"` changes per benchmark, each
choice against a small hand computation (per-batch metric averages with a short last batch, the
mean of the last epochs, selection ties, PyTorch's plateau rule, partial last batches, QM9's
target scaling), and the claim of the docs that pooled and per-batch metrics agree on an even
split and differ on an uneven one."""

from __future__ import annotations

import dataclasses
import math
import types

import numpy as np
import pytest

from ntkmtl_jax import benchmarks, loop
from ntkmtl_jax.benchmarks import qm9
from ntkmtl_jax.benchmarks.mtan import DenseMetrics
from ntkmtl_jax.config import Config
from ntkmtl_jax.data.splits import Split, epoch_batches

from conftest import write_mtan_files

TASKS = ("segmentation", "depth", "normal")


def _normals(angles_deg):
  """Unit normals at `angles_deg` from (1, 0, 0) in the x-y plane."""
  a = np.radians(np.asarray(angles_deg, np.float64))
  return np.stack([np.cos(a), np.sin(a), np.zeros_like(a)], -1)


def _dense_batch(depth_pred, depth_true, angles, valid_normal):
  """One evaluation batch of (B, 1, P) pixels for DenseMetrics."""
  b, p = np.shape(depth_pred)
  logits = np.zeros((b, 1, p, 2))
  labels = np.zeros((b, 1, p), np.int64)
  true_normal = np.where(np.asarray(valid_normal)[..., None], [1.0, 0.0, 0.0], 0.0)
  outputs = (
    logits,
    np.asarray(depth_pred, np.float64).reshape(b, 1, p, 1),
    _normals(angles).reshape(b, 1, p, 3),
  )
  batch = {
    "label": labels,
    "depth": np.asarray(depth_true, np.float64).reshape(b, 1, p, 1),
    "normal": true_normal.reshape(b, 1, p, 3),
  }
  return outputs, batch


def test_per_batch_averages_weigh_a_short_last_batch_like_a_full_one():
  # Batches of 2 examples (2 pixels each), then a last batch of 1, as NYUv2's 654 test images
  # in batches of 2 are not, but Cityscapes' 500 in batches of 8 are (a last batch of 4).
  batches = [
    _dense_batch([[1, 2], [3, 4]], [[2, 2], [2, 0]], [[0, 10], [20, 40]], [[1, 1], [1, 0]]),
    _dense_batch([[5, 5], [1, 1]], [[5, 1], [1, 2]], [[90, 5], [5, 35]], [[1, 1], [1, 1]]),
    _dense_batch([[3, 1]], [[1, 1]], [[60, 0]], [[1, 1]]),
  ]
  by_batch = DenseMetrics(TASKS, 2, pooling="batches")
  pooled = DenseMetrics(TASKS, 2, pooling="pixels")
  for outputs, batch in batches:
    by_batch.update(outputs, batch)
    pooled.update(outputs, batch)
  r, p = by_batch.result(), pooled.result()
  # Depth, by hand: batch 1: |d - d*| = 1, 0, 1 over 3 pixels with depth (rel 1/2, 0, 1/2);
  # batch 2: 0, 4, 0, 1 (rel 0, 4, 0, 1/2); batch 3: 2, 0 (rel 2, 0).
  abs_err = (2 / 3 + 5 / 4 + 2 / 2) / 3
  rel_err = (1 / 3 + 4.5 / 4 + 2 / 2) / 3
  assert r["abs err"] == pytest.approx(abs_err) and r["rel err"] == pytest.approx(rel_err)
  assert p["abs err"] == pytest.approx(9 / 9) and p["rel err"] == pytest.approx(7.5 / 9)
  # Normals: batch 1: angles 0, 10, 20 (40 has no normal); 2: 90, 5, 5, 35; 3: 60, 0.
  means = (10.0, 33.75, 30.0)
  medians = (10.0, 20.0, 30.0)
  below_11 = (2 / 3, 2 / 4, 1 / 2)
  below_22 = (3 / 3, 2 / 4, 1 / 2)
  below_30 = (3 / 3, 2 / 4, 1 / 2)
  assert r["mean angle"] == pytest.approx(np.mean(means))
  assert r["median angle"] == pytest.approx(np.mean(medians))
  for name, fractions in (("<11.25", below_11), ("<22.5", below_22), ("<30", below_30)):
    assert r[name] == pytest.approx(100 * np.mean(fractions)), name
  assert p["mean angle"] == pytest.approx(225 / 9, abs=1e-6)
  assert p["median angle"] == pytest.approx(10.0, abs=0.01)


def _random_batches(rng, sizes, pixels, missing):
  """Random evaluation batches of `sizes` examples of `pixels` pixels each; a fraction
  `missing` of the pixels has neither depth nor normal."""
  out = []
  for b in sizes:
    valid = rng.random((b, pixels)) >= missing
    depth_true = np.where(valid, rng.uniform(0.5, 10, (b, pixels)), 0.0)
    out.append(
      _dense_batch(
        rng.uniform(0.5, 10, (b, pixels)), depth_true, rng.uniform(0, 60, (b, pixels)), valid
      )
    )
  return out


@pytest.mark.parametrize("split", ["even", "uneven", "missing pixels"])
def test_pooled_and_per_batch_metrics_agree_on_an_even_split_only(split, seed):
  rng = np.random.default_rng(seed)
  sizes, missing = {
    "even": ([2] * 5, 0.0),
    "uneven": ([2] * 5 + [1], 0.0),  # a short last batch
    "missing pixels": ([2] * 5, 0.3),  # equal batches, unequal valid pixels
  }[split]
  pooled = DenseMetrics(TASKS, 2, pooling="pixels")
  by_batch = DenseMetrics(TASKS, 2, pooling="batches")
  for outputs, batch in _random_batches(rng, sizes, 64, missing):
    pooled.update(outputs, batch)
    by_batch.update(outputs, batch)
  p, b = pooled.result(), by_batch.result()
  names = ("abs err", "rel err", "mean angle", "<11.25", "<22.5", "<30")
  if split == "even":
    for name in names:
      assert b[name] == pytest.approx(p[name], rel=1e-9, abs=1e-6), name
  else:
    for name in ("abs err", "rel err", "mean angle"):
      assert abs(b[name] - p[name]) > 1e-6 * abs(p[name]), name
  assert b["mIoU"] == p["mIoU"] and b["pix acc"] == p["pix acc"]  # one confusion matrix


def test_an_unknown_pooling_is_refused():
  with pytest.raises(ValueError, match="metric_pooling='pixel'.*pixels, batches"):
    DenseMetrics(TASKS, 2, pooling="pixel")


def test_the_mean_of_the_last_epochs_is_the_reported_result():
  assert loop.mean_metrics([{"a": 1.0, "b": 4.0}, {"a": 2.0, "b": 0.0}, {"a": 6.0, "b": 2.0}]) == {
    "a": 3.0,
    "b": 2.0,
  }
  bench = benchmarks.get_benchmark("sines", num_train=64, num_test=32)
  config = bench.config.replace(
    batch_size=16, num_epochs=5, max_steps=None, selection="last_epochs", report_epochs=3
  )
  steps_per_epoch = 64 // 16
  by_epoch = []

  def callback(t, state, metrics):  # an independent evaluation at every epoch's end
    if t % steps_per_epoch == 0:
      by_epoch.append(bench.evaluate(state.params, state.model_state, "test"))

  result = loop.fit(bench, config, progress=False, callback=callback)
  assert len(by_epoch) == 5 and result.selection == "last_epochs"
  want = {n: np.mean([e[n] for e in by_epoch[-3:]]) for n in bench.metric_names}
  assert result.metrics == pytest.approx(want, rel=1e-9)
  assert result.metrics != pytest.approx(by_epoch[-1], rel=1e-6)  # not the last epoch alone
  assert [e["epoch"] for e in result.evaluations] == [2, 3, 4] and result.best_epoch is None


class _ScriptedBenchmark:
  """A stand-in `Benchmark` whose validation scores (and test metrics) follow a script."""

  def __init__(self, scores):
    self.scores, self.calls = list(scores), 0
    self.val, self.test = object(), object()

  def evaluate(self, params, model_state, split, batch_size):
    if split == "val":
      self.calls += 1
      return {"v": self.scores[self.calls - 1]}
    return {"t": 100.0 + params}  # the stand-in state's params: its epoch

  def selection_score(self, values, task=None):
    return values["v"]


def _select(scores, **config):
  bench = _ScriptedBenchmark(scores)
  config = Config(benchmark="scripted", **config)
  selection = loop.Selection(bench, config, "ls", len(scores), None, lambda text: None)
  run = loop.RunState()
  scales = []
  for epoch in range(len(scores)):
    state = types.SimpleNamespace(step=epoch, params=epoch, model_state=None)
    selection.after_epoch(epoch, state, run)
    scales.append(run.plateau_scale)
  return run, scales


def test_selection_ties_go_to_the_later_epoch_only_under_best_or_later():
  scores = [1.0, 3.0, 2.0, 3.0, 0.5]
  run, _ = _select(scores, selection="best")
  assert run.best_epoch == 1 and run.metrics == {"t": 101.0}
  run, _ = _select(scores, selection="best_or_later")  # the QM9 trainer's `<=`
  assert run.best_epoch == 3 and run.metrics == {"t": 103.0}
  run, _ = _select(scores, selection="last_epochs", report_epochs=2)
  assert run.best_epoch is None and run.metrics == {"t": 103.5}  # mean of epochs 3 and 4


class _TorchPlateau:
  """PyTorch's ReduceLROnPlateau(mode="min", threshold_mode="rel") as its documentation states
  it: an epoch improves when a < best * (1 - threshold); after more than `patience` epochs
  without improvement the rate is multiplied by `factor` (not below `min_lr`) and the count
  starts over."""

  def __init__(self, lr, factor, patience, threshold, min_lr):
    self.lr, self.factor, self.patience = lr, factor, patience
    self.threshold, self.min_lr = threshold, min_lr
    self.best, self.bad = math.inf, 0

  def step(self, a):
    if a < self.best * (1 - self.threshold):
      self.best, self.bad = a, 0
    else:
      self.bad += 1
    if self.bad > self.patience:
      new = max(self.lr * self.factor, self.min_lr)
      if self.lr - new > 1e-8:
        self.lr = new
      self.bad = 0
    return self.lr


@pytest.mark.parametrize("threshold", [0.0, 1e-4, 0.05])
def test_the_plateau_schedule_follows_torch_on_the_minimised_quantity(threshold, seed):
  rng = np.random.default_rng(seed)
  # Validation Delta m (minimised; score = -Delta m) that improves by steps both larger and
  # smaller than the threshold, of either sign, with flat stretches.
  delta_m = np.cumsum(rng.choice([-1.0, -1e-5, 0.0, 0.3], size=60, p=[0.2, 0.3, 0.3, 0.2]))
  delta_m += rng.choice([-20.0, 5.0])
  config = dict(
    lr_schedule="plateau",
    plateau_factor=0.7,
    plateau_patience=3,
    plateau_threshold=threshold,
    learning_rate=1e-3,
    plateau_min_lr=1e-5,
  )
  _, scales = _select(list(-delta_m), **config)
  torch = _TorchPlateau(1e-3, 0.7, 3, threshold, 1e-5)
  want = [torch.step(a) for a in delta_m]
  cfg = Config(**config)
  got = [loop.learning_rate_factor(cfg, 0, 1, s) * 1e-3 for s in scales]
  np.testing.assert_allclose(got, want, rtol=1e-12)
  assert len(set(want)) > 2  # the script did lower the rate more than once


def test_a_partial_last_batch_is_kept_with_drop_last_false():
  split = Split.from_arrays({"i": np.arange(10)})
  kept = list(epoch_batches(split, 4, seed=0, epoch=1, drop_last=False))
  dropped = list(epoch_batches(split, 4, seed=0, epoch=1))
  assert [len(b["i"]) for b in kept] == [4, 4, 2] and [len(b["i"]) for b in dropped] == [4, 4]
  assert sorted(np.concatenate([b["i"] for b in kept])) == list(range(10))
  resumed = list(epoch_batches(split, 4, seed=0, epoch=1, skip=2, drop_last=False))
  np.testing.assert_array_equal(resumed[0]["i"], kept[2]["i"])
  bench = benchmarks.get_benchmark("sines", num_train=40, num_test=16)
  config = bench.config.replace(batch_size=16, num_epochs=2, max_steps=None)
  assert loop.run_length(bench, config) == (2, 2, 4)
  assert loop.run_length(bench, config.replace(drop_last=False)) == (3, 2, 6)
  result = loop.fit(bench, config.replace(drop_last=False), progress=False)
  assert result.steps == 6 and np.isfinite(result.history.losses).all()


def test_qm9_target_scalings_against_numpy(seed):
  rng = np.random.default_rng(seed)
  targets = rng.normal(size=(50, 11)) * rng.uniform(0.1, 1e4, 11) + rng.normal(size=11) * 100
  train_idx = rng.permutation(50)[:30]
  ours = qm9.target_scaling(targets, train_idx, "train")
  np.testing.assert_allclose(ours.mean, targets[train_idx].mean(0), rtol=1e-12)
  np.testing.assert_allclose(ours.std, targets[train_idx].std(0, ddof=1), rtol=1e-12)
  every = qm9.target_scaling(targets, train_idx, "all")  # the authors' --scale-y true
  np.testing.assert_allclose(every.std, targets.std(0, ddof=1), rtol=1e-12)
  raw = qm9.target_scaling(targets, train_idx, "none")  # their published run: eV, not meV
  scaled = raw(targets)
  energy = [2, 3, 5, 6, 7, 8, 9]  # e_HOMO, e_LUMO, ZPVE, U0, U, H, G
  np.testing.assert_allclose(scaled[:, energy], targets[:, energy] / 1000, rtol=1e-6)
  others = [0, 1, 4, 10]
  np.testing.assert_allclose(scaled[:, others], targets[:, others], rtol=1e-6)
  with pytest.raises(ValueError, match="scale_y='raw'.*train, all, none"):
    qm9.target_scaling(targets, train_idx, "raw")


def test_official_configs_say_what_the_authors_trainers_do():
  nyu, city = (benchmarks.get_config(n, protocol="official") for n in ("nyuv2", "cityscapes"))
  for config in nyu, city:
    assert (config.protocol, config.selection, config.report_epochs) == (
      "official",
      "last_epochs",
      10,
    )
    assert config.data["val_size"] == 0 and config.data["metric_pooling"] == "batches"
    assert config.model["unbiased_running_var"] and not config.drop_last
  q = benchmarks.get_config("qm9", protocol="official")
  assert (q.data["scale_y"], q.selection, q.plateau_threshold, q.drop_last) == (
    "none",
    "best_or_later",
    1e-4,
    False,
  )
  c = benchmarks.get_config("celeba", protocol="official")
  assert c.model["unbiased_running_var"] and not c.drop_last and c.selection == "best"
  ours = benchmarks.get_config("nyuv2")
  assert (ours.protocol, ours.selection, ours.data["val_size"], ours.drop_last) == (
    "ours",
    "best",
    95,
    True,
  )
  assert benchmarks.get_config("qm9").data["scale_y"] == "train"
  # A preset shrinks the run and keeps the protocol.
  tiny = benchmarks.get_config("nyuv2", "tiny", protocol="official")
  assert tiny.protocol == "official" and tiny.data["val_size"] == 0 and tiny.max_steps == 3
  for name in ("multimnist", "multidigits", "sines"):
    with pytest.raises(ValueError, match=f"{name!r} has no 'official' protocol"):
      benchmarks.get_config(name, protocol="official")
  with pytest.raises(ValueError, match="Unknown protocol 'paper'"):
    benchmarks.get_config("qm9", protocol="paper")
  with pytest.raises(ValueError, match="selection='best_val'"):
    Config(selection="best_val")


def test_an_official_mtan_run_reports_the_mean_of_its_last_epochs(tmp_path):
  data_dir = write_mtan_files(str(tmp_path), "cityscapes")  # 8 train images, 4 test
  config = benchmarks.get_config("cityscapes", "tiny", protocol="official", data_dir=data_dir)
  config = config.replace(batch_size=3, max_steps=None, num_epochs=2, report_epochs=2)
  bench = benchmarks.from_config(config)
  assert bench.val is None and (len(bench.train), len(bench.test)) == (8, 4)
  result = loop.fit(bench, config, progress=False)
  assert result.steps == 6  # batches of 3, 3 and 2 in each epoch
  tests = [e["test"] for e in result.evaluations]
  assert len(tests) == 2 and result.metrics == pytest.approx(loop.mean_metrics(tests))
  ours = benchmarks.get_config("cityscapes", "tiny", data_dir=data_dir)
  held_out = benchmarks.from_config(ours)
  assert (len(held_out.train), len(held_out.val), len(held_out.test)) == (6, 2, 4)


def test_a_held_out_validation_split_never_overlaps_the_training_images(tmp_path):
  data_dir = write_mtan_files(str(tmp_path), "nyuv2")
  config = benchmarks.get_config("nyuv2", "tiny", data_dir=data_dir, val_size=3, augment=False)
  bench = benchmarks.from_config(config)
  everything = benchmarks.from_config(config.replace(data=dict(config.data, val_size=0))).train
  images = everything.take(np.arange(8))["image"].reshape(8, -1)
  train = bench.train.take(np.arange(5))["image"].reshape(5, -1)
  val = bench.val.take(np.arange(3))["image"].reshape(3, -1)
  index = lambda rows: {int(np.flatnonzero((images == r).all(1))[0]) for r in rows}
  assert len(index(train) | index(val)) == 8 and not index(train) & index(val)
  with pytest.raises(ValueError, match="val_size=8 must be between 0 and the 8"):
    benchmarks.from_config(config.replace(data=dict(config.data, val_size=8)))


def test_results_record_the_protocol():
  bench = benchmarks.get_benchmark("sines", num_train=32, num_test=16)
  result = loop.fit(bench, bench.config.replace(batch_size=16, max_steps=2), progress=False)
  record = result.to_dict(with_history=False)
  assert (record["protocol"], record["selection"]) == ("ours", "best")
  assert dataclasses.replace(result).protocol == "ours"
