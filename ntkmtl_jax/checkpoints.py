"""Crash-safe checkpoints of a training run (orbax `CheckpointManager`).

    workdir/checkpoints/<step>/{state, history, run}   the last `keep` checkpoints
    workdir/best/<step>/state                          the model selected on validation

Each checkpoint holds everything a resumed run needs in one orbax step directory: the
`TrainState`, the per-step history arrays and the run state (epoch, batch, best score,
plateau state, evaluations, and the fingerprint of the run's config) as a JSON item. orbax
writes a step to a temporary directory and renames it when complete, so a run killed at any
moment leaves the earlier checkpoints intact; `restore` takes the newest checkpoint that
restores and validates (expected structure, finite values) and says which it skipped and why.

The pieces under `RunCheckpoints` serve any loop (MT10's keeps its agent and replay buffer
with them): `step_manager` opens a directory of numbered steps, `save_step` writes one step
of named pytrees, arrays and JSON items, `restore_step` reads it back, checking each pytree
against a template (`check_arrays`). A pytree is stored as its leaves named by position
(`tree_arrays`), its PRNG keys as their raw key data (`keys_as_data`, `keys_from_data`).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import numpy as np

from ntkmtl_jax._optional import require

PyTree = Any


class RunMismatchError(ValueError):
  """The workdir holds a different run (or one that must not be replaced); says what to do."""


def fingerprint(config) -> dict:
  """What identifies a run: benchmark, protocol, its data and model options, method, hparams,
  seed, and how the loop batches and selects."""
  record = dict(
    benchmark=config.benchmark,
    protocol=config.protocol,
    selection=config.selection,
    report_epochs=config.report_epochs,
    drop_last=config.drop_last,
    data=config.data,
    model=config.model,
    method=config.method_key,
    hparams=config.method_hyperparameters(),
    seed=config.seed,
  )
  return json.loads(json.dumps(record, default=list))  # tuples as lists, as read back


def _is_key(x) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def keys_as_data(tree: PyTree) -> PyTree:
  """`tree` with every PRNG key array replaced by its raw key data (orbax stores plain arrays)."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def keys_from_data(tree: PyTree, template: PyTree) -> PyTree:
  """Undoes `keys_as_data`: wraps the leaves where `template` holds PRNG keys back into keys
  of the template's implementations."""
  return jax.tree.map(
    lambda t, x: jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_key(t) else x,
    template,
    tree,
  )


def tree_arrays(tree: PyTree) -> dict[str, np.ndarray]:
  """A pytree as a checkpoint stores it: its leaves as NumPy arrays named by position
  ("00000", "00001", ...), PRNG keys as their raw key data."""
  leaves = jax.tree.leaves(keys_as_data(tree))
  return {f"{i:05d}": np.asarray(leaf) for i, leaf in enumerate(leaves)}


def tree_from_arrays(template: PyTree, arrays: dict) -> PyTree:
  """Undoes `tree_arrays`: `arrays` in `template`'s structure, with its kinds of PRNG keys."""
  plain = keys_as_data(template)
  restored = jax.tree.unflatten(jax.tree.structure(plain), [arrays[k] for k in sorted(arrays)])
  return keys_from_data(restored, template)


def check_arrays(tree: dict, template: dict):
  """Raises ValueError unless `tree` has `template`'s leaves (names, shapes, dtypes), finite."""
  if sorted(tree) != sorted(template):
    raise ValueError(f"{len(tree)} arrays where the run has {len(template)}")
  for name in sorted(template):
    got, want = np.asarray(tree[name]), template[name]
    if got.shape != want.shape or got.dtype != want.dtype:
      raise ValueError(
        f"array {name} is {got.dtype}{list(got.shape)}, the run's is {want.dtype}{list(want.shape)}"
      )
    if np.issubdtype(got.dtype, np.floating) and not np.all(np.isfinite(got)):
      raise ValueError(f"array {name} has non-finite values")


def _orbax():
  return require("orbax.checkpoint", "data", "checkpoints")


def step_manager(directory: str, keep: int):
  """An orbax `CheckpointManager` of numbered steps in `directory` (made if missing) that
  keeps the newest `keep`."""
  ocp = _orbax()
  return ocp.CheckpointManager(
    os.path.abspath(directory), options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  )


