"""Crash-safe checkpoints: a run killed (SIGKILL, also inside a checkpoint write) or
interrupted (SIGINT) at fixed moments and resumed ends with the parameters and history of an
uninterrupted run, bit for bit; a damaged newest checkpoint is skipped with a reason; another
run's workdir, or a finished run, is not overwritten."""

from __future__ import annotations

import os
import shutil
import signal

import jax
import numpy as np
import pytest

from ntkmtl_jax import benchmarks, loop
from ntkmtl_jax.checkpoints import RunCheckpoints, RunMismatchError

from conftest import run_python

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


def _tiny():
  bench = benchmarks.get_benchmark("sines", num_train=64, num_test=32, hidden=(8,))
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
