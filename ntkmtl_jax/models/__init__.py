"""Flax modules for the benchmarks, and the glue that turns a multi-task model into the pure
functions the train step takes: `task_functions` (flax linen: an encoder and task heads) and
`nnx_task_functions` (a Flax NNX model with a shared trunk)."""

from ntkmtl_jax.models.multitask import TaskFunctions, task_functions
from ntkmtl_jax.models.nnx_multitask import nnx_task_functions, update_module

__all__ = ["TaskFunctions", "nnx_task_functions", "task_functions", "update_module"]
