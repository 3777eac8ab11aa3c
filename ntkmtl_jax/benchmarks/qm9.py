"""QM9 from tfds `qm9` as padded dense graphs (29 atoms), 11 standardised targets.

Targets, in the paper's order and units: mu (D), alpha (a0^3), e_HOMO, e_LUMO (meV),
<R^2> (a0^2), ZPVE (meV), U0, U, H, G (atomization energies, meV), c_v (cal/mol K). tfds
stores energies in Hartree; they are converted with 1 Ha = 27,211.386 meV. Under our
protocol targets are standardised with the mean and standard deviation of the training split
(`scale_y="train"`); the official one trains on raw targets in the authors' units (energies
in eV, `scale_y="none"`); see `target_scaling`. The loss is the MSE of the scaled targets and
the reported MAE is in paper units.

Split (the paper's): the 130,831 characterised molecules (tfds config "original", split
"train") are shuffled with `split_seed`; test = the first 10,000, validation = the next
10,000, train = the rest.

Graphs: each molecule is a complete graph (no self-loops) over its atoms, as the papers'
`Complete` transform. tfds `qm9` has no bond table (the papers' PyTorch Geometric features
come from RDKit), so covalent bonds are inferred from geometry: atoms i, j are bonded when
their distance is at most r_i + r_j + 0.4 A (covalent radii H 0.31, C 0.76, N 0.71, O 0.66,
F 0.57 A). Node features (8): one-hot H/C/N/O/F, atomic number, bonded degree, bonded
hydrogens. Edge features (2): bonded (0/1), distance (A). Arrays: `graph` = {`nodes`
(B, 29, 8), `node_mask` (B, 29), `edges` (B, 29, 29, 2), `edge_mask` (B, 29, 29)}, `y`
(B, 11) float32.

Data: `tfds.data_source("qm9")` (array_record) from `data_dir`; see `HOW_TO_GET`.

Metrics: MAE per target in the paper's units; model selection on the validation Delta m %
(the official rule).
"""

from __future__ import annotations

from unittest import mock

import numpy as np

from ntkmtl_jax.benchmarks import Benchmark, Scoring, smoke_preset
from ntkmtl_jax.data.splits import Split, open_tfds, read_examples
from ntkmtl_jax.data.validation import DataFileError
from ntkmtl_jax.models.qm9 import qm9_functions
from ntkmtl_jax.config import Config

HOW_TO_GET = ("on a machine with TensorFlow installed, `pip install tensorflow "
              "tensorflow-datasets && tfds build qm9 --file_format=array_record --data_dir DIR` "
              "(the 'original' config; it downloads the QM9 files from figshare)")

MAX_ATOMS = 29
TARGETS = ("mu", "alpha", "homo", "lumo", "r2", "zpve", "U0_atomization", "U_atomization",
           "H_atomization", "G_atomization", "Cv")
TARGET_NAMES = ("mu", "alpha", "eHOMO", "eLUMO", "R2", "ZPVE", "U0", "U", "H", "G", "cv")
HARTREE_TO_MEV = 27_211.386245988
# Paper units: meV for the energies, tfds' own units for the others.
UNIT_SCALE = np.asarray([1, 1, HARTREE_TO_MEV, HARTREE_TO_MEV, 1, HARTREE_TO_MEV,
                         HARTREE_TO_MEV, HARTREE_TO_MEV, HARTREE_TO_MEV, HARTREE_TO_MEV, 1],
                        np.float64)
ELEMENTS = (1, 6, 7, 8, 9)
COVALENT_RADIUS = {1: 0.31, 6: 0.76, 7: 0.71, 8: 0.66, 9: 0.57}
BOND_TOLERANCE = 0.4
NUM_NODE_FEATURES = 8
NUM_EDGE_FEATURES = 2


