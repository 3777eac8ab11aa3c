"""Crash-safe checkpoints of a training run (orbax `CheckpointManager`).

    workdir/checkpoints/<step>/{state, history, run}   the last `keep` checkpoints
    workdir/best/<step>/state                          the model selected on validation

Each checkpoint holds everything a resumed run needs in one orbax step directory: the
`TrainState`, the per-step history arrays and the run state (epoch, batch, best score,
plateau state, evaluations, and the fingerprint of the run's config) as a JSON item. orbax
writes a step to a temporary directory and renames it when complete, so a run killed at any
moment leaves the earlier checkpoints intact; `restore` takes the newest checkpoint that
restores and validates (expected structure, finite values) and says which it skipped and why.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import numpy as np

PyTree = Any


class RunMismatchError(ValueError):
  """The workdir holds a different run (or one that must not be replaced); says what to do."""


def fingerprint(config) -> dict:
  """What identifies a run: benchmark, its data and model options, method, hparams, seed."""
  record = dict(benchmark=config.benchmark, data=config.data, model=config.model,
                method=config.method_key, hparams=config.method_hyperparameters(),
                seed=config.seed)
  return json.loads(json.dumps(record, default=list))  # tuples as lists, as read back


def _state_tree(state) -> dict:
  leaves = jax.tree.leaves(state._replace(key=jax.random.key_data(state.key)))
  return {f"{i:05d}": np.asarray(leaf) for i, leaf in enumerate(leaves)}


def _state_from_tree(template, tree: dict):
  plain = template._replace(key=jax.random.key_data(template.key))
  restored = jax.tree.unflatten(jax.tree.structure(plain), [tree[k] for k in sorted(tree)])
  return restored._replace(key=jax.random.wrap_key_data(
      restored.key, impl=jax.random.key_impl(template.key)))


def _check_tree(tree: dict, template: dict):
  """Raises ValueError unless `tree` has `template`'s leaves (names, shapes, dtypes), finite."""
  if sorted(tree) != sorted(template):
    raise ValueError(f"{len(tree)} arrays where the run has {len(template)}")
  for name in sorted(template):
    got, want = np.asarray(tree[name]), template[name]
    if got.shape != want.shape or got.dtype != want.dtype:
      raise ValueError(f"array {name} is {got.dtype}{list(got.shape)}, the run's is "
                       f"{want.dtype}{list(want.shape)}")
    if np.issubdtype(got.dtype, np.floating) and not np.all(np.isfinite(got)):
      raise ValueError(f"array {name} has non-finite values")


class RunCheckpoints:
  """The checkpoints of one run in `workdir`.

  Args:
    workdir: the run's directory.
    keep: how many of the newest step checkpoints to keep.
  """

  def __init__(self, workdir: str, keep: int = 3):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.workdir = os.path.abspath(workdir)
    self.keep = keep
    options = lambda n: ocp.CheckpointManagerOptions(max_to_keep=n, create=True)
    self.latest = ocp.CheckpointManager(os.path.join(self.workdir, "checkpoints"),
                                        options=options(keep))
    self.best = ocp.CheckpointManager(os.path.join(self.workdir, "best"), options=options(1))

  def steps(self) -> list[int]:
    """The steps of the saved checkpoints, newest first."""
    return sorted(self.latest.all_steps(), reverse=True)

  def _save(self, manager, step: int, **items):
    if step in manager.all_steps():  # e.g. a stopped run scored again where it stopped
      manager.delete(step)
    manager.save(step, args=self._ocp.args.Composite(**items))
    manager.wait_until_finished()

  def save(self, state, run: dict, history: dict):
    """Saves `state`, the run state (JSON) and the history arrays as one checkpoint."""
    ocp = self._ocp
    arrays = {k: np.asarray(v) for k, v in history.items() if np.asarray(v).size}
    self._save(self.latest, int(state.step), state=ocp.args.StandardSave(_state_tree(state)),
               history=ocp.args.StandardSave(arrays), run=ocp.args.JsonSave(run))

  def save_best(self, state):
    """Saves `state` as the selected model."""
    self._save(self.best, int(state.step),
               state=self._ocp.args.StandardSave(_state_tree(state)))

  def restore(self, template, say=print) -> tuple[Any, dict, dict] | None:
    """The newest checkpoint that restores and validates: (state, run state, history).

    Args:
      template: a `TrainState` of the run (structure, shapes and dtypes to expect).
      say: prints which checkpoints were skipped and why.

    Returns:
      The checkpoint's (state, run state, history arrays), or None when none is usable.
    """
    ocp = self._ocp
    expected = _state_tree(template)
    for step in self.steps():
      try:
        restored = self.latest.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                                        expected)),
            history=ocp.args.StandardRestore(), run=ocp.args.JsonRestore()))
        _check_tree(dict(restored.state), expected)
        run = dict(restored.run)
        missing = {"epoch", "batch", "fingerprint"} - set(run)
        if missing:
          raise ValueError(f"the run state lacks {sorted(missing)}")
        state = _state_from_tree(template, dict(restored.state))
        if int(state.step) != step:
          raise ValueError(f"it holds the state of step {int(state.step)}")
        return state, run, {k: np.asarray(v) for k, v in dict(restored.history).items()}
      except Exception as error:  # any failure to read one checkpoint: try the one before
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        say(f"Skipped the checkpoint of step {step} in {self.latest.directory}: {reason}")
    return None

  def restore_best(self, template):
    """The selected model's `TrainState`."""
    ocp = self._ocp
    step = self.best.latest_step()
    if step is None:
      raise FileNotFoundError(f"No best model in {self.workdir}: the run never scored its "
                              "validation split.")
    expected = _state_tree(template)
    restored = self.best.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(
        jax.tree.map(ocp.utils.to_shape_dtype_struct, expected))))
    _check_tree(dict(restored.state), expected)
    return _state_from_tree(template, dict(restored.state))

  def clear(self):
    """Deletes every checkpoint of the run."""
    for manager in (self.latest, self.best):
      manager.close()
    for sub in ("checkpoints", "best"):
      shutil.rmtree(os.path.join(self.workdir, sub), ignore_errors=True)
    self.__init__(self.workdir, self.keep)
