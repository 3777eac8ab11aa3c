"""QM9: dense graph features, the paper's split and units on tfds' mock `qm9`, the MPNN
(size, masking, permutation invariance), MAE and Delta m % on the paper's rows (train steps
of every benchmark: test_benchmarks.py)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from ntkmtl_jax import benchmarks, metrics
from ntkmtl_jax.benchmarks import qm9
from ntkmtl_jax.models.qm9 import qm9_functions

from conftest import check_published_delta_m

NUM_MOCK = 20


def test_graph_features_of_water_by_hand():
  charges = np.zeros((1, 29), np.int64)
  charges[0, :3] = (8, 1, 1)  # O, H, H: O-H 0.96 A, H-O-H 104.5 degrees
  angle = np.radians(104.5)
  positions = np.zeros((1, 29, 3), np.float32)
  positions[0, 1] = (0.96, 0, 0)
  positions[0, 2] = (0.96 * np.cos(angle), 0.96 * np.sin(angle), 0)
  g = qm9.graph_features(charges, positions)
  assert g["nodes"].shape == (1, 29, qm9.NUM_NODE_FEATURES)
  assert g["edges"].shape == (1, 29, 29, qm9.NUM_EDGE_FEATURES)
  np.testing.assert_array_equal(g["node_mask"][0, :4], [True, True, True, False])
  # Node features: one-hot H C N O F, Z, bonded degree, bonded hydrogens.
  np.testing.assert_array_equal(g["nodes"][0, 0], [0, 0, 0, 1, 0, 8, 2, 2])
  np.testing.assert_array_equal(g["nodes"][0, 1], [1, 0, 0, 0, 0, 1, 1, 0])
  assert not g["nodes"][0, 3:].any()
  # Edges: complete graph without self-loops; O-H bonded, H-H (1.52 A) not.
  assert g["edge_mask"][0, :3, :3].sum() == 6 and not g["edge_mask"][0, 0, 0]
  assert g["edges"][0, 0, 1, 0] == 1 and g["edges"][0, 1, 2, 0] == 0
  np.testing.assert_allclose(g["edges"][0, 0, 1, 1], 0.96, rtol=1e-6)
  np.testing.assert_allclose(g["edges"][0, 1, 2, 1], 2 * 0.96 * np.sin(angle / 2), rtol=1e-5)
  assert not g["edges"][0, 3:].any() and not g["edge_mask"][0, :, 3:].any()


def test_split_is_a_partition_with_the_paper_sizes(seed):
  train_idx, val_idx, test_idx = qm9.split_indices(130_831, 10_000, 10_000, seed)
  assert (len(test_idx), len(val_idx), len(train_idx)) == (10_000, 10_000, 110_831)
  everything = np.concatenate([train_idx, val_idx, test_idx])
  np.testing.assert_array_equal(np.sort(everything), np.arange(130_831))
  again = qm9.split_indices(130_831, 10_000, 10_000, seed)
  np.testing.assert_array_equal(again[2], test_idx)


def test_pipeline_on_mock_qm9_units_standardisation_and_shapes():
  config = benchmarks.get_config("qm9", "tiny")
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    train_split, val_split, test_split, standardize = qm9.load_splits(
      config.data_dir, **config.data
    )
    source = tfds.data_source("qm9", split="train")
    raw = {t: np.asarray([source[i][t] for i in range(NUM_MOCK)], np.float64) for t in qm9.TARGETS}
  sizes = (len(train_split), len(val_split), len(test_split))
  assert sizes == (NUM_MOCK - 8, 4, 4)
  # Paper units: energies from Hartree to meV, the rest unchanged.
  train_idx, _, _ = qm9.split_indices(NUM_MOCK, 4, 4, config.data["split_seed"])
  hartree = 27.211386245988 * 1000
  want = np.stack([raw["homo"] * hartree, raw["U0_atomization"] * hartree, raw["mu"]], axis=1)
  mean = want[train_idx].mean(0)
  np.testing.assert_allclose(standardize.mean[[2, 6, 0]], mean, rtol=1e-9)
  batch = train_split.take(np.arange(len(train_split)))
  np.testing.assert_allclose(batch["y"].mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(batch["y"].std(0, ddof=1), 1.0, rtol=1e-4)
  assert batch["y"].shape == (len(train_split), 11) and batch["y"].dtype == np.float32
  g = batch["graph"]
  assert g["nodes"].shape == (len(train_split), 29, 8) and g["nodes"].dtype == np.float32
  assert g["edge_mask"].dtype == bool and g["node_mask"].dtype == bool


def _random_graphs(rng, batch, atoms):
  charges = np.zeros((batch, 29), np.int64)
  for b, n in enumerate(atoms):
    charges[b, :n] = rng.choice([1, 6, 7, 8, 9], n)
  positions = rng.normal(size=(batch, 29, 3)).astype(np.float32) * 1.5
  return charges, positions


@pytest.mark.one_seed
def test_mpnn_size_padding_and_permutation_invariance(seed):
  rng = np.random.default_rng(seed)
  functions = qm9_functions()
  charges, positions = _random_graphs(rng, 3, [5, 9, 17])
  batch = {"graph": qm9.graph_features(charges, positions), "y": np.zeros((3, 11), np.float32)}
  params, state = jax.jit(functions.init)(jax.random.key(seed), batch)
  predict = jax.jit(functions.predict)
  count = sum(x.size for x in jax.tree.leaves(params))
  # The PyTorch Geometric network (11 node, 5 edge features): 617,675 parameters. Ours reads
  # 8 node and 2 edge features (-3 * 64, -3 * 128) and flax's GRU/LSTM cells carry one bias
  # vector per gate where PyTorch carries two (-2 * 64 GRU, -4 * 64 LSTM).
  expected = 617_675 - 3 * 64 - 3 * 128 - 2 * 64 - 4 * 64
  print(f"QM9 MPNN parameters: {count:,} (paper's network: 617,675)")
  assert count == expected
  out = predict(params, state, batch)
  assert out.shape == (3, 11)
  # Padded atoms do not matter: change their positions and features, same output.
  junk = dict(batch["graph"])
  junk["nodes"] = np.where(junk["node_mask"][..., None], junk["nodes"], 5.0).astype(np.float32)
  junk["edges"] = np.where(junk["edge_mask"][..., None], junk["edges"], 3.0).astype(np.float32)
  np.testing.assert_allclose(
    predict(params, state, {"graph": junk}), out, rtol=1e-5, atol=1e-6, err_msg=f"seed={seed}"
  )
  # Relabelling the atoms of a molecule leaves its prediction unchanged.
  order = np.concatenate([rng.permutation(17), np.arange(17, 29)])
  permuted = qm9.graph_features(charges[:, order], positions[:, order])
  np.testing.assert_allclose(
    predict(params, state, {"graph": permuted})[2],
    out[2],
    rtol=1e-4,
    atol=1e-5,
    err_msg=f"seed={seed}",
  )


def test_mae_accumulator_by_hand():
  acc = qm9.MAE(std=np.arange(1, 12, dtype=np.float64))
  pred = np.zeros((3, 11))
  y = np.zeros((3, 11))
  y[:, 0] = [1.0, -2.0, 0.0]  # |err| mean 1 standardised -> 1 * std 1
  y[:, 10] = [0.5, 0.5, 0.5]  # mean 0.5 -> 0.5 * std 11
  acc.update(pred[:1], {"y": y[:1]})
  acc.update(pred[1:], {"y": y[1:]})
  result = acc.result()
  assert result["mu MAE"] == pytest.approx(1.0)
  assert result["cv MAE"] == pytest.approx(5.5)
  assert result["alpha MAE"] == 0.0


def test_delta_m_of_the_paper_rows():
  scoring = qm9.SCORING
  got = metrics.delta_m(qm9.PAPER_ROWS["ntkmtl_sr"], scoring.stl_row, scoring.higher_is_better)
  assert got == pytest.approx(30.7, abs=0.05)
  check_published_delta_m(scoring, qm9.PAPER_ROWS, qm9.PAPER_DELTA_M, 0.06)
  # Model selection (the official rule): the lower validation Delta m wins.
  rows = {m: dict(zip(scoring.metric_names, r)) for m, r in qm9.PAPER_ROWS.items()}
  best = max(rows, key=lambda m: scoring.selection_score(rows[m]))
  assert best == "ntkmtl_sr"
