"""Data parallelism: place a batch sharded over a mesh axis and replicate the train state.

One process (all local devices):

    mesh = data_mesh()
    state, batch = replicate(state, mesh), shard_batch(batch, mesh)

Several processes (one per host, after `jax.distributed.initialize`; docs/multi_host.md):
the mesh spans every process's devices, each process loads only its own rows of the
global batch (`process_rows`), and `shard_process_batch` assembles the global array.

    mesh = data_mesh()                                   # all devices of all processes
    state = replicate(state, mesh)                       # the same values on every process
    rows = process_rows(global_batch_size)               # this process's slice
    batch = shard_process_batch(load(rows), mesh)        # (global_batch_size, ...) arrays
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ntkmtl_jax import _tree
from ntkmtl_jax._tree import PyTree


def data_mesh(devices=None, axis: str = "data") -> Mesh:
  """A one-axis mesh over `devices` (default: all devices, of every process).

  The axis is of type `Auto`: XLA propagates the batch sharding through the step (the chunk
  reshape of the extended NTK included). With an `Explicit` mesh, jax asks for the output
  sharding of that reshape, which the step does not specify.
  """
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh(
    (len(devices),), (axis,), devices=devices, axis_types=(jax.sharding.AxisType.Auto,)
  )


def _check_divisible(size: int, n: int, what: str) -> None:
  if size % n:
    raise ValueError(
      f"Batch size {size} is not divisible by the {n} devices of {what}; use a "
      f"batch size that is a multiple of {n}."
    )


def shard_batch(batch: PyTree, mesh: Mesh, axis: str = "data") -> PyTree:
  """Places every leaf of `batch` with its leading axis split over the mesh axis `axis`.

  With several processes, every process must pass the same, whole batch (jax checks);
  to give each process only its own rows, use `shard_process_batch`.
  """
  _check_divisible(_tree.batch_size(batch), mesh.shape[axis], f"mesh axis {axis!r}")
  sharding = NamedSharding(mesh, PartitionSpec(axis))
  if jax.process_count() > 1:
    batch = jax.tree.map(np.asarray, batch)  # host values: jax asserts they agree
  return jax.device_put(batch, sharding)


def process_rows(global_batch_size: int, mesh: Mesh | None = None, axis: str = "data") -> slice:
  """The rows of a global batch that this process loads for `shard_process_batch`.

  Process p holds the p-th contiguous block, as `data_mesh()` orders the devices by process.
  """
  mesh = data_mesh(axis=axis) if mesh is None else mesh
  _check_divisible(global_batch_size, mesh.shape[axis], f"mesh axis {axis!r}")
  count = jax.process_count()
  per_process = global_batch_size // count
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


def shard_process_batch(local_batch: PyTree, mesh: Mesh, axis: str = "data") -> PyTree:
  """Global arrays from each process's own rows (`process_rows`), split over `axis`.

  Every process calls it with a batch of the same size; the global batch is the processes'
  batches concatenated in process order. In one process it equals `shard_batch`.
  """
  local_size = _tree.batch_size(local_batch)
  sharding = NamedSharding(mesh, PartitionSpec(axis))
  local_devices = len(sharding.addressable_devices)
  _check_divisible(local_size, local_devices, "this process on the mesh")
  global_size = local_size * (mesh.shape[axis] // local_devices)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(
      sharding, np.asarray(x), (global_size,) + np.shape(x)[1:]
    ),
    local_batch,
  )


def _replicate_leaf(x, sharding: NamedSharding):
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    data = _replicate_leaf(jax.random.key_data(x), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  # A committed array cannot move to devices of other processes; its host value can (jax
  # asserts it is the same on every process).
  return jax.device_put(np.asarray(x), sharding)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places every leaf of `tree` fully replicated on the mesh (params, optimiser state).

  With several processes, every process must pass the same values (jax checks).
  """
  sharding = NamedSharding(mesh, PartitionSpec())
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(lambda x: _replicate_leaf(x, sharding), tree)
