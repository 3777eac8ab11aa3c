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
  """
  os.makedirs(workdir, exist_ok=True)
  if fcntl is None:
    yield
    return
  path = os.path.join(workdir, LOCK_NAME)
  fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
      raise WorkdirBusyError(
        f"{workdir} is in use by {holder}; wait for it to finish or choose another directory."
      ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"process {os.getpid()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})".encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock
