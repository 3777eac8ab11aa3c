"""ntkmtl-jax: multi-task optimisation in JAX, with NTKMTL and NTKMTL-SR as optax transforms."""

from ntkmtl_jax import methods
from ntkmtl_jax.aggregator import (TaskAggregator, TaskStats, combine, gradient_aggregator,
                                   weighted_aggregator)
from ntkmtl_jax.kernel import (NTKWeights, default_strategy, diagonal_blocks, kernel_blocks,
                               largest_eigenvalue, ntk_weights, representation_eigenvalues,
                               task_jacobian, weights_from_eigenvalues)
from ntkmtl_jax.sharding import replicate, shard_batch
from ntkmtl_jax.train import TrainState, TrainStep, make_train_step
from ntkmtl_jax.transform import (NTKMTLState, clip_shared_by_global_norm, ntkmtl, ntkmtl_sr,
                                  official_ntkmtl)

__version__ = "0.1.0"

__all__ = [
    "NTKMTLState", "NTKWeights", "TaskAggregator", "TaskStats", "TrainState", "TrainStep",
    "clip_shared_by_global_norm", "combine", "default_strategy", "diagonal_blocks",
    "gradient_aggregator", "kernel_blocks", "largest_eigenvalue", "make_train_step", "methods",
    "ntk_weights", "ntkmtl", "ntkmtl_sr", "official_ntkmtl", "replicate",
    "representation_eigenvalues", "shard_batch", "task_jacobian", "weighted_aggregator",
    "weights_from_eigenvalues",
]
