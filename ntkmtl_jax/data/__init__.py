"""Datasets: the built-in offline benchmarks (no download) and batching helpers."""

from ntkmtl_jax.data.offline import (OfflineDataset, Split, batches, eval_batches, multidigits,
                                     sines)

__all__ = ["OfflineDataset", "Split", "batches", "eval_batches", "multidigits", "sines"]
