"""Data parallelism: place a batch sharded over a mesh axis and replicate the train state."""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ntkmtl_jax import _tree
from ntkmtl_jax._tree import PyTree


def data_mesh(devices=None, axis: str = "data") -> Mesh:
  """A one-axis mesh over `devices` (default: all local devices).

  The axis is of type `Auto`: XLA propagates the batch sharding through the step (the chunk
  reshape of the extended NTK included). With an `Explicit` mesh, jax asks for the output
  sharding of that reshape, which the step does not specify.
  """
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), (axis,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def shard_batch(batch: PyTree, mesh: Mesh, axis: str = "data") -> PyTree:
  """Places every leaf of `batch` with its leading axis split over the mesh axis `axis`."""
  size = _tree.batch_size(batch)
  n = mesh.shape[axis]
  if size % n:
    raise ValueError(f"Batch size {size} is not divisible by the {n} devices of mesh axis "
                     f"{axis!r}; use a batch size that is a multiple of {n}.")
  sharding = NamedSharding(mesh, PartitionSpec(axis))
  return jax.device_put(batch, sharding)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places every leaf of `tree` fully replicated on the mesh (params, optimiser state)."""
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