def graph_features(charges: np.ndarray, positions: np.ndarray) -> dict:
  """Padded dense graph arrays of a batch: charges (B, 29) int (0 = padding), positions
  (B, 29, 3) in A."""
  charges = np.asarray(charges, np.int64)
  node_mask = charges > 0
  radius = np.zeros(charges.shape, np.float32)
  for z, r in COVALENT_RADIUS.items():
    radius[charges == z] = r
  distance = np.linalg.norm(positions[:, :, None, :] - positions[:, None, :, :], axis=-1)
  n = charges.shape[1]
  edge_mask = node_mask[:, :, None] & node_mask[:, None, :] & ~np.eye(n, dtype=bool)[None]
  bonded = edge_mask & (distance <= radius[:, :, None] + radius[:, None, :] + BOND_TOLERANCE)
  one_hot = np.stack([charges == z for z in ELEMENTS], axis=-1)
  degree = bonded.sum(-1)
  hydrogens = (bonded & (charges == 1)[:, None, :]).sum(-1)
  nodes = np.concatenate([one_hot, charges[..., None], degree[..., None],
                          hydrogens[..., None]], axis=-1).astype(np.float32)
  nodes *= node_mask[..., None]
  edges = np.stack([bonded, distance * edge_mask], axis=-1).astype(np.float32)
  return {"nodes": nodes, "node_mask": node_mask, "edges": edges, "edge_mask": edge_mask}


SCALINGS = ("train", "all", "none")
# PyTorch Geometric's QM9 (the authors' data) stores energies in eV, 1/1000 of paper units.
PYG_UNITS = np.where(UNIT_SCALE != 1, 1000.0, 1.0)


class Standardizer:
  """Target scaling y -> (y - mean) / std of paper-unit targets; `std` also turns predictions
  back into paper units for the MAE.

  `Standardizer(targets)` takes the statistics of `targets` (the standard deviation with
  n - 1, as `torch.std`); `Standardizer.of(mean, std)` takes them given.
  """

  def __init__(self, targets: np.ndarray):
    self.mean = targets.mean(axis=0)
    self.std = targets.std(axis=0, ddof=1) if len(targets) > 1 else np.ones(targets.shape[1])
    self.std = np.where(self.std > 0, self.std, 1.0)

  @classmethod
  def of(cls, mean, std) -> Standardizer:
    new = cls.__new__(cls)
    new.mean, new.std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    return new

  def __call__(self, targets):
    return ((targets - self.mean) / self.std).astype(np.float32)


def target_scaling(targets: np.ndarray, train_idx: np.ndarray, scale_y: str) -> Standardizer:
  """The `Standardizer` of `scale_y`: "train" (ours: the training split's mean and std),
  "all" (the authors' trainer with `--scale-y true`: `train_dataset.data.y` is the storage of
  the whole shuffled dataset, so its statistics are over every molecule, test included,
  experiments/quantum_chemistry/trainer.py lines 101-106) or "none" (their published run,
  `--scale-y` off: raw targets in PyTorch Geometric's units, energies in eV)."""
  if scale_y == "train":
    return Standardizer(targets[train_idx])
  if scale_y == "all":
    return Standardizer(targets)
  if scale_y == "none":
    return Standardizer.of(np.zeros(targets.shape[1]), PYG_UNITS)
  raise ValueError(f"QM9: scale_y={scale_y!r}; choose one of {', '.join(SCALINGS)}.")


def split_indices(num: int, test_size: int, val_size: int, seed: int):
  """(train, val, test) indices: shuffle, test = first `test_size`, val = next `val_size`."""
  if test_size + val_size >= num:
    raise ValueError(f"QM9 split: test_size + val_size ({test_size} + {val_size}) must be "
                     f"smaller than the {num} molecules.")
  order = np.random.default_rng(seed).permutation(num)
  return order[test_size + val_size:], order[test_size:test_size + val_size], order[:test_size]


def make_split(arrays: dict, standardize: Standardizer) -> Split:

  def take(indices, rng):
    del rng
    return {"graph": graph_features(arrays["charges"][indices], arrays["positions"][indices]),
            "y": standardize(arrays["targets"][indices])}

  return Split(len(arrays["targets"]), take)


