"""Crash-safe checkpoints of a training run (orbax `CheckpointManager`) that prove they are intact.

    workdir/checkpoints/<step>/{state, history, run, digests}   the last `keep` checkpoints
    workdir/best/<step>/{state, digests}                        the model selected on validation

Each checkpoint holds everything a resumed run needs in one orbax step directory: the
`TrainState`, the per-step history arrays and the run state (epoch, batch, best score,
plateau state, evaluations, and the fingerprint of the run's config) as a JSON item. orbax
writes a step to a temporary directory and renames it when complete, so a run killed at any
moment leaves the earlier checkpoints intact; `restore` takes the newest checkpoint that
restores and validates (expected structure, finite values) and says which it skipped and why,
in one line each.

Bad files: each step also holds `digests`, a JSON item written in the same commit: the
SHA-256 of every array (its dtype, shape and bytes) and JSON item. A restored step is checked
against it, so flipped bytes that would otherwise decode into different numbers are caught
("its digest does not match what was written") and the step skipped; a step without digests
(written before they existed) restores, said once as unverified. Full disks: a failed write
raises one `io.OutputWriteError` (path, cause, free space), removes the step's temporary
directory and leaves the earlier checkpoints as they were. orbax's own reports of a failure
that is raised here instead (absl error logs, the "Event loop is closed" callbacks tensorstore
makes into the event loop orbax closed after the failure) are not printed.

The pieces under `RunCheckpoints` serve any loop (MT10's keeps its agent and replay buffer
with them): `step_manager` opens a directory of numbered steps, `save_step` writes one step
of named pytrees, arrays and JSON items, `restore_step` reads it back, checking each pytree
against a template (`check_arrays`) and every item against the step's digests. A pytree is
stored as its leaves named by position (`tree_arrays`), its PRNG keys as their raw key data
(`keys_as_data`, `keys_from_data`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ntkmtl_jax import io
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


def _check_structure(tree: dict, template: dict):
  if sorted(tree) != sorted(template):
    raise ValueError(f"{len(tree)} arrays where the run has {len(template)}")
  for name in sorted(template):
    got, want = np.asarray(tree[name]), template[name]
    if got.shape != want.shape or got.dtype != want.dtype:
      raise ValueError(
        f"array {name} is {got.dtype}{list(got.shape)}, the run's is {want.dtype}{list(want.shape)}"
      )


def _check_finite(tree: dict):
  for name in sorted(tree):
    got = np.asarray(tree[name])
    if np.issubdtype(got.dtype, np.floating) and not np.all(np.isfinite(got)):
      raise ValueError(f"array {name} has non-finite values")


def check_arrays(tree: dict, template: dict):
  """Raises ValueError unless `tree` has `template`'s leaves (names, shapes, dtypes), finite."""
  _check_structure(tree, template)
  _check_finite(tree)


class DamagedCheckpointError(ValueError):
  """A checkpoint cannot be read, or what it reads back is not what was written (its
  digests do not match)."""


DIGESTS = "digests"  # the JSON item of a step that holds the digests of its other items


def _array_digest(x) -> str:
  x = np.asarray(x)
  digest = hashlib.sha256(f"{x.dtype.name}{list(x.shape)}".encode())
  digest.update(x.tobytes())
  return digest.hexdigest()


def _json_digest(value) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True, allow_nan=True).encode()).hexdigest()


def _digests(items: dict[str, dict]) -> dict[str, str]:
  """{"item/array": SHA-256 of its dtype, shape and bytes} of named dicts of arrays; large
  ones are hashed on several threads (hashlib releases the GIL)."""
  named = [(f"{item}/{k}", v) for item, values in items.items() for k, v in values.items()]
  values = [v for _, v in named]
  if len(values) > 1 and sum(np.asarray(v).nbytes for v in values) > 1 << 24:
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
      digests = list(pool.map(_array_digest, values))
  else:
    digests = [_array_digest(v) for v in values]
  return {name: d for (name, _), d in zip(named, digests, strict=True)}


