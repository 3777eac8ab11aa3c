"""Checks of data as it is read: one `DataFileError` naming the file (or record), the problem
and the fix, instead of a traceback from deep inside NumPy or a NaN in the results.

Every check is vectorised NumPy over an array already in memory (or reads a `.npy` header of a
hundred bytes), so it costs little next to reading the file.
"""

from __future__ import annotations

import os

import numpy as np

BAD_EXAMPLES = ("error", "skip")
_MAGIC = b"\x93NUMPY"
_HEADERS = {
  (1, 0): np.lib.format.read_array_header_1_0,
  (2, 0): np.lib.format.read_array_header_2_0,
  (3, 0): np.lib.format.read_array_header_2_0,  # 2.0 with a utf-8 header: the same fields
}

_KINDS = {
  "U": "strings",
  "S": "byte strings",
  "c": "complex numbers",
  "V": "records",
  "M": "dates",
  "m": "time spans",
}


class DataFileError(ValueError):
  """A data file or record that cannot be used as it is.

  The message is one line: the file (or dataset, field and example), the problem and the fix.
  `path` and `problem` hold the first two (None when unknown).
  """

  def __init__(self, message: str, *, path: str | None = None, problem: str | None = None):
    super().__init__(message)
    self.path, self.problem = path, problem


class BadExampleWarning(UserWarning):
  """An example skipped under `bad_examples="skip"` (once per example and split)."""


def file_error(path: str, problem: str, fix: str) -> DataFileError:
  """The `DataFileError` "PATH: PROBLEM. FIX"."""
  return DataFileError(f"{path}: {problem}. {fix}", path=path, problem=problem)


def check_bad_examples(value: str) -> str:
  """`value` if it is one of `BAD_EXAMPLES`, else a ValueError."""
  if value not in BAD_EXAMPLES:
    raise ValueError(f"bad_examples={value!r}; choose one of {', '.join(BAD_EXAMPLES)}.")
  return value


def read_npy_header(path: str, fix: str) -> tuple[tuple[int, ...], np.dtype, int]:
  """(shape, dtype, offset of the data) of the `.npy` file `path`, its size checked against
  the header: a missing, empty, non-npy or truncated file, or one of strings or objects, is a
  `DataFileError` (message ending with `fix`)."""
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      start = f.read(len(_MAGIC))
      if size == 0:
        raise file_error(path, "the file is empty (0 bytes)", fix)
      if start != _MAGIC:
        raise file_error(
          path,
          f"not a .npy file (it starts with {start!r}, not the .npy signature {_MAGIC!r})",
          fix,
        )
      f.seek(0)
      try:
        version = np.lib.format.read_magic(f)
        shape, _, dtype = _HEADERS[version](f)
      except (ValueError, KeyError, EOFError, SyntaxError) as error:
        problem = f"unreadable .npy header ({error or 'unknown version'})"
        raise file_error(path, problem, fix) from None
      offset = f.tell()
  except FileNotFoundError:
    raise file_error(path, "the file is missing", fix) from None
  except OSError as error:
    raise file_error(path, f"the file cannot be read ({error.strerror or error})", fix) from None
  if dtype.hasobject:
    raise file_error(path, "it holds Python objects (a pickled object array), not numbers", fix)
  if dtype.kind not in "biuf":
    kind = _KINDS.get(dtype.kind, dtype.kind)
    raise file_error(path, f"it holds {dtype} values ({kind}), not real numbers", fix)
  want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if size - offset < want:
    raise file_error(
      path,
      f"truncated: its header announces a {shape} {dtype} array ({want:,} bytes of data), the "
      f"file holds {size - offset:,}",
      fix,
    )
  return tuple(int(n) for n in shape), dtype, offset


def read_npy(path: str, fix: str) -> np.ndarray:
  """The array in the `.npy` file `path`, after `read_npy_header`'s checks; anything else that
  goes wrong reading it is a `DataFileError` too."""
  read_npy_header(path, fix)
  try:
    with open(path, "rb") as f:
      return np.lib.format.read_array(f, allow_pickle=False)
  except (OSError, ValueError, EOFError) as error:
    raise file_error(path, f"unreadable .npy file ({error})", fix) from None


def _first(mask: np.ndarray, values: np.ndarray) -> str:
  """ "N of M values ...; the first, V, at (i, j)" for the True entries of `mask`."""
  where = np.unravel_index(int(np.argmax(mask)), mask.shape)
  first, at = float(values[where]), tuple(int(i) for i in where)
  return f"{int(mask.sum()):,} of {mask.size:,} values (the first, {first:.7g}, at {at})"


def check_finite(array: np.ndarray, path: str, fix: str):
  """A `DataFileError` unless every value of the float `array` is finite."""
  finite = np.isfinite(array)
  if not finite.all():
    raise file_error(path, f"NaN or infinite values: {_first(~finite, array)}", fix)


def check_labels(labels: np.ndarray, path: str, fix: str, num_classes: int | None) -> np.ndarray:
  """`labels` (float, finite) rounded to whole numbers, or a `DataFileError` where one is not
  within 1e-6 of a whole number or, given `num_classes`, outside [-1, num_classes) (-1 marks an
  unlabelled pixel)."""
  rounded = np.rint(labels)
  off = np.abs(labels - rounded) > 1e-6
  if off.any():
    raise file_error(path, f"labels that are not whole class numbers: {_first(off, labels)}", fix)
  if num_classes is not None:
    outside = (rounded < -1) | (rounded >= num_classes)
    if outside.any():
      raise file_error(
        path,
        f"labels outside -1 (unlabelled) .. {num_classes - 1} ({num_classes} classes): "
        f"{_first(outside, labels)}",
        fix,
      )
  return rounded
