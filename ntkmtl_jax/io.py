"""Files that are whole or absent, written only where they are meant to be.

Every result and report goes through `replaced_file` (or `write_json`): a crash or Ctrl-C never
leaves half a file, and a symlink planted in the output directory is never followed.
`check_writable` proves an output directory takes files before a run starts. A write that
fails (a full disk, a read-only or vanished directory) raises one `OutputWriteError` that
names the path, the cause and, when the disk is the cause, the free space there.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil

# Causes of a failed write that are the disk's, not the caller's: the message says how much
# space is left.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_TMP_FLAGS = os.O_CREAT | os.O_EXCL | os.O_RDWR | getattr(os, "O_NOFOLLOW", 0)
_TMP_FLAGS |= getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


class OutputWriteError(OSError):
  """A file or directory could not be written (or removed): `filename` is the path,
  `errno` the cause's error number where one is known, `str()` one line saying both (and the
  free space there when the disk is full)."""

  def __init__(self, message: str, path: str, code: int | None = None):
    super().__init__(code, message, path)
    self.message = message

  def __str__(self):
    return self.message

  def __reduce__(self):
    return type(self), (self.message, self.filename, self.errno)


def human_size(num_bytes: float) -> str:
  """`num_bytes` as "812 B", "1.5 KiB", "3.2 GiB"."""
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(num_bytes) < 1024 or unit == "TiB":
      return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
    num_bytes /= 1024
  raise AssertionError("unreachable")


def free_space(path: str) -> int | None:
  """The bytes free to write at `path` (its nearest existing ancestor), None if unknown."""
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  try:
    return shutil.disk_usage(path).free
  except OSError:
    return None


def describe_cause(error: BaseException) -> str:
  """The cause of `error` in a few words: its error number's text ("no space left on device")
  or the first line of its message."""
  code = getattr(error, "errno", None)
  if isinstance(code, int) and code:
    text = os.strerror(code)
    return text[:1].lower() + text[1:]
  text = str(error).splitlines()[0] if str(error) else type(error).__name__
  return text[:300]


def write_error(
  path: str, error: BaseException, *, what: str = "", size: int | None = None, code=None
) -> OutputWriteError:
  """The `OutputWriteError` for a failed write of `path` (`what` it is, e.g. "the checkpoint
  of step 8") caused by `error`: "Could not write <what> <path>: <cause>", with "(<free> free
  there now, <size> to write)" when the disk is full. `code` is the error number where `error`
  has none (e.g. one read from a message)."""
  code = getattr(error, "errno", None) if code is None else code
  code = code if isinstance(code, int) and code else None
  cause = describe_cause(OSError(code, "") if code else error)
  message = f"Could not write {what + ' ' if what else ''}{path}: {cause}"
  if code in _DISK_ERRNOS:
    free = free_space(path)
    facts = [f"{human_size(free)} free there now" if free is not None else "free space unknown"]
    if size is not None:
      facts.append(f"{human_size(size)} to write")
    message += f" ({', '.join(facts)})"
  return OutputWriteError(message, path, code)


def _unique_temporary(path: str) -> tuple[int, str]:
  """A new file beside `path`, created exclusively (never through a link planted at its
  name), with the permissions a plain open() would give it: (descriptor, name)."""
  directory, name = os.path.split(os.path.abspath(path))
  for _ in range(100):
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
    try:
      return os.open(tmp, _TMP_FLAGS, 0o666), tmp
    except FileExistsError:
      continue
  raise FileExistsError(errno.EEXIST, "no unused temporary name", path)


def _sync_directory(directory: str):
  """Makes a rename in `directory` durable (a power cut keeps it); best effort."""
  with contextlib.suppress(OSError, AttributeError):
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


@contextlib.contextmanager
def replaced_file(path: str, mode: str = "w", *, size: int | None = None, **open_kwargs):
  """A new file beside `path`, renamed over `path` when the block ends without an error.

  A crash or Ctrl-C never leaves half a file: the temporary file (a unique hidden name beside
  `path`, created exclusively and without following links) is removed, and `path` keeps what it
  held. The file is flushed to disk before the rename, so a power cut leaves the old file or the
  new one. A symlink planted at `path` is replaced by the file, never written through.

  Args:
    path: the file to write.
    mode: as for `open` ("w", "wb").
    size: the bytes to be written, when known: a failure on a full disk says it.
    **open_kwargs: more arguments of `open` (newline=...).

  Raises:
    OutputWriteError: the file could not be created, written or renamed (a full disk, a
      read-only directory, ...): any OSError raised inside the block is taken for one. It names
      `path` and the cause.
  """
  path = os.path.abspath(path)
  try:
    fd, tmp = _unique_temporary(path)
  except OSError as error:
    raise write_error(path, error, size=size) from error
  try:
    with os.fdopen(fd, mode, **open_kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as error:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    if isinstance(error, OSError) and not isinstance(error, OutputWriteError):
      raise write_error(path, error, size=size) from error
    raise
  _sync_directory(os.path.dirname(path))


def write_text(path: str, text: str):
  """Writes `text` to `path` (UTF-8; see `replaced_file`)."""
  data = text.encode()
  with replaced_file(path, "wb", size=len(data)) as f:
    f.write(data)


def write_json(path: str, data: dict):
  """Writes `data` to `path` as JSON (see `replaced_file`); non-finite numbers as NaN/Infinity."""
  write_text(path, json.dumps(data, indent=1, default=float, allow_nan=True))


def check_writable(directory: str) -> str:
  """Creates `directory` if needed and proves that files can be created in it: a uniquely
  named probe file is created exclusively, without following links (a symlink planted in the
  directory is never written through, whatever its name), and removed. A `directory` that is
  itself a symlink to a directory is fine.

  Returns:
    `directory`.

  Raises:
    OutputWriteError: `directory` cannot be created or takes no files; names it and the cause.
  """
  try:
    if os.path.lexists(directory) and not os.path.isdir(directory):
      raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), directory)
    os.makedirs(directory, exist_ok=True)
    fd, probe = _unique_temporary(os.path.join(directory, "ntkmtl-write-test"))
    os.close(fd)
    os.unlink(probe)
  except OSError as error:
    raise write_error(directory, error, what="to the output directory") from error
  return directory


def jsonable(value):
  """`value` with dict keys as strings, tuples as lists and anything else unknown as its repr."""
  if isinstance(value, dict):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if isinstance(value, (bool, int, float, str)) or value is None:
    return value
  return repr(value)