def _verify(record, arrays: dict[str, dict], json_items: dict[str, Any]):
  """Raises DamagedCheckpointError unless `arrays` ({item: {name: array}}) and `json_items`
  have the digests `record` (a step's digests item) holds for them."""
  recorded = record.get("items") if isinstance(record, dict) else None
  if not isinstance(recorded, dict):
    raise DamagedCheckpointError("its digests cannot be read")
  actual = _digests(arrays) | {item: _json_digest(value) for item, value in json_items.items()}
  expected = {k: v for k, v in recorded.items() if k in json_items or k.split("/", 1)[0] in arrays}
  wrong = sorted(k for k in set(actual) | set(expected) if actual.get(k) != expected.get(k))
  if wrong:
    raise DamagedCheckpointError(
      f"its digest does not match what was written ({len(wrong)} of {len(expected)} "
      f"arrays and items differ, e.g. {wrong[0]})"
    )


def _closed_loop_callback(unraisable) -> bool:
  """Whether an unraisable exception is tensorstore calling back into an asyncio event loop
  that orbax has closed: orbax runs each batch of reads or writes in an event loop of its own
  and closes it as soon as one of them fails, while the others are still in flight; each of
  those then reports `RuntimeError: Event loop is closed` from `call_soon_threadsafe`."""
  error = unraisable.exc_value
  if type(error) is not RuntimeError or str(error) != "Event loop is closed":
    return False
  return any(
    f.name == "call_soon_threadsafe" for f in traceback.extract_tb(unraisable.exc_traceback)
  )


_ORPHANS = (
  "Task exception was never retrieved",
  "Future exception was never retrieved",
  "Task was destroyed but it is pending",
)


