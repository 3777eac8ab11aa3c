"""Stopping a run cleanly on SIGINT (Ctrl-C) and SIGTERM (what batch schedulers and
preemptible cloud machines send before they kill a job).

    with StopRequests() as stop:
      for batch in batches:
        if stop.requested:        # between two steps: state, history and position agree
          save_checkpoint(); break
        step(batch)

While a `StopRequests` is entered (in the main thread), the first SIGINT or SIGTERM only
records itself (`requested`, `signal_name`), so the loop can stop at the next step boundary and
checkpoint there; a second one interrupts at once (`KeyboardInterrupt`, or `Terminated` for
SIGTERM). The exit status of a process stopped this way is 128 + the signal's number:
130 for SIGINT, 143 for SIGTERM (`exit_status`).
"""

from __future__ import annotations

import signal
import threading

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
  """Raised where a SIGTERM interrupts at once (a second SIGTERM, or one outside a loop that
  checks for it); a `KeyboardInterrupt`, so every clean-up path of Ctrl-C also runs for it."""


def exit_status(signal_name: str | None) -> int:
  """128 + the signal's number: 143 for "SIGTERM", 130 for "SIGINT" (and None)."""
  return 128 + int(getattr(signal, signal_name or "SIGINT"))


def _raise_for(signum: int):
  raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


class StopRequests:
  """A context that turns the first SIGINT / SIGTERM into a request to stop (see the module
  docstring); outside the main thread it handles nothing (signals reach the main thread only)."""

  def __init__(self):
    self.signal_name: str | None = None
    self._previous: dict[int, object] = {}

  @property
  def requested(self) -> bool:
    return self.signal_name is not None

  def _handle(self, signum, frame):
    if self.requested:
      _raise_for(signum)
    self.signal_name = signal.Signals(signum).name

  def __enter__(self) -> StopRequests:
    if threading.current_thread() is threading.main_thread():
      for signum in HANDLED:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *unused):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


def terminate_as_exception():
  """From now on a SIGTERM in the main thread raises `Terminated` where the program is, so
  `finally` blocks and the command line's clean-up run instead of the process dying at once
  (the `ntkmtl` command calls this first)."""
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, lambda signum, frame: _raise_for(signum))