def load_arrays(data_dir: str | None) -> dict:
  """charges, positions and paper-unit targets of every molecule, in tfds order, checked by
  `check_arrays` (a `DataFileError` before training starts)."""
  source = open_tfds("qm9", "train", data_dir, HOW_TO_GET)
  raw = read_examples(source, ("charges", "positions") + TARGETS)
  targets = np.stack([raw[t].astype(np.float64) for t in TARGETS], axis=1) * UNIT_SCALE
  arrays = {"charges": raw["charges"].reshape(-1, MAX_ATOMS),
            "positions": raw["positions"].reshape(-1, MAX_ATOMS, 3).astype(np.float32),
            "targets": targets}
  # tfds.testing.mock_data draws charges at random in 0..255: no charge check on mock data.
  mocked = isinstance(getattr(source, "data_source", None), mock.Mock)
  check_arrays(arrays, where=data_dir or "the default tfds data_dir", charges=not mocked)
  return arrays


CHARGES = (0,) + ELEMENTS  # 0: a padding atom


def check_arrays(arrays: dict, where: str = "", *, charges: bool = True):
  """A `DataFileError` naming tfds `qm9`, the field and the first bad molecule (its index in
  tfds order) unless every target and position is finite and, with `charges`, every charge
  is 0 (padding) or one of H, C, N, O, F (1, 6, 7, 8, 9). Vectorised: a fraction of reading."""
  fields = [(t, arrays["targets"][:, j]) for j, t in enumerate(TARGETS)]
  fields.append(("positions", arrays["positions"]))
  for name, values in fields:
    bad = ~np.isfinite(values).reshape(len(values), -1).all(axis=1)
    if bad.any():
      _refuse(name, bad, "NaN or infinite values", where)
  if charges:
    bad = ~np.isin(arrays["charges"], CHARGES).all(axis=1)
    if bad.any():
      first = arrays["charges"][int(np.argmax(bad))]
      odd = sorted(set(first.tolist()) - set(CHARGES))
      _refuse("charges", bad, f"atomic numbers {odd} (QM9 has only 0 = padding and "
              f"{', '.join(map(str, ELEMENTS))})", where)


def _refuse(field: str, bad: np.ndarray, problem: str, where: str):
  first = int(np.argmax(bad))
  at = f" in {where}" if where else ""
  raise DataFileError(
      f"The tfds dataset 'qm9' (split 'train'{at}): field {field!r} of molecule {first} "
      f"(tfds order; {int(bad.sum()):,} of {len(bad):,} molecules) has {problem}. Rebuild "
      "the dataset (`tfds build qm9 --file_format=array_record --data_dir DIR`, after "
      "deleting DIR/qm9), or check the files it was built from.",
      path=f"qm9/{field}", problem=problem)


def load_splits(data_dir: str | None, *, test_size: int = 10_000, val_size: int = 10_000,
                split_seed: int = 0, scale_y: str = "train"):
  """(train, val, test, standardizer) of QM9 (see the module docstring; `scale_y` as
  `target_scaling`'s)."""
  arrays = load_arrays(data_dir)
  train_idx, val_idx, test_idx = split_indices(len(arrays["targets"]), int(test_size),
                                               int(val_size), int(split_seed))
  pick = lambda idx: {k: v[idx] for k, v in arrays.items()}
  standardize = target_scaling(arrays["targets"], train_idx, scale_y)
  return (make_split(pick(train_idx), standardize), make_split(pick(val_idx), standardize),
          make_split(pick(test_idx), standardize), standardize)


class MAE:
  """Accumulates |prediction - target| per target, de-standardised to paper units."""

  def __init__(self, std: np.ndarray):
    self.std = np.asarray(std, np.float64)
    self.sums = np.zeros(len(TARGET_NAMES))
    self.count = 0

  def update(self, predictions, batch):
    self.sums += np.abs(np.asarray(predictions, np.float64) - batch["y"]).sum(0) * self.std
    self.count += len(batch["y"])

  def result(self) -> dict:
    return {f"{t} MAE": float(s / self.count) for t, s in zip(TARGET_NAMES, self.sums)}


