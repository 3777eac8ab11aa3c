"""ntkmtl_jax.io: files are written whole or not at all, never through a planted symlink, and a
failed write (a full disk, a directory that takes no files) is one OutputWriteError naming the
path, the cause and, for a full disk, the free space."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess

import pytest

from ntkmtl_jax import io


@contextlib.contextmanager
def mounted_tmpfs(path, size: str):
  """A tmpfs of `size` mounted at `path` (made), unmounted afterwards; skips the test where
  this process may not mount one (it needs root and a `mount` that works here)."""
  os.makedirs(path, exist_ok=True)
  if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
    pytest.skip("mounting a small tmpfs needs root")
  done = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
  )
  if done.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
  try:
    yield str(path)
  finally:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_disk(directory) -> str:
  """Writes a file in `directory` until its file system has no space left; returns its path."""
  filler = os.path.join(directory, "filler")
  with open(filler, "wb", buffering=0) as f:
    for chunk in (1 << 16, 1 << 12, 1 << 9, 1):
      with contextlib.suppress(OSError):
        while True:
          f.write(b"\0" * chunk)
  return filler


def _listing(directory) -> list[str]:
  return sorted(os.listdir(directory))


def test_replaced_file_writes_whole_files_and_keeps_the_old_one_on_failure(tmp_path):
  path = tmp_path / "results.json"
  io.write_json(str(path), dict(a=1, b=float("nan")))
  assert json.loads(path.read_text())["a"] == 1 and "NaN" in path.read_text()
  assert _listing(tmp_path) == ["results.json"]  # no temporary file left
  mode = os.stat(path).st_mode & 0o777
  umask = os.umask(0)
  os.umask(umask)
  assert mode == 0o666 & ~umask  # as open(path, "w") would make it, not mkstemp's 0600

  with pytest.raises(RuntimeError, match="stop"):
    with io.replaced_file(str(path)) as f:
      f.write("half")
      raise RuntimeError("stop")
  assert json.loads(path.read_text())["a"] == 1 and _listing(tmp_path) == ["results.json"]


def test_replaced_file_does_not_follow_a_symlink_at_the_destination_or_its_temporary_name(
  tmp_path, monkeypatch
):
  victim = tmp_path / "victim.txt"
  victim.write_text("keep me")
  out = tmp_path / "out"
  out.mkdir()
  (out / "report.csv").symlink_to(victim)
  names = iter(["aaaa", "bbbb"])  # the first temporary name is taken by a planted symlink
  monkeypatch.setattr(io.secrets, "token_hex", lambda n: next(names))
  (out / ".report.csv.aaaa.tmp").symlink_to(victim)
  with io.replaced_file(str(out / "report.csv")) as f:
    f.write("new")
  assert victim.read_text() == "keep me"
  assert (out / "report.csv").read_text() == "new" and not (out / "report.csv").is_symlink()
  assert (out / ".report.csv.aaaa.tmp").is_symlink()  # left as it was, not written through
  assert _listing(out) == [".report.csv.aaaa.tmp", "report.csv"]


def test_a_full_disk_while_writing_a_report_is_one_error_naming_the_path(tmp_path, monkeypatch):
  path = tmp_path / "results.json"
  io.write_json(str(path), dict(old=True))

  def full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(io.os, "fsync", full)  # where a full disk shows up for a small file
  with pytest.raises(io.OutputWriteError) as raised:
    io.write_json(str(path), dict(new=True, data=list(range(1000))))
  error = raised.value
  message = str(error)
  print(message)
  assert isinstance(error, OSError) and error.errno == errno.ENOSPC
  assert error.filename == str(path)
  assert message.startswith(f"Could not write {path}: no space left on device (")
  assert "free there now" in message and "KiB to write" in message and "\n" not in message
  assert json.loads(path.read_text()) == dict(old=True) and _listing(tmp_path) == ["results.json"]

  with pytest.raises(io.OutputWriteError, match="no space left on device"):
    with io.replaced_file(str(path), "wb") as f:
      f.write(b"x")


def test_a_really_full_disk_is_one_error_too(tmp_path):
  with mounted_tmpfs(tmp_path / "small", "256k") as small:
    path = os.path.join(small, "results.json")
    io.write_json(path, dict(old=True))
    fill_disk(small)
    with pytest.raises(io.OutputWriteError) as raised:
      io.write_json(path, dict(data="x" * 100_000))
    message = str(raised.value)
    print(message)
    assert message.startswith(f"Could not write {path}: no space left on device (")
    assert "free there now, 97.7 KiB to write)" in message
    assert json.loads(open(path).read()) == dict(old=True)
    assert _listing(small) == ["filler", "results.json"]


def test_check_writable_makes_the_directory_and_leaves_nothing_in_it(tmp_path):
  made = tmp_path / "a" / "b"
  assert io.check_writable(str(made)) == str(made)
  assert made.is_dir() and _listing(made) == []
  assert io.check_writable(str(made)) == str(made)  # an existing one is fine
  linked = tmp_path / "linked"
  linked.symlink_to(made, target_is_directory=True)  # e.g. a run directory on scratch
  io.check_writable(str(linked))
  assert _listing(made) == []


def test_check_writable_does_not_follow_a_symlink_planted_in_the_directory(tmp_path, monkeypatch):
  victim = tmp_path / "victim.txt"
  victim.write_text("keep me")
  out = tmp_path / "out"
  out.mkdir()
  planted = [".ntkmtl-write-test", ".ntkmtl-write-test.aaaa.tmp", "ntkmtl-write-test"]
  for name in planted:
    (out / name).symlink_to(victim)
  names = iter(["aaaa", "bbbb"])  # its first probe name is one of the planted links
  monkeypatch.setattr(io.secrets, "token_hex", lambda n: next(names))
  io.check_writable(str(out))
  assert victim.read_text() == "keep me"
  assert _listing(out) == sorted(planted) and all((out / name).is_symlink() for name in planted)


def test_check_writable_names_the_directory_and_the_cause(tmp_path, monkeypatch):
  a_file = tmp_path / "file"
  a_file.write_text("")
  for bad in (a_file, a_file / "sub"):
    with pytest.raises(io.OutputWriteError) as raised:
      io.check_writable(str(bad))
    assert str(raised.value) == (
      f"Could not write to the output directory {bad}: not a directory"
    ), str(raised.value)
    assert raised.value.errno == errno.ENOTDIR

  def refused(*args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied")

  monkeypatch.setattr(io.os, "open", refused)  # a read-only directory (root may write anyway)
  with pytest.raises(io.OutputWriteError) as raised:
    io.check_writable(str(tmp_path))
  assert (
    str(raised.value) == f"Could not write to the output directory {tmp_path}: permission denied"
  )
  assert _listing(tmp_path) == ["file"]


def test_output_write_errors_survive_pickling():
  import pickle

  error = io.OutputWriteError("Could not write /x: no space left on device", "/x", errno.ENOSPC)
  again = pickle.loads(pickle.dumps(error))
  assert (str(again), again.filename, again.errno) == (str(error), "/x", errno.ENOSPC)
