"""Runs under preemption and on shared disks: SIGTERM stops at a step boundary with a checkpoint
and exit 143 and the resumed run equals an uninterrupted one bit for bit; `ntkmtl compare` keeps
its finished runs and marks the rest; one process per workdir; a resume checks the whole
configuration; a finished run is never discarded; default output folders are unique; bad
settings are refused in one line; a run that skipped steps says so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn")  # the offline benchmarks' data

from ntkmtl_jax import benchmarks, interrupt, loop  # noqa: E402
from ntkmtl_jax.checkpoints import RunMismatchError  # noqa: E402
from ntkmtl_jax.cli import runs as cli_runs  # noqa: E402
from ntkmtl_jax.data import Split  # noqa: E402
from ntkmtl_jax.locking import WorkdirBusyError, workdir_lock  # noqa: E402

from conftest import run_python  # noqa: E402

# `ntkmtl ARGV` in a fresh interpreter; with SIGNAL_AT=k the process sends itself SIGTERM right
# after train step k of its RUN_INDEX-th run (0-based), as a scheduler would.
CLI = """
import os, signal, sys
from ntkmtl_jax import cli, loop
at, index = int(os.environ.get("SIGNAL_AT", "0")), int(os.environ.get("RUN_INDEX", "0"))
real_fit, calls = loop.fit, []
def fit(*args, **kwargs):
  calls.append(1)
  if at and len(calls) == index + 1:
    def callback(t, state, metrics):
      if t == at:
        os.kill(os.getpid(), signal.SIGTERM)
    kwargs["callback"] = callback
  return real_fit(*args, **kwargs)
loop.fit = fit
sys.exit(cli.main(sys.argv[1:]))
"""

SINES = ["--benchmark", "sines", "--option", "num_train=64", "--option", "num_test=32",
         "--batch-size", "16", "--steps", "11", "--no-plots",
         "--quiet"]  # fmt: skip


def _cli(tmp_path, argv, **env):
  script = tmp_path / "cli.py"
  script.write_text(CLI)
  return run_python([str(script), *argv], timeout=300, **{k: str(v) for k, v in env.items()})


def _run_record(out):
  with open(os.path.join(out, "results.json")) as f:
    return json.load(f)["runs"]


def test_sigterm_checkpoints_exits_143_and_resumes_bit_for_bit(tmp_path):
  whole = tmp_path / "whole"
  done = _cli(tmp_path, ["train", *SINES, "--method", "ntkmtl", "--workdir", str(whole)])
  assert done.returncode == 0, done.stderr
  out = tmp_path / "stopped"
  argv = ["train", *SINES, "--method", "ntkmtl", "--workdir", str(out)]
  stopped = _cli(tmp_path, argv, SIGNAL_AT=5)
  assert stopped.returncode == 143, stopped.stderr
  assert "Interrupted at step 5: saved a checkpoint" in stopped.stdout + stopped.stderr
  assert "(SIGTERM)" in stopped.stdout + stopped.stderr
  resumed = _cli(tmp_path, [*argv, "--resume"])
  assert resumed.returncode == 0, resumed.stderr
  assert "Resuming sines/ntkmtl at epoch 1, batch 1 (step 5)" in resumed.stdout
  [a], [b] = _run_record(whole), _run_record(out)
  assert a["metrics"] == b["metrics"] and a["steps"] == b["steps"] == 11
  for key in ("losses", "weights", "grad_norm"):
    np.testing.assert_array_equal(a["history"][key], b["history"][key], err_msg=key)


def test_sigterm_in_the_second_run_of_compare_keeps_the_first_and_marks_the_rest(tmp_path):
  out = tmp_path / "compare"
  argv = ["compare", *SINES, "--methods", "ls,ntkmtl,famo", "--seeds", "0", "--workdir", str(out)]
  stopped = _cli(tmp_path, argv, SIGNAL_AT=3, RUN_INDEX=1)
  assert stopped.returncode == 143, stopped.stderr
  assert "Interrupted (SIGTERM): kept the 1 finished run(s)" in stopped.stderr
  with open(out / "results.json") as f:
    document = json.load(f)
  assert document["config"]["unfinished_runs"] == ["ntkmtl-seed0", "famo-seed0"]
  finished = [r for r in document["runs"] if not r["interrupted"]]
  assert [r["method"] for r in finished] == ["ls"] and finished[0]["steps"] == 11


def test_a_sigterm_outside_the_loop_still_exits_143(tmp_path):
  # While the command builds its benchmark (before any step), SIGTERM raises Terminated.
  script = tmp_path / "early.py"
  script.write_text(
    "import os, signal, sys\n"
    "from ntkmtl_jax import cli\n"
    "from ntkmtl_jax.cli import flags\n"
    "real = flags.build_benchmark\n"
    "def build(config):\n"
    "  os.kill(os.getpid(), signal.SIGTERM)\n"
    "  return real(config)\n"
    "flags.build_benchmark = build\n"
    "sys.exit(cli.main(sys.argv[1:]))\n"
  )
  done = run_python([str(script), "train", *SINES, "--workdir", str(tmp_path / "x")])
  assert done.returncode == 143, done.stderr
  assert done.stderr.strip().splitlines()[-1] == "Terminated (SIGTERM)."


def test_stop_requests_turn_the_first_signal_into_a_request():
  with interrupt.StopRequests() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested and stop.signal_name == "SIGTERM"
    with pytest.raises(interrupt.Terminated):
      os.kill(os.getpid(), signal.SIGTERM)
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
  assert (interrupt.exit_status("SIGTERM"), interrupt.exit_status("SIGINT")) == (143, 130)


HOLD = """
import sys, time
from ntkmtl_jax.locking import workdir_lock
with workdir_lock(sys.argv[1]):
  print("locked", flush=True)
  if sys.argv[2] == "crash":
    import os, signal
    os.kill(os.getpid(), signal.SIGKILL)
  time.sleep(120)