# Table 3 (MAE, paper units), every row re-run by the authors.
STL = (0.060, 0.156, 60.54, 51.22, 0.419, 3.08, 39.3, 42.9, 41.7, 43.1, 0.061)
PAPER_ROWS = {
    "ls": (0.077, 0.253, 55.95, 68.59, 4.163, 11.08, 109.2, 109.8, 110.1, 106.7, 0.099),
    "ntkmtl": (0.091, 0.212, 70.97, 70.81, 2.113, 3.835, 44.18, 44.56, 44.53, 44.38, 0.077),
    "ntkmtl_sr": (0.081, 0.207, 75.95, 69.10, 1.176, 3.689, 40.14, 40.46, 40.48, 40.49,
                  0.074),
    "famo": (0.128, 0.230, 98.09, 84.42, 0.859, 3.541, 40.24, 40.57, 40.62, 40.21, 0.081),
    "fairgrad": (0.109, 0.208, 81.74, 72.82, 1.669, 3.418, 51.31, 51.67, 51.72, 51.97, 0.079),
    "nash_mtl": (0.086, 0.218, 69.78, 66.18, 2.153, 4.679, 59.63, 59.94, 59.98, 59.97, 0.082),
}
PAPER_DELTA_M = {"ls": 179.8, "ntkmtl": 56.7, "ntkmtl_sr": 30.7, "famo": 38.9,
                 "fairgrad": 57.0, "nash_mtl": 72.9}

SCORING = Scoring(metric_names=tuple(f"{t} MAE" for t in TARGET_NAMES),
                  higher_is_better=(False,) * 11, metric_tasks=tuple(range(11)), stl_row=STL)


def default_config(*, protocol: str = "ours", test_size: int = 10_000, val_size: int = 10_000,
                   split_seed: int = 0, scale_y: str | None = None, dim: int = 64) -> Config:
  """The run as the paper re-ran all methods: Adam 1e-3, ReduceLROnPlateau(0.7, patience 10,
  min 1e-5) on the validation Delta m, batch 60, 300 epochs, the model of the best
  validation Delta m; under the protocol `protocol`:

  - "ours": targets standardised with the training split's statistics (`scale_y="train"`);
    a later epoch replaces the selected one only when strictly better; any strict
    improvement counts for the plateau schedule; full batches.
  - "official" (experiments/quantum_chemistry/trainer.py of jianke0604/NTKMTL): raw targets
    (`scale_y="none"`: `--scale-y` defaults to false, line 292, and run.sh does not set it);
    selection by `val_delta <= best_val_delta` (line 212: an equal later epoch replaces
    the earlier); the plateau threshold of torch (1e-4, relative); every epoch's last
    partial batch trained on.

  Options: `test_size`, `val_size`, `split_seed` (the split), `scale_y` ("train", "all" or
  "none"; None: the protocol's), `dim` (the MPNN's width).
  """
  official = protocol == "official"
  if protocol not in ("ours", "official"):
    raise ValueError(f"Unknown protocol {protocol!r} for qm9.")
  if scale_y is None:
    scale_y = "none" if official else "train"
  return Config(benchmark="qm9", protocol=protocol,
                data=dict(test_size=test_size, val_size=val_size, split_seed=split_seed,
                          scale_y=scale_y), model=dict(dim=dim),
                method_hparams={"ntkmtl": {"exponent": 0.5}, "ntkmtl_sr": {"num_chunks": 4}},
                learning_rate=1e-3, batch_size=60, num_epochs=300, lr_schedule="plateau",
                eval_batch_size=500, init_prng="rbg",
                selection="best_or_later" if official else "best",
                plateau_threshold=1e-4 if official else 0.0, drop_last=not official)


# tiny: 4 test and 4 validation molecules, 3 batches of 4.
PRESETS = {"tiny": smoke_preset(4, 8, data=dict(test_size=4, val_size=4))}


def benchmark(*, data_dir: str | None = None, **options) -> Benchmark:
  """QM9 (tfds `qm9`): 11 molecular properties (MAE, paper units), MPNN on dense graphs.

  Options: `data_dir`, `protocol`, `test_size`, `val_size`, `split_seed` (the split),
  `scale_y` (the target scaling) and `dim` (the MPNN's width); see `default_config`.
  """
  config = default_config(**options).replace(data_dir=data_dir)
  train, val, test, standardize = load_splits(data_dir, **config.data)
  return Benchmark(
      name="qm9", description="QM9: 11 molecular properties (MAE, paper units), MPNN on "
      "dense graphs", task_names=TARGET_NAMES, scoring=SCORING,
      functions=qm9_functions(len(TARGET_NAMES), int(config.model["dim"])), train=train,
      val=val, test=test, new_accumulator=lambda: MAE(standardize.std), config=config,
      paper_rows=PAPER_ROWS)
