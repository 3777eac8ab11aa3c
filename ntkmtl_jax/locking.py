"""One process per working directory: an exclusive lock held while a run (or a command) writes
there.

    with workdir_lock("runs/qm9"):
      ...   # a second process on runs/qm9 gets WorkdirBusyError at once

The lock is `fcntl.flock` on `DIR/.ntkmtl.lock`: the operating system releases it when the
process ends, however it ends (a crash or SIGKILL leaves no stale lock), and the file holds
the holder's process id and start time for the message. On systems without `fcntl` (Windows)
nothing is locked.
"""

from __future__ import annotations

import contextlib
import os
import time

from ntkmtl_jax import io

try:
  import fcntl
except ImportError:  # pragma: no cover - not on POSIX
  fcntl = None

LOCK_NAME = ".ntkmtl.lock"


class WorkdirBusyError(RuntimeError):
  """Another process holds the lock of the working directory."""


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds the exclusive lock of `workdir` (created if needed) while entered.

  Raises:
    WorkdirBusyError: another process holds it; the message names the directory and the
      holder.
    OutputWriteError: the directory or its lock file cannot be created or written (a full
      disk, no permission, a symlink planted at the lock's name); names the path.
  """
  path = os.path.join(workdir, LOCK_NAME)
  try:
    os.makedirs(workdir, exist_ok=True)
    if fcntl is None:
      fd = None
    else:
      fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
  except OSError as error:
    raise io.write_error(path, error, what="the lock file") from None
  if fd is None:
    yield
    return
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
      raise WorkdirBusyError(
        f"{workdir} is in use by {holder}; wait for it to finish or choose another directory."
      ) from None
    holder = f"process {os.getpid()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})"
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, holder.encode(), 0)
    except OSError as error:
      raise io.write_error(path, error, what="the lock file", size=len(holder)) from None
    yield
  finally:
    os.close(fd)  # releases the lock
