"""Crash-safe checkpoints: a run killed (SIGKILL, also inside a checkpoint write) or
interrupted (SIGINT) at fixed moments and resumed ends with the parameters and history of an
uninterrupted run, bit for bit; a damaged newest checkpoint (missing files, flipped bytes that
decode into other numbers or do not decode) is skipped in one line and the one before restores
bit for bit; one written before digests existed restores, said once; a full disk is one
OutputWriteError that leaves the checkpoints before it as they were; clear() removes a
symlinked checkpoints directory's link, not its target, and says when it cannot delete;
another run's workdir, or a finished run, is not overwritten."""

from __future__ import annotations

import errno
import glob
import os
import re
import shutil
import signal
from typing import Any

import jax
import numpy as np
import pytest

from ntkmtl_jax import benchmarks, io, loop
from ntkmtl_jax.checkpoints import DamagedCheckpointError, RunCheckpoints, RunMismatchError

from conftest import run_python
from test_io import fill_disk, mounted_tmpfs

# 64 examples in batches of 16: 4 steps an epoch; 11 steps stop in the third epoch.
# Checkpoints at steps 3, 4 (epoch end), 6, 8 (epoch end), 9 and 11 (the stop).
RUN = """
import os, signal, sys
import jax, numpy as np
from ntkmtl_jax import benchmarks, loop
workdir, kill_at, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
how = sys.argv[4] if len(sys.argv) > 4 else "KILL"
seen = []  # the last step taken, for KILL_IN_WRITE
bench = benchmarks.get_benchmark("sines", num_train=64, num_test=32, hidden=(8,))
config = bench.config.replace(method="ntkmtl", batch_size=16, max_steps=11, checkpoint_every=3,
                              probe_every=0)

if how == "KILL_IN_WRITE":  # SIGKILL inside the first checkpoint write after step kill_at,
  import shutil             # once its files are written and before orbax commits them
  def dying(real):
    def call(*args, **kwargs):
      if seen and seen[0] >= kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
      return real(*args, **kwargs)
    return call
  os.rename, os.replace, shutil.move = dying(os.rename), dying(os.replace), dying(shutil.move)

def kill(t, state, metrics):
  seen[:] = [t]
  if t == kill_at and how in ("KILL", "INT"):
    os.kill(os.getpid(), getattr(signal, "SIG" + how))

result = loop.fit(bench, config, workdir or None, progress=False, callback=kill)
if result.interrupted:
  sys.exit(130)
np.savez(out, losses=result.history.losses, *jax.tree.leaves(result.params))
"""


def _tiny(hidden=(8,)):
  bench = benchmarks.get_benchmark("sines", num_train=64, num_test=32, hidden=hidden)
  return bench, bench.config.replace(
    method="ls", batch_size=16, max_steps=6, checkpoint_every=3, probe_every=0
  )


def _runner(tmp_path):
  """Writes RUN to tmp_path and runs it uninterrupted into tmp_path / "whole.npz"; returns
  run(workdir, kill_at, out, how="KILL"), which runs it again in a fresh interpreter."""
  script = tmp_path / "run.py"
  script.write_text(RUN)

  def run(workdir, kill_at, out, how="KILL"):
    return run_python([str(script), workdir, str(kill_at), str(out), how], timeout=300)

  whole = run("", 0, tmp_path / "whole.npz")
  assert whole.returncode == 0, whole.stderr
  return run