def save_step(
  manager,
  step: int,
  *,
  trees: dict[str, PyTree] | None = None,
  arrays: dict[str, dict] | None = None,
  json_items: dict[str, Any] | None = None,
):
  """Writes checkpoint `step` of `manager` (replacing one of that step) and waits until orbax
  has committed it: the step directory appears complete or not at all.

  Args:
    manager: a `step_manager`.
    step: the step number.
    trees: named pytrees, stored by `tree_arrays` (restored against a template).
    arrays: named dicts of arrays, stored as they are but for the empty arrays, left out.
    json_items: named JSON-serialisable items.
  """
  ocp = _orbax()
  items = {name: ocp.args.StandardSave(tree_arrays(tree)) for name, tree in (trees or {}).items()}
  for name, values in (arrays or {}).items():
    items[name] = ocp.args.StandardSave(
      {k: np.asarray(v) for k, v in values.items() if np.asarray(v).size}
    )
  items.update({name: ocp.args.JsonSave(value) for name, value in (json_items or {}).items()})
  if step in manager.all_steps():  # e.g. a stopped run scored again where it stopped
    manager.delete(step)
  manager.save(step, args=ocp.args.Composite(**items))
  manager.wait_until_finished()


def restore_step(
  manager,
  step: int,
  *,
  trees: dict[str, PyTree] | None = None,
  arrays: tuple[str, ...] = (),
  json_items: tuple[str, ...] = (),
) -> dict[str, Any]:
  """Reads the named items of checkpoint `step` of `manager` (see `save_step`).

  Args:
    manager: a `step_manager`.
    step: the step to read.
    trees: {name: template}: each tree is checked against its template (structure, shapes,
      dtypes, finite values) and returned in the template's structure, PRNG keys rewrapped.
    arrays: names of dicts of arrays, returned as saved (NumPy).
    json_items: names of JSON items.

  Returns:
    {name: value} for every item asked for.

  Raises:
    ValueError: a tree does not match its template. A missing or unreadable item raises what
      orbax raises.
  """
  ocp = _orbax()
  expected = {name: tree_arrays(template) for name, template in (trees or {}).items()}
  items = {
    name: ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, tree))
    for name, tree in expected.items()
  }
  items.update({name: ocp.args.StandardRestore() for name in arrays})
  items.update({name: ocp.args.JsonRestore() for name in json_items})
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  out = {}
  for name, template in (trees or {}).items():
    check_arrays(dict(restored[name]), expected[name])
    out[name] = tree_from_arrays(template, dict(restored[name]))
  out.update({name: {k: np.asarray(v) for k, v in dict(restored[name]).items()} for name in arrays})
  out.update({name: restored[name] for name in json_items})
  return out


class RunCheckpoints:
  """The checkpoints of one run in `workdir`.

  Args:
    workdir: the run's directory.
    keep: how many of the newest step checkpoints to keep.
  """

  def __init__(self, workdir: str, keep: int = 3):
    self.workdir = os.path.abspath(workdir)
    self.keep = keep
    self.latest = step_manager(os.path.join(self.workdir, "checkpoints"), keep)
    self.best = step_manager(os.path.join(self.workdir, "best"), 1)

  def steps(self) -> list[int]:
    """The steps of the saved checkpoints, newest first."""
    return sorted(self.latest.all_steps(), reverse=True)

  def save(self, state, run: dict, history: dict):
    """Saves `state`, the run state (JSON) and the history arrays as one checkpoint."""
    save_step(
      self.latest,
      int(state.step),
      trees=dict(state=state),
      arrays=dict(history=history),
      json_items=dict(run=run),
    )

  def save_best(self, state):
    """Saves `state` as the selected model."""
    save_step(self.best, int(state.step), trees=dict(state=state))

  def restore(self, template, say=print) -> tuple[Any, dict, dict] | None:
    """The newest checkpoint that restores and validates: (state, run state, history).

    Args:
      template: a `TrainState` of the run (structure, shapes and dtypes to expect).
      say: prints which checkpoints were skipped and why.

    Returns:
      The checkpoint's (state, run state, history arrays), or None when none is usable.
    """
    for step in self.steps():
      try:
        restored = restore_step(
          self.latest, step, trees=dict(state=template), arrays=("history",), json_items=("run",)
        )
        run = dict(restored["run"])
        missing = {"epoch", "batch", "fingerprint"} - set(run)
        if missing:
          raise ValueError(f"the run state lacks {sorted(missing)}")
        state = restored["state"]
        if int(state.step) != step:
          raise ValueError(f"it holds the state of step {int(state.step)}")
        return state, run, restored["history"]
      except Exception as error:  # any failure to read one checkpoint: try the one before
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        say(f"Skipped the checkpoint of step {step} in {self.latest.directory}: {reason}")
    return None

  def restore_best(self, template):
    """The selected model's `TrainState`."""
    step = self.best.latest_step()
    if step is None:
      raise FileNotFoundError(
        f"No best model in {self.workdir}: the run never scored its validation split."
      )
    return restore_step(self.best, step, trees=dict(state=template))["state"]

  def clear(self):
    """Deletes every checkpoint of the run."""
    for manager in (self.latest, self.best):
      manager.close()
    for sub in ("checkpoints", "best"):
      shutil.rmtree(os.path.join(self.workdir, sub), ignore_errors=True)
    self.__init__(self.workdir, self.keep)
