"""Datasets: splits and batches, tfds access, the MTAN `.npy` layout and the built-in offline
data (no download)."""

from ntkmtl_jax.data.offline import OfflineDataset, TaskArrays, multidigits, sines
from ntkmtl_jax.data.splits import (
  DatasetMissingError,
  Split,
  endless_batches,
  epoch_batches,
  missing_dataset,
  open_tfds,
  read_examples,
)
from ntkmtl_jax.data.validation import DataFileError

__all__ = [
  "DataFileError",
  "DatasetMissingError",
  "OfflineDataset",
  "Split",
  "TaskArrays",
  "endless_batches",
  "epoch_batches",
  "missing_dataset",
  "multidigits",
  "open_tfds",
  "read_examples",
  "sines",
]