def test_killed_and_resumed_run_matches_an_uninterrupted_one(tmp_path):
  run = _runner(tmp_path)
  workdir = str(tmp_path / "run")
  # Killed after step 1 (no checkpoint yet), 5 (between checkpoints), 8 (before the epoch
  # end's checkpoint) and 10; each start resumes from the newest checkpoint.
  for kill_at in (1, 5, 8, 10):
    killed = run(workdir, kill_at, tmp_path / "unused.npz")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
  last = run(workdir, 0, tmp_path / "resumed.npz")
  assert last.returncode == 0, last.stderr
  assert "Resuming sines/ntkmtl at epoch 2, batch 1 (step 9)" in last.stdout
  with np.load(tmp_path / "whole.npz") as a, np.load(tmp_path / "resumed.npz") as b:
    assert sorted(a.files) == sorted(b.files)
    for name in a.files:
      np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_interrupted_or_killed_while_writing_and_resumed_matches_too(tmp_path):
  """SIGINT stops at the step boundary, checkpoints there and exits 130; a SIGKILL inside a
  checkpoint write leaves the earlier checkpoints usable. Resumed, both end bit for bit where
  an uninterrupted run ends."""
  run = _runner(tmp_path)
  workdir = str(tmp_path / "run")
  interrupted = run(workdir, 5, tmp_path / "unused.npz", "INT")
  assert interrupted.returncode == 130, interrupted.stderr
  assert "Interrupted at step 5: saved a checkpoint" in interrupted.stdout
  killed = run(workdir, 7, tmp_path / "unused.npz", "KILL_IN_WRITE")  # in step 8's save
  assert killed.returncode == -signal.SIGKILL, killed.stderr
  last = run(workdir, 0, tmp_path / "resumed.npz")
  assert last.returncode == 0, last.stderr
  assert "Resuming sines/ntkmtl at epoch 1, batch 2 (step 6)" in last.stdout, last.stdout
  with np.load(tmp_path / "whole.npz") as a, np.load(tmp_path / "resumed.npz") as b:
    for name in a.files:
      np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_a_damaged_newest_checkpoint_is_skipped_with_its_reason(tmp_path, capsys):
  bench, config = _tiny()
  workdir = str(tmp_path / "run")
  first = loop.fit(bench, config.replace(max_steps=5), workdir, progress=False)
  steps = RunCheckpoints(workdir).steps()
  assert steps[:2] == [5, 4]
  shutil.rmtree(os.path.join(workdir, "checkpoints", "5", "state"))
  resumed = loop.fit(bench, config, workdir, progress=False)
  printed = capsys.readouterr().out
  assert "Skipped the checkpoint of step 5" in printed
  assert "Resuming sines/ls at epoch 1, batch 0 (step 4)" in printed
  whole = loop.fit(bench, config, None, progress=False)
  assert resumed.steps == whole.steps == 6
  np.testing.assert_array_equal(resumed.history.losses, whole.history.losses)
  jax.tree.map(np.testing.assert_array_equal, resumed.params, whole.params)
  np.testing.assert_array_equal(first.history.losses, whole.history.losses[:5])


def test_another_run_or_a_finished_one_is_not_overwritten(tmp_path):
  bench, config = _tiny()
  finished = str(tmp_path / "finished")
  loop.fit(bench, config.replace(max_steps=3), finished, progress=False)
  with pytest.raises(RunMismatchError, match=r"another run \(different seed 0 -> 1\).*--overwrite"):
    loop.fit(bench, config.replace(seed=1), finished, progress=False)
  with pytest.raises(RunMismatchError, match="--resume"):
    loop.fit(bench, config, finished, progress=False, resume=False)
  with pytest.raises(RunMismatchError, match="finished run; refusing to overwrite"):
    loop.fit(bench, config, finished, progress=False, overwrite=True)

  def interrupt(t, state, metrics):
    if t == 4:
      raise KeyboardInterrupt

  unfinished = str(tmp_path / "unfinished")
  stopped = loop.fit(bench, config, unfinished, progress=False, callback=interrupt)
  assert stopped.interrupted and RunCheckpoints(unfinished).steps() == [3]
  other = loop.fit(bench, config.replace(seed=1), unfinished, progress=False, overwrite=True)
  fresh = loop.fit(bench, config.replace(seed=1), None, progress=False)
  assert other.steps == 6 and not other.interrupted
  np.testing.assert_array_equal(other.history.losses, fresh.history.losses)


