"""Data splits addressed by example index, their batches, and tfds access without download.

    split = Split.from_arrays({"x": x, "y": y})
    for batch in epoch_batches(split, 128, seed=0, epoch=3):   # shuffled, full batches
      ...
    for batch in epoch_batches(split, 1024, seed=None):         # in order, for evaluation
      ...

Every benchmark (the offline ones and the paper's) hands the training loop `Split`s, so
there is one data path: the loop asks for the batches of epoch e from batch b on, and gets
the same examples and the same augmentation whether or not the run was resumed there.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


class DatasetMissingError(FileNotFoundError):
  """A benchmark's data is not where the run looks for it; the message says what to do."""


def missing_dataset(
  what: str, where: str, how: str, flag: str = "--data-dir"
) -> DatasetMissingError:
  """The `DatasetMissingError` for `what`, looked for in `where`, with `how` to get it."""
  return DatasetMissingError(
    f"{what} was not found in {where}.\n  To get it: {how}\n  Then point the run at it with "
    f"{flag} DIR (nothing is downloaded automatically)."
  )


def open_tfds(name: str, split: str, data_dir: str | None, how: str):
  """`tfds.data_source(name, split=...)` without downloading, or a `DatasetMissingError`.

  Reads the prepared array_record files (TensorFlow is not needed).

  Args:
    name: the tfds dataset name.
    split: the tfds split.
    data_dir: the tfds data_dir (None: tfds' default).
    how: what to do to get the dataset (in the error message).

  Returns:
    The random-access data source.
  """
  import tensorflow_datasets as tfds  # imported here: only the tfds benchmarks need it

  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as error:  # tfds raises several types for a missing or unprepared dataset
    text = str(error)
    # No data_dir anywhere: tfds finds the builder but no prepared split ("`splits` is
    # empty ... has not been generated yet", a KeyError).
    if (
      isinstance(error, (FileNotFoundError, AssertionError))
      or "not found" in text.lower()
      or "DatasetNotFound" in type(error).__name__
      or "array_record" in text
      or (isinstance(error, KeyError) and "generated" in text)
    ):
      where = data_dir or "the default tfds data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
      raise missing_dataset(
        f"The tfds dataset {name!r} (split {split!r}, array_record format)", where, how
      ) from error
    raise


def read_examples(source, keys: Sequence[str], indices=None, chunk: int = 1024) -> dict:
  """Reads `keys` of the examples of a tfds data source into stacked NumPy arrays."""
  indices = np.arange(len(source)) if indices is None else np.asarray(indices)
  columns = {k: [] for k in keys}
  for start in range(0, len(indices), chunk):
    part = [int(i) for i in indices[start : start + chunk]]
    try:
      examples = source.__getitems__(part)
    except (AttributeError, TypeError):  # tfds' mocked sources only index one at a time
      examples = [source[i] for i in part]
    for example in examples:
      for k in keys:
        columns[k].append(np.asarray(example[k]))
  return {k: np.stack(v) if v else np.zeros((0,)) for k, v in columns.items()}


class Split:
  """A data split addressed by example index: `len(split)` and `split.take(indices, rng)`.

  Args:
    size: number of examples.
    take: `take(indices (m,), rng or None) -> batch dict of NumPy arrays` (rng is given for
      training batches, so a split may apply random augmentation).
  """

  def __init__(self, size: int, take: Callable[[np.ndarray, Any], dict]):
    self.size = int(size)
    self._take = take

  def __len__(self):
    return self.size

  def take(self, indices, rng=None) -> dict:
    return self._take(np.asarray(indices, np.int64), rng)

  @classmethod
  def from_arrays(cls, arrays: dict, transform: Callable[[dict, Any], dict] | None = None):
    """A split over in-memory arrays of equal length; `transform(batch, rng)` post-processes."""
    sizes = {len(v) for v in arrays.values()}
    if len(sizes) != 1:
      raise ValueError(f"Split.from_arrays: arrays of different lengths {sizes}.")

    def take(indices, rng):
      batch = {k: v[indices] for k, v in arrays.items()}
      return transform(batch, rng) if transform is not None else batch

    return cls(sizes.pop(), take)


