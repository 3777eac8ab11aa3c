"""Files that are whole or absent: every result and report goes through `replaced_file`."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile


@contextlib.contextmanager
def replaced_file(path: str, mode: str = "w", **open_kwargs):
  """A new file beside `path`, renamed over `path` when the block ends without an error.

  A crash or Ctrl-C never leaves half a file, and a symlink planted at `path` is replaced,
  not followed (the temporary file is created exclusively, so one planted at its name is
  never opened either).
  """
  fd, tmp = tempfile.mkstemp(
    dir=os.path.dirname(os.path.abspath(path)), prefix=os.path.basename(path) + ".", suffix=".tmp"
  )
  try:
    with os.fdopen(fd, mode, **open_kwargs) as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    if os.path.lexists(tmp):
      os.unlink(tmp)
    raise


def write_json(path: str, data: dict):
  """Writes `data` to `path` as JSON (see `replaced_file`); non-finite numbers as NaN/Infinity."""
  with replaced_file(path) as f:
    json.dump(data, f, indent=1, default=float, allow_nan=True)


def jsonable(value):
  """`value` with dict keys as strings, tuples as lists and anything else unknown as its repr."""
  if isinstance(value, dict):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if isinstance(value, (bool, int, float, str)) or value is None:
    return value
  return repr(value)