def test_step_checkpoints_keep_keys_arrays_and_json(tmp_path):
  """save_step / restore_step: PRNG keys of any implementation anywhere in a pytree come back
  as such, arrays as saved (empty ones left out), JSON as saved; a tree that does not match its
  template is refused; a manager keeping one step drops the one before."""
  pytest.importorskip("orbax.checkpoint")
  from ntkmtl_jax import checkpoints

  tree = dict(
    a=np.arange(3.0, dtype=np.float32),
    nested=(jax.random.key(1), dict(k=jax.random.key(2, impl="rbg"))),
    step=np.int32(7),
  )
  arrays = checkpoints.tree_arrays(tree)
  assert sorted(arrays) == ["00000", "00001", "00002", "00003"]
  assert all(isinstance(v, np.ndarray) for v in arrays.values())
  again = checkpoints.tree_from_arrays(tree, arrays)
  for got, want in zip(jax.tree.leaves(again), jax.tree.leaves(tree), strict=True):
    if jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
      assert jax.random.key_impl(got) == jax.random.key_impl(want)
      got, want = jax.random.key_data(got), jax.random.key_data(want)
    np.testing.assert_array_equal(got, want)

  manager = checkpoints.step_manager(str(tmp_path / "steps"), keep=1)
  for step in (3, 5):
    checkpoints.save_step(
      manager,
      step,
      trees=dict(tree=tree),
      arrays=dict(history=dict(loss=np.ones(step), empty=np.zeros(0))),
      json_items=dict(meta=dict(step=step, big=2**100)),
    )
  assert manager.all_steps() == [5] and manager.latest_step() == 5
  restored = checkpoints.restore_step(
    manager, 5, trees=dict(tree=tree), arrays=("history",), json_items=("meta",)
  )
  assert restored["meta"] == dict(step=5, big=2**100)
  assert sorted(restored["history"]) == ["loss"]
  np.testing.assert_array_equal(restored["history"]["loss"], np.ones(5))
  key = restored["tree"]["nested"][1]["k"]
  assert jax.random.key_impl(key) == jax.random.key_impl(tree["nested"][1]["k"])
  np.testing.assert_array_equal(
    jax.random.key_data(key), jax.random.key_data(tree["nested"][1]["k"])
  )
  with pytest.raises(ValueError, match=r"array 00000 is float32\[3\], the run's is float32\[4\]"):
    checkpoints.restore_step(manager, 5, trees=dict(tree=dict(tree, a=np.zeros(4, np.float32))))
  manager.close()


def _template(bench, config):
  return loop.initial_state(bench, config, loop.build_step(bench, config)[0])


def _leaves(state) -> list[np.ndarray]:
  from ntkmtl_jax import checkpoints

  return [np.asarray(x) for x in jax.tree.leaves(checkpoints.keys_as_data(state))]


def _assert_same(a, b):
  left, right = _leaves(a), _leaves(b)
  assert len(left) == len(right)
  for x, y in zip(left, right, strict=True):
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()  # bit for bit (NaN payloads and signed zeros included)


def _flip(step_dir: str, how: str):
  """Damages the arrays of checkpoint `step_dir` in place: "values" flips 64 bytes in the middle
  of its largest data file (array data: it still decodes, into other numbers), "headers" the
  first 16 bytes of every data file (they no longer decode)."""
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  assert files
  for path in [max(files, key=os.path.getsize)] if how == "values" else files:
    data = bytearray(open(path, "rb").read())
    start, count = (len(data) // 2, 64) if how == "values" else (0, 16)
    for i in range(start, min(start + count, len(data))):
      data[i] ^= 0xFF
    with open(path, "wb") as f:
      f.write(bytes(data))


# Restores a workdir's newest usable checkpoint in a fresh interpreter and saves its leaves.
RESTORE = """
import sys
import jax, numpy as np
from ntkmtl_jax import benchmarks, checkpoints, loop
workdir, out = sys.argv[1], sys.argv[2]
bench = benchmarks.get_benchmark("sines", num_train=64, num_test=32, hidden=(64, 64))
config = bench.config.replace(method="ls", batch_size=16, max_steps=6, checkpoint_every=3,
                              probe_every=0)
state = loop.restore_checkpoint(bench, config, workdir, "latest")
np.savez(out, *[np.asarray(x) for x in jax.tree.leaves(checkpoints.keys_as_data(state))])
"""


@pytest.mark.parametrize(
  "how, reason",
  [("values", "its digest does not match what was written ("), ("headers", "it cannot be read (")],
  ids=["values", "headers"],
)
def test_flipped_bytes_in_the_newest_checkpoint_are_one_line_and_the_one_before_restores(
  tmp_path, capsys, how, reason
):
  """64 flipped bytes of array data decode into other numbers: only the digest sees them.
  Flipped headers do not decode: orbax fails, and its event loop's leftovers (once ~113 lines of
  "RuntimeError: Event loop is closed") are not printed. Either way, one line, and the
  checkpoint before restores bit for bit (here in a fresh interpreter, whose whole output is
  checked) and the run resumes from it."""
  from ntkmtl_jax import checkpoints

  bench, config = _tiny(hidden=(64, 64))  # arrays of 16 KiB: stored as data, not inline
  workdir = str(tmp_path / "run")
  loop.fit(bench, config.replace(max_steps=5), workdir, progress=False)
  saved = RunCheckpoints(workdir)
  assert saved.steps()[:2] == [5, 4]
  template = _template(bench, config)
  step4 = checkpoints.restore_step(saved.latest, 4, trees=dict(state=template))["state"]
  _flip(os.path.join(workdir, "checkpoints", "5"), how)

  script = tmp_path / "restore.py"
  script.write_text(RESTORE)
  done = run_python([str(script), workdir, str(tmp_path / "restored.npz")], timeout=300)
  assert done.returncode == 0, done.stderr
  printed = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
  about = [line for line in printed if "checkpoint" in line]
  assert len(about) == 1, printed
  assert about[0].startswith(
    f"Skipped the checkpoint of step 5 in {workdir}/checkpoints: {reason}"
  ), about[0]
  assert "Event loop is closed" not in done.stderr and "Traceback" not in done.stderr, printed
  assert "exception was never retrieved" not in done.stderr, printed
  with np.load(tmp_path / "restored.npz") as restored:
    got = [restored[f"arr_{i}"] for i in range(len(restored.files))]
  want = _leaves(step4)
  assert len(got) == len(want)
  for x, y in zip(got, want, strict=True):
    assert x.dtype == y.dtype and x.tobytes() == y.tobytes()

  capsys.readouterr()
  resumed = loop.fit(bench, config, workdir, progress=False)
  printed = capsys.readouterr().out
  assert printed.count("Skipped the checkpoint of step 5") == 1, printed
  assert "Resuming sines/ls at epoch 1, batch 0 (step 4)" in printed
  whole = loop.fit(bench, config, None, progress=False)
  np.testing.assert_array_equal(resumed.history.losses, whole.history.losses)
  jax.tree.map(np.testing.assert_array_equal, resumed.params, whole.params)
  print(about[0])


def test_a_checkpoint_without_digests_restores_and_is_said_unverified_once(tmp_path):
  """A step written before digests existed (no `digests` item) restores as it is."""
  bench, config = _tiny()
  workdir = str(tmp_path / "run")
  loop.fit(bench, config.replace(max_steps=5), workdir, progress=False)
  template = _template(bench, config)
  with_digests = RunCheckpoints(workdir).restore(template, say=pytest.fail)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "5", "digests"))
  said = []
  state, run, history = RunCheckpoints(workdir).restore(template, say=said.append)
  assert said == [
    f"The checkpoint of step 5 in {workdir}/checkpoints has no digests (an earlier version "
    "wrote it): restored it unverified."
  ]
  assert int(state.step) == 5 and run == with_digests[1]
  _assert_same(state, with_digests[0])
  RunCheckpoints(workdir).restore(template, say=said.append)
  assert len(said) == 1