"""


def _holder(tmp_path, workdir, how):
  script = tmp_path / "hold.py"
  script.write_text(HOLD)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  process = subprocess.Popen(
    [sys.executable, str(script), str(workdir), how], stdout=subprocess.PIPE, text=True, env=env
  )
  assert process.stdout.readline().strip() == "locked"
  return process


def test_one_process_per_workdir_and_no_stale_lock_after_a_crash(tmp_path):
  bench = benchmarks.get_benchmark("sines", num_train=32, num_test=16, hidden=(8,))
  config = bench.config.replace(batch_size=16, max_steps=2)
  workdir = tmp_path / "run"
  holder = _holder(tmp_path, workdir, "hold")
  try:
    with pytest.raises(WorkdirBusyError, match=rf"{workdir} is in use by process {holder.pid}"):
      loop.fit(bench, config, str(workdir), progress=False)
    busy = _cli(tmp_path, ["train", *SINES, "--workdir", str(workdir)])
    assert busy.returncode == 2
    assert busy.stderr.strip().splitlines() == [
      f"ntkmtl train: error: {workdir} is in use by process {holder.pid} "
      f"(since {busy.stderr.split('(since ')[1].split(')')[0]}); wait for it to finish or "
      "choose another directory."
    ]
  finally:
    holder.kill()
    holder.wait()
  crashed = _holder(tmp_path, tmp_path / "crashed", "crash")
  crashed.wait()
  assert crashed.returncode == -signal.SIGKILL
  with workdir_lock(str(tmp_path / "crashed")):  # the kernel released the dead process' lock
    pass
  assert loop.fit(bench, config, str(workdir), progress=False).steps == 2


def _tiny():
  bench = benchmarks.get_benchmark("sines", num_train=64, num_test=32, hidden=(8,))
  return bench, bench.config.replace(method="ls", batch_size=16, max_steps=6, probe_every=0)


@pytest.mark.parametrize(
  "change, shown",
  [
    (dict(batch_size=8), "batch_size 16 -> 8"),
    (dict(task_passes="vmap"), "task_passes 'auto' -> 'vmap'"),
    (dict(optimizer="sgd"), "optimizer 'adam' -> 'sgd'"),
    (dict(learning_rate=1e-2), "learning_rate 0.003 -> 0.01"),
    (dict(max_grad_norm=0.5), "max_grad_norm None -> 0.5"),
  ],
)
def test_a_resume_that_changes_the_run_is_refused_listing_the_change(
  tmp_path, capsys, change, shown
):
  bench, config = _tiny()
  workdir = str(tmp_path / "run")
  loop.fit(bench, config.replace(max_steps=3), workdir, progress=False)
  capsys.readouterr()
  with pytest.raises(RunMismatchError, match=rf"another run \(different {shown}\)") as error:
    loop.fit(bench, config.replace(**change), workdir, progress=False)
  assert len(str(error.value).splitlines()) == 1
  assert "Skipped the checkpoint" not in capsys.readouterr().out  # refused before restoring


def test_a_resume_may_extend_the_run_and_the_change_is_recorded(tmp_path, capsys):
  bench, config = _tiny()
  workdir = str(tmp_path / "run")
  loop.fit(bench, config.replace(max_steps=3), workdir, progress=False)
  # (the command line's automatic eigenvalue-probe interval grows with --steps)
  longer = loop.fit(bench, config.replace(log_every=1, probe_every=2), workdir, progress=False)
  assert "changed: log_every 10 -> 1, max_steps 3 -> 6, probe_every 0 -> 2" in (
    capsys.readouterr().out
  )
  assert longer.changes_on_resume == [
    {"step": 3, "changes": {"log_every": [10, 1], "max_steps": [3, 6], "probe_every": [0, 2]}}
  ]
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["changes_on_resume"] == longer.changes_on_resume
  whole = loop.fit(bench, config, None, progress=False)
  np.testing.assert_array_equal(longer.history.losses, whole.history.losses)


def test_overwrite_never_discards_a_finished_run(tmp_path):
  bench, config = _tiny()
  workdir = str(tmp_path / "run")
  loop.fit(bench, config, workdir, progress=False)
  # The finished run's checkpoints do not restore into an SGD config: still refused.
  with pytest.raises(RunMismatchError, match="finished run; refusing to overwrite"):
    loop.fit(bench, config.replace(optimizer="sgd"), workdir, progress=False, overwrite=True)
  # Checkpoints gone, its results.json left: nothing writes over it either.
  import shutil

  shutil.rmtree(os.path.join(workdir, "checkpoints"))
  with pytest.raises(RunMismatchError, match="results.json of a finished run"):
    loop.fit(bench, config, workdir, progress=False)
  # An unfinished run of another config is discarded with overwrite.
  other = str(tmp_path / "other")
  loop.fit(bench, config.replace(max_steps=2, checkpoint_every=1), other, progress=False)
  os.remove(os.path.join(other, "results.json"))  # as a killed run leaves it
  redone = loop.fit(bench, config.replace(optimizer="sgd"), other, progress=False, overwrite=True)
  assert redone.steps == 6


def test_default_output_folders_are_unique_within_one_second(tmp_path, monkeypatch):
  from ntkmtl_jax.cli import commands

  monkeypatch.chdir(tmp_path)
  args = type("Args", (), {"workdir": None, "benchmark": "sines"})()
  folders = {commands._output_dir(args, "train") for _ in range(3)}
  assert len(folders) == 3 and all(os.path.isdir(f) for f in folders)


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--lr", "-1"], "--lr must be positive"),
    (["--hp", "gamma=-1", "--method", "famo"], "FAMO: gamma=-1; it must be >= 0"),
    (["--hp", "learning_rate=0", "--method", "famo"], "FAMO: learning_rate=0"),
    (["--seed", "-3"], "--seed must be >= 0"),
  ],
)
def test_settings_that_make_no_sense_are_refused_in_one_line(tmp_path, argv, message):
  done = _cli(tmp_path, ["train", *SINES, *argv, "--workdir", str(tmp_path / "x")])
  assert done.returncode == 2
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], done.stderr


def test_config_refuses_bad_settings():
  for change, message in (
    (dict(learning_rate=-1.0), "learning_rate=-1.0"),
    (dict(seed=-1), "seed=-1"),
    (dict(batch_size=0), "batch_size=0"),
    (dict(max_grad_norm=0.0), "max_grad_norm=0.0"),
    (dict(prefetch=-1), "prefetch=-1"),
  ):
    with pytest.raises(ValueError, match=message):
      benchmarks.get_config("sines").replace(**change)


def test_a_run_that_skipped_a_few_steps_says_so(tmp_path, capsys):
  bench = benchmarks.get_benchmark("sines", num_train=64, num_test=32, hidden=(8,))
  taken = []

  def take(indices, rng):
    batch = bench.train.take(indices, rng)
    if rng is not None:
      taken.append(1)
      if len(taken) == 2:  # the second training batch: one non-finite target
        batch = {k: v.copy() for k, v in batch.items()}
        batch[bench.task_names[0]][0] = np.nan
    return batch

  poisoned = type(bench)(**{**bench.__dict__, "train": Split(len(bench.train), take)})
  result = loop.fit(
    poisoned, bench.config.replace(batch_size=16, max_steps=4, prefetch=0), progress=False
  )
  assert result.skipped == 1
  assert cli_runs.skip_status([result]) == 0
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [
    "ntkmtl: warning: ls seed 0 skipped 1 of its 4 steps (non-finite losses: 1); the others "
    "trained as configured."
  ]


def test_the_lock_file_is_never_written_through_a_link_and_a_full_disk_is_one_error(
  tmp_path, monkeypatch
):
  """A symlink planted at the lock's name is refused (its target untouched); a lock that cannot
  be written (a full disk) is an OutputWriteError naming the lock file and the free space."""
  import errno

  from ntkmtl_jax import io, locking

  target = tmp_path / "target.txt"
  target.write_text("keep me")
  planted = tmp_path / "planted"
  planted.mkdir()
  os.symlink(target, planted / locking.LOCK_NAME)
  with pytest.raises(io.OutputWriteError, match=rf"Could not write the lock file {planted}/"):
    with workdir_lock(str(planted)):
      pass
  assert target.read_text() == "keep me"

  def full(fd, data, offset):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(locking.os, "pwrite", full)
  with pytest.raises(io.OutputWriteError, match=r"no space left on device \(.* free there now"):
    with workdir_lock(str(tmp_path / "full")):
      pass
  monkeypatch.undo()
  with workdir_lock(str(tmp_path / "full")):  # the failed attempt left no lock held
    pass