def epoch_batches(
  split: Split,
  batch_size: int,
  *,
  seed: int | None,
  epoch: int = 0,
  skip: int = 0,
  drop_last: bool = True,
) -> Iterator[dict]:
  """Batches of one pass over `split`.

  With a `seed`: a permutation drawn from (seed, epoch), full batches only unless
  `drop_last=False` (then a last, smaller batch of the remaining examples, as PyTorch's
  DataLoader gives); batch b's augmentation draws from its own generator (seed, epoch, b),
  so `skip` (drop the first batches, to resume) yields exactly the batches a full pass
  yields from there on. Without: the split in order, the last batch possibly smaller.

  Args:
    split: the `Split`.
    batch_size: examples per batch.
    seed: the shuffling seed, or None for the split in order.
    epoch: the pass number (a new permutation each).
    skip: batches to leave out at the start.
    drop_last: with a seed, leave out the examples that do not fill a last batch.

  Returns:
    An iterator of batch dicts.
  """
  n = len(split)
  if seed is None:
    for start in range(0, n, batch_size):
      yield split.take(np.arange(start, min(start + batch_size, n)))
    return
  if n < batch_size and drop_last:
    raise ValueError(
      f"The training split has {n} examples, fewer than the batch size "
      f"{batch_size}; lower the batch size."
    )
  order = np.random.default_rng([seed, epoch]).permutation(n)
  num_batches = n // batch_size if drop_last else -(-n // batch_size)
  for b in range(skip, num_batches):
    yield split.take(
      order[b * batch_size : (b + 1) * batch_size], np.random.default_rng([seed, epoch, b])
    )


def endless_batches(split: Split, batch_size: int, seed: int) -> Iterator[dict]:
  """Training batches epoch after epoch (for step-based use, e.g. probes in notebooks)."""
  epoch = 0
  while True:
    yield from epoch_batches(split, batch_size, seed=seed, epoch=epoch)
    epoch += 1


_POLL_S = 0.05  # how often a waiting side of `prefetch` checks whether the other has stopped
_JOIN_S = 30.0  # how long closing `prefetch` waits for an item being loaded to finish
_ITEM, _END, _ERROR = range(3)


def prefetch(iterator: Iterable[T], depth: int = 2) -> Iterator[T]:
  """The items of `iterator`, in order, loaded on a background thread up to `depth` ahead.

      for batch in prefetch(epoch_batches(split, 32, seed=0, epoch=e)):
        state, out = step(state, batch)

  The jitted step returns before the device has finished, so the next batch can be read and
  augmented while it runs: NumPy's array work and file reads release the GIL, and the
  loader's time hides behind the step's instead of adding to it. The items, and their
  order, are exactly the plain iterator's (one thread draws them one after the other, so an
  `epoch_batches` pass is as deterministic as without it).

  At most `depth` items are loaded (or being loaded) that the consumer has not taken yet,
  so memory holds `depth` batches beyond the one in use. An exception raised by the
  iterator is raised here, with its traceback, where its item would have been yielded.
  Closing this generator (`close()`, leaving a `for` loop over it through `break` or an
  exception such as KeyboardInterrupt, or dropping the last reference to it) stops the
  thread: it loads no further item, closes `iterator` (if it has `close`) and is joined
  (waiting for an item being loaded to finish, up to 30 s; the thread is a daemon). The
  thread starts at the first `next()`, so nothing is read before the consumer asks.

  Args:
    iterator: an iterable of items (e.g. batches); it is iterated on the background thread
      only.
    depth: how many items may be loaded ahead (>= 1).

  Returns:
    A generator of the items.
  """
  if depth < 1:
    raise ValueError(f"prefetch: depth must be at least 1, got {depth}.")
  items = queue.Queue()  # bounded by `slots`: (kind, payload) entries
  slots = threading.Semaphore(depth)
  stop = threading.Event()

  def produce():
    source = None
    try:
      source = iter(iterator)
      while True:
        while not slots.acquire(timeout=_POLL_S):
          if stop.is_set():
            return
        if stop.is_set():
          return
        try:
          item = next(source)
        except StopIteration:
          items.put((_END, None))
          return
        items.put((_ITEM, item))
    except BaseException as error:  # handed to the consumer, KeyboardInterrupt included
      items.put((_ERROR, error))
    finally:
      close = getattr(source, "close", None)
      if close is not None:
        close()

  return _consume(
    threading.Thread(target=produce, name="prefetch", daemon=True), items, slots, stop
  )


def _consume(
  thread: threading.Thread, items: queue.Queue, slots: threading.Semaphore, stop: threading.Event
) -> Iterator:
  thread.start()
  try:
    while True:
      try:
        kind, payload = items.get(timeout=_POLL_S)
      except queue.Empty:
        if not thread.is_alive() and items.empty():
          raise RuntimeError("prefetch: the loading thread ended without a result.") from None
        continue
      if kind == _END:
        return
      if kind == _ERROR:
        raise payload
      slots.release()
      yield payload
  finally:
    stop.set()
    thread.join(_JOIN_S)