def test_a_damaged_best_model_is_an_error_naming_its_path(tmp_path):
  bench, config = _tiny()
  workdir = str(tmp_path / "run")
  template = _template(bench, config)
  saved = RunCheckpoints(workdir)
  saved.save_best(template)
  _assert_same(saved.restore_best(template, say=pytest.fail), template)
  best = os.path.join(workdir, "best", "0")
  _flip(best, "headers")
  with pytest.raises(DamagedCheckpointError) as raised:
    RunCheckpoints(workdir).restore_best(template)
  message = str(raised.value)
  print(message)
  assert message.startswith(f"The best model's checkpoint {best} is damaged: it cannot be read (")
  assert "\n" not in message


def _save_on_a_full_disk(workdir: str, capfd, fill) -> tuple[io.OutputWriteError, Any]:
  """Runs 3 steps in `workdir`, calls `fill()` and saves step 4 there, which must fail: checks
  that it fails with one OutputWriteError naming step 4's directory and the full disk, printed
  nowhere else, and that step 3 is left as it was, with no temporary directory; returns the
  error and step 3's checkpoint as `RunCheckpoints.restore` gives it."""
  bench, config = _tiny()
  loop.fit(bench, config.replace(max_steps=3), workdir, progress=False)
  template = _template(bench, config)
  saved = RunCheckpoints(workdir)
  state, run, history = restored = saved.restore(template, say=pytest.fail)
  fill()
  capfd.readouterr()
  with pytest.raises(io.OutputWriteError) as raised:
    saved.save(state._replace(step=state.step + 1), run, history)
  err = capfd.readouterr().err
  error, message = raised.value, str(raised.value)
  step_dir = os.path.join(workdir, "checkpoints", "4")
  assert isinstance(error, OSError) and error.errno == errno.ENOSPC
  assert error.filename == step_dir
  assert re.fullmatch(
    f"Could not write the checkpoint of step 4 to {re.escape(step_dir)}: no space left on "
    r"device \([\d.]+ [KMG]?i?B free there now, [\d.]+ KiB to write\); the earlier checkpoints "
    "are as they were",
    message,
  ), message
  assert "Traceback" not in err and "absl" not in err, err
  assert glob.glob(os.path.join(workdir, "**", "*orbax-checkpoint-tmp*"), recursive=True) == []
  again = RunCheckpoints(workdir)
  assert again.steps() == [3]
  _assert_same(again.restore(template, say=pytest.fail)[0], state)
  print(message)
  return error, restored


