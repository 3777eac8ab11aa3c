"""ntkmtl-jax: multi-task optimisation in JAX, with NTKMTL and NTKMTL-SR as typed weightings."""

from ntkmtl_jax import methods
from ntkmtl_jax._tree import AllSharedWarning, shared_mask
from ntkmtl_jax.kernel import (
  NTKWeights,
  diagonal_blocks,
  kernel_blocks,
  largest_eigenvalue,
  ntk_weights,
  representation_eigenvalues,
  task_jacobian,
  weights_from_eigenvalues,
)
from ntkmtl_jax.method import GradientRule, Method, Needs, TaskStats, Weighting, combine, is_method
from ntkmtl_jax.methods.ntkmtl import (
  NTKMTLState,
  clip_shared_by_global_norm,
  ntkmtl,
  ntkmtl_sr,
  official_ntkmtl,
)
from ntkmtl_jax.sharding import process_rows, replicate, shard_batch, shard_process_batch
from ntkmtl_jax.step import TrainState, TrainStep, make_train_step
from ntkmtl_jax.strategy import Passes, Strategy, default_strategy

__version__ = "0.1.0"

__all__ = [
  "AllSharedWarning",
  "GradientRule",
  "Method",
  "NTKMTLState",
  "NTKWeights",
  "Needs",
  "Passes",
  "Strategy",
  "TaskStats",
  "TrainState",
  "TrainStep",
  "Weighting",
  "clip_shared_by_global_norm",
  "combine",
  "default_strategy",
  "diagonal_blocks",
  "is_method",
  "kernel_blocks",
  "largest_eigenvalue",
  "make_train_step",
  "methods",
  "ntk_weights",
  "ntkmtl",
  "ntkmtl_sr",
  "official_ntkmtl",
  "process_rows",
  "replicate",
  "representation_eigenvalues",
  "shard_batch",
  "shard_process_batch",
  "shared_mask",
  "task_jacobian",
  "weights_from_eigenvalues",
]