class _OrphanedOrbaxWork(logging.Filter):
  """Drops the asyncio log records of orbax's work left behind in such a closed event loop
  ("Task exception was never retrieved" and the like, naming orbax or tensorstore), logged
  whenever the task or future is garbage collected (at the latest when Python exits)."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not (message.startswith(_ORPHANS) and ("orbax" in message or "tensorstore" in message))


_HOOK_LOCK = threading.Lock()
_ASYNCIO_FILTER = _OrphanedOrbaxWork()


def _drop_closed_loop_reports():
  """Installs (once) a `sys.unraisablehook` that drops the reports `_closed_loop_callback`
  recognises and passes every other one to the hook that was there, and `_OrphanedOrbaxWork`
  on the asyncio logger. Both stay installed: what they drop arrives whenever it arrives, also
  long after the failed read or write was reported."""
  with _HOOK_LOCK:
    logging.getLogger("asyncio").addFilter(_ASYNCIO_FILTER)  # no-op when already there
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_callbacks", False):
      return

    def hook(unraisable):
      if not _closed_loop_callback(unraisable):
        previous(unraisable)

    hook.drops_closed_loop_callbacks = True
    sys.unraisablehook = hook


class _OrbaxReports(logging.Filter):
  """While entered, holds back the warnings and errors orbax logs (through absl's logger): on a
  clean exit they are logged as they came; after `drop()` (the failure they report is raised
  in one line instead) they are not. Also installs `_drop_closed_loop_reports`."""

  def __init__(self):
    super().__init__()
    self.held, self.dropped, self._lock = [], False, threading.Lock()
    self._logger = logging.getLogger("absl")

  def filter(self, record):
    if record.levelno >= logging.WARNING and f"{os.sep}orbax{os.sep}" in record.pathname:
      with self._lock:
        self.held.append(record)
      return False
    return True

  def drop(self):
    self.dropped = True

  def __enter__(self):
    _drop_closed_loop_reports()
    self._logger.addFilter(self)
    return self

  def __exit__(self, *exc_info):
    self._logger.removeFilter(self)
    if not self.dropped:
      for record in self.held:
        self._logger.handle(record)


_SPEC = re.compile(r"\s*\[(tensorstore_spec|source locations)=.*$")


def short_error(error: BaseException) -> str:
  """The first line of `error`'s message without tensorstore's spec, at most about 300
  characters: a longer one keeps its beginning (what failed) and its end (why)."""
  text = str(error).splitlines()[0] if str(error).strip() else type(error).__name__
  text = _SPEC.sub("", text)
  return text if len(text) <= 300 else f"{text[:120]} ... {text[-175:]}"


def _chain(error: BaseException) -> list[BaseException]:
  """`error` and every exception it was raised from or during (or groups), once each."""
  out, todo, seen = [], [error], set()
  while todo:
    e = todo.pop(0)
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    out.append(e)
    todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
  return out


_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'|OS error (\d+)|\[Errno (\d+)\]")
_WRITE_STATUS = re.compile(
  r"^(RESOURCE_EXHAUSTED|PERMISSION_DENIED|UNAVAILABLE|DATA_LOSS|INTERNAL|UNKNOWN): .*"
  r"(writ|creat|renam|delet)",
  re.IGNORECASE,
)


def _write_failure(error: BaseException) -> tuple[BaseException, int | None] | None:
  """(the cause, its error number if known) when `error`, or one it chains, is a failed file
  write: an OSError, or tensorstore's status for one (e.g. `RESOURCE_EXHAUSTED: Error writing
  ... No space left on device [os_error_code='28']`, raised as a ValueError); else None."""
  chain = _chain(error)
  for e in chain:
    if isinstance(e, OSError):
      return e, e.errno
  for e in chain:
    code = _OS_ERROR_CODE.search(str(e))
    if code:
      return RuntimeError(short_error(e)), int(next(g for g in code.groups() if g))
    if _WRITE_STATUS.search(str(e)):
      return RuntimeError(short_error(e)), None
  return None


def _orbax():
  return require("orbax.checkpoint", "data", "checkpoints")


def step_path(manager, step: int) -> str:
  """The directory of checkpoint `step` of a `step_manager`."""
  return os.path.join(str(manager.directory), str(step))


def step_manager(directory: str, keep: int):
  """An orbax `CheckpointManager` of numbered steps in `directory` (made if missing) that
  keeps the newest `keep`.

  Raises:
    OutputWriteError: `directory` cannot be made.
  """
  ocp = _orbax()
  directory = os.path.abspath(directory)
  try:
    return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    )
  except OSError as error:
    raise io.write_error(directory, error, what="checkpoints to") from None


def _disk_usage(manager) -> int:
  """The bytes on disk of the newest checkpoint of `manager` (0 without one): about what the
  next one takes, orbax's metadata and the file system's blocks included."""
  try:
    steps = manager.all_steps()
  except Exception:  # a manager whose save just failed: the size is only for the message
    steps = []
  total = 0
  for root, _, files in os.walk(step_path(manager, max(steps))) if steps else ():
    for name in files:
      with contextlib.suppress(OSError):
        stat = os.lstat(os.path.join(root, name))
        total += max(stat.st_size, getattr(stat, "st_blocks", 0) * 512)
  return total


def _join_orbax_threads(before: set, timeout: float = 60.0):
  """Waits (up to `timeout` seconds) for the threads orbax started since `before` (a set of
  threads) to end: after a failed save, its other writes go on in them for a moment."""
  deadline = time.monotonic() + timeout
  for thread in set(threading.enumerate()) - before:
    if type(thread).__module__.startswith("orbax.") and thread is not threading.current_thread():
      with contextlib.suppress(Exception):  # orbax's join re-raises the thread's error
        thread.join(max(0.0, deadline - time.monotonic()))


def _discard_unfinished(manager, step: int, before: set) -> str:
  """Removes what a failed save of `step` left (orbax's temporary directory, once the threads
  still writing into it have ended) and refreshes the manager's list of steps; returns a note
  when the temporary directory stays."""
  _join_orbax_threads(before)
  pattern = glob.escape(step_path(manager, step)) + ".orbax-checkpoint-tmp*"
  left = []
  for tmp in glob.glob(pattern):
    shutil.rmtree(tmp, ignore_errors=True)  # checked just below
    if os.path.lexists(tmp):
      left.append(tmp)
  with contextlib.suppress(Exception):
    manager.reload()
  return f"; delete {', '.join(left)} yourself" if left else ""


def save_step(
  manager,
  step: int,
  *,
  trees: dict[str, PyTree] | None = None,
  arrays: dict[str, dict] | None = None,
  json_items: dict[str, Any] | None = None,
):
  """Writes checkpoint `step` of `manager` (replacing one of that step) with the digests of
  everything in it, and waits until orbax has committed it: the step directory appears
  complete or not at all.

  Args:
    manager: a `step_manager`.
    step: the step number.
    trees: named pytrees, stored by `tree_arrays` (restored against a template).
    arrays: named dicts of arrays, stored as they are but for the empty arrays, left out.
    json_items: named JSON-serialisable items (not named "digests").

  Raises:
    OutputWriteError: a file of the checkpoint could not be written (a full disk: the message
      says how much is free and how much was to be written). The step's temporary directory is
      removed, and the earlier checkpoints are as they were.
  """
  ocp = _orbax()
  stored = {name: tree_arrays(tree) for name, tree in (trees or {}).items()}
  for name, values in (arrays or {}).items():
    stored[name] = {k: np.asarray(v) for k, v in values.items() if np.asarray(v).size}
  jsons = {name: json.loads(json.dumps(value)) for name, value in (json_items or {}).items()}
  if DIGESTS in stored or DIGESTS in jsons:
    raise ValueError(f"{DIGESTS!r} is the name of the checkpoint's digests; choose another")
  record = dict(
    algorithm="sha256 of each array's dtype, shape and bytes; of each JSON item's sorted dump",
    items=_digests(stored) | {name: _json_digest(value) for name, value in jsons.items()},
  )
  items = {name: ocp.args.StandardSave(values) for name, values in stored.items()}
  items.update({name: ocp.args.JsonSave(value) for name, value in jsons.items()})
  items[DIGESTS] = ocp.args.JsonSave(record)
  size = sum(v.nbytes for values in stored.values() for v in values.values())
  size += sum(len(json.dumps(value)) for value in [*jsons.values(), record])
  threads = set(threading.enumerate())
  with _OrbaxReports() as reports:
    try:
      if step in manager.all_steps():  # e.g. a stopped run scored again where it stopped
        manager.delete(step)
      manager.save(step, args=ocp.args.Composite(**items))
      manager.wait_until_finished()  # a write that failed in the background raises here
    except Exception as error:
      failure = _write_failure(error)
      if failure is None:
        raise
      reports.drop()
      cause, code = failure
      written = io.write_error(  # the free space before the partial step is removed
        step_path(manager, step),
        cause,
        what=f"the checkpoint of step {step} to",
        size=max(size, _disk_usage(manager)),
        code=code,
      )
      left = _discard_unfinished(manager, step, threads)
      raise io.OutputWriteError(
        f"{written}; the earlier checkpoints are as they were{left}", written.filename, code
      ) from None


_UNVERIFIED_SAID: set[tuple[str, int]] = set()


def restore_step(
  manager,
  step: int,
  *,
  trees: dict[str, PyTree] | None = None,
  arrays: tuple[str, ...] = (),
  json_items: tuple[str, ...] = (),
  say: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Reads the named items of checkpoint `step` of `manager` (see `save_step`) and checks them
  against the digests written with them.

  Args:
    manager: a `step_manager`.
    step: the step to read.
    trees: {name: template}: each tree is checked against its template (structure, shapes,
      dtypes, finite values) and returned in the template's structure, PRNG keys rewrapped.
    arrays: names of dicts of arrays, returned as saved (NumPy).
    json_items: names of JSON items.
    say: prints, once a process, that a step without digests (written before they existed)
      was restored unverified.

  Returns:
    {name: value} for every item asked for.

  Raises:
    DamagedCheckpointError: an item cannot be read (missing, or damaged so that it does not
      decode), or what it reads back does not match its digest.
    ValueError: a tree does not match its template.
  """
  ocp = _orbax()
  expected = {name: tree_arrays(template) for name, template in (trees or {}).items()}
  items = {
    name: ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, tree))
    for name, tree in expected.items()
  }
  items.update({name: ocp.args.StandardRestore() for name in arrays})
  items.update({name: ocp.args.JsonRestore() for name in json_items})
  digested = os.path.isdir(os.path.join(step_path(manager, step), DIGESTS))
  if digested:
    items[DIGESTS] = ocp.args.JsonRestore()
  with _OrbaxReports() as reports:
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as error:
      reports.drop()
      raise DamagedCheckpointError(f"it cannot be read ({short_error(error)})") from None
  got = {name: {k: np.asarray(v) for k, v in dict(restored[name]).items()} for name in expected}
  got.update({name: {k: np.asarray(v) for k, v in dict(restored[name]).items()} for name in arrays})
  for name in expected:
    _check_structure(got[name], expected[name])
  if digested:
    _verify(restored[DIGESTS], got, {name: restored[name] for name in json_items})
  elif (str(manager.directory), step) not in _UNVERIFIED_SAID:
    _UNVERIFIED_SAID.add((str(manager.directory), step))
    say(
      f"The checkpoint of step {step} in {manager.directory} has no digests (an earlier "
      "version wrote it): restored it unverified."
    )
  for name in expected:
    _check_finite(got[name])
  out = {
    name: tree_from_arrays(template, dict(restored[name]))
    for name, template in (trees or {}).items()
  }
  out.update({name: got[name] for name in arrays})
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
    """Saves `state`, the run state (JSON) and the history arrays as one checkpoint.

    Raises:
      OutputWriteError: it could not be written (see `save_step`).
    """
    save_step(
      self.latest,
      int(state.step),
      trees=dict(state=state),
      arrays=dict(history=history),
      json_items=dict(run=run),
    )

  def save_best(self, state):
    """Saves `state` as the selected model (raises OutputWriteError as `save` does)."""
    save_step(self.best, int(state.step), trees=dict(state=state))

  def restore(self, template, say=print) -> tuple[Any, dict, dict] | None:
    """The newest checkpoint that restores and validates: (state, run state, history).

    Args:
      template: a `TrainState` of the run (structure, shapes and dtypes to expect).
      say: prints which checkpoints were skipped and why, one line each (e.g. "Skipped the
        checkpoint of step 5 in DIR: its digest does not match what was written (...)"), and
        that one without digests was restored unverified.

    Returns:
      The checkpoint's (state, run state, history arrays), or None when none is usable.
    """
    for step in self.steps():
      try:
        restored = restore_step(
          self.latest,
          step,
          trees=dict(state=template),
          arrays=("history",),
          json_items=("run",),
          say=say,
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
        where = f"step {step} in {self.latest.directory}"
        say(f"Skipped the checkpoint of {where}: {short_error(error)}")
    return None

  def restore_best(self, template, say=print):
    """The selected model's `TrainState`.

    Raises:
      FileNotFoundError: there is none.
      DamagedCheckpointError: it cannot be read or does not match its digests; names its path.
    """
    step = self.best.latest_step()
    if step is None:
      raise FileNotFoundError(
        f"No best model in {self.workdir}: the run never scored its validation split."
      )
    try:
      return restore_step(self.best, step, trees=dict(state=template), say=say)["state"]
    except DamagedCheckpointError as error:
      raise DamagedCheckpointError(
        f"The best model's checkpoint {step_path(self.best, step)} is damaged: {error}. Restore "
        "the run's newest checkpoint instead, or train the run again in another directory."
      ) from None

  def clear(self):
    """Deletes every checkpoint of the run: `workdir/checkpoints` and `workdir/best`.

    Where either is a symlink, the link itself is removed, never the directory it points to
    nor anything in it (the run's new checkpoints then go into a new directory of that name in
    `workdir`); links inside them are removed, not followed.

    Raises:
      OutputWriteError: something could not be removed (a checkpoint left behind would be
        resumed later as if it were this run's); names the path and the cause.
    """
    for manager in (self.latest, self.best):
      manager.close()
    for sub in ("checkpoints", "best"):
      path = os.path.join(self.workdir, sub)
      try:
        if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
          os.unlink(path)
        elif os.path.lexists(path):
          shutil.rmtree(path)
      except OSError as error:
        where = f" ({error.filename})" if error.filename and error.filename != path else ""
        raise io.OutputWriteError(
          f"Could not delete the checkpoints in {path}: {io.describe_cause(error)}{where}; "
          "delete that directory yourself, or choose another one.",
          path,
          error.errno,
        ) from None
    self.__init__(self.workdir, self.keep)