def test_a_full_disk_while_saving_is_one_error_and_the_checkpoint_before_stays(
  tmp_path, monkeypatch, capfd
):
  """orbax writes in the background: the failure surfaces in save() as one OutputWriteError
  (path, cause, free space); the partial step's temporary directory is removed; the checkpoint
  before restores bit for bit; orbax's own error logs are not printed."""
  from orbax.checkpoint._src.path import async_path

  async def full(path, text):  # where orbax writes each item's metadata
    raise OSError(errno.ENOSPC, "No space left on device")

  workdir = str(tmp_path / "run")
  _save_on_a_full_disk(workdir, capfd, lambda: monkeypatch.setattr(async_path, "write_text", full))
  monkeypatch.undo()
  saved = RunCheckpoints(workdir)
  state, run, history = saved.restore(_template(*_tiny()), say=pytest.fail)
  saved.save(state._replace(step=state.step + 1), run, history)  # space again: it saves
  assert saved.steps() == [4, 3]


def test_a_really_full_disk_while_saving_is_one_error_too(tmp_path, capfd):
  with mounted_tmpfs(tmp_path / "small", "4m") as small:
    error, _ = _save_on_a_full_disk(os.path.join(small, "run"), capfd, lambda: fill_disk(small))
    assert "(0 B free there now" in str(error)


def test_clear_removes_a_symlinked_checkpoints_directory_not_its_target(tmp_path):
  bench, config = _tiny()
  scratch, workdir = tmp_path / "scratch", tmp_path / "run"
  scratch.mkdir()
  workdir.mkdir()
  (workdir / "checkpoints").symlink_to(scratch, target_is_directory=True)
  loop.fit(bench, config.replace(max_steps=3), str(workdir), progress=False)
  kept = {
    path: open(path, "rb").read()
    for path in glob.glob(f"{scratch}/**", recursive=True)
    if os.path.isfile(path)
  }
  assert os.path.isdir(scratch / "3") and kept
  saved = RunCheckpoints(str(workdir))
  saved.clear()
  assert not (workdir / "checkpoints").is_symlink() and os.listdir(workdir / "checkpoints") == []
  assert saved.steps() == [] and RunCheckpoints(str(workdir)).steps() == []  # nothing to resume
  assert {path: open(path, "rb").read() for path in kept} == kept  # the target is untouched


def test_clear_that_cannot_delete_raises_naming_the_path(tmp_path, monkeypatch):
  from ntkmtl_jax import checkpoints

  bench, config = _tiny()
  workdir = str(tmp_path / "run")
  loop.fit(bench, config.replace(max_steps=3), workdir, progress=False)
  where = os.path.join(workdir, "checkpoints")

  def refused(path, *args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied", os.path.join(path, "3", "state"))

  monkeypatch.setattr(checkpoints.shutil, "rmtree", refused)
  with pytest.raises(io.OutputWriteError) as raised:
    RunCheckpoints(workdir).clear()
  assert str(raised.value) == (
    f"Could not delete the checkpoints in {where}: permission denied ({where}/3/state); delete "
    "that directory yourself, or choose another one."
  )
  assert raised.value.filename == where and raised.value.errno == errno.EACCES
  monkeypatch.undo()
  assert RunCheckpoints(workdir).steps() == [3]
  if os.geteuid() != 0:  # root deletes in a read-only directory anyway
    os.chmod(where, 0o500)
    try:
      with pytest.raises(io.OutputWriteError, match=f"Could not delete the checkpoints in {where}"):
        RunCheckpoints(workdir).clear()
    finally:
      os.chmod(where, 0o700)


def test_digests_is_a_reserved_item_name(tmp_path):
  from ntkmtl_jax import checkpoints

  manager = checkpoints.step_manager(str(tmp_path / "steps"), keep=1)
  with pytest.raises(ValueError, match="'digests' is the name of the checkpoint's digests"):
    checkpoints.save_step(manager, 1, json_items=dict(digests=dict(a=1)))
  manager.close()
