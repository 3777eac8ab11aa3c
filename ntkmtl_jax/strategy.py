"""How the k task backward passes run: two explicit choices, resolved in one place.

A train step for a method that reads per-task gradients (and `kernel.task_jacobian`) runs
one backward pass per task (and per chunk). Two independent choices say how:

- `Passes`: how those backward passes loop: batched (`VMAP`), unrolled at trace time
  (`UNROLL`), `lax.map` of vmapped groups (`CHUNKED`), or one compiled body run task after
  task (`SEQUENTIAL`).
- `materialize`: whether the k task gradients are held together and the method's
  statistics are built from them (True), or only the statistics (squared norms, Gram rows,
  kernel eigenvalues) are streamed task by task, followed by one weighted backward pass
  (False: O(P) extra memory whatever k). A method that needs the gradients themselves
  (a `GradientRule`, an optax aggregator) can only have them held.

`Strategy` holds both (and `chunk_size`); `resolve` turns a `Strategy` or a name into the
concrete choices for a method's `Needs` on a backend; `run_passes` runs a per-task function
with the chosen `Passes` through the `RUNNERS` table. Every choice gives the same numbers
(up to rounding); they differ in speed, compile time and memory.

The names `strategy=` has always taken stay accepted, through one table (`NAMES`):

| name | passes | materialize |
| --- | --- | --- |
| `"auto"` | `default_strategy()`'s: `UNROLL` on CPU, `SEQUENTIAL` on GPU/TPU | None |
| `"vmap"` | `VMAP` | True |
| `"unroll"` | `UNROLL` | True |
| `"chunked"` | `CHUNKED` | True |
| `"sequential"` | `SEQUENTIAL` | None: streamed where the method allows it, held otherwise |
| `"streaming"` | `UNROLL` | False: refused for a method that needs the gradients |

`materialize=None` is the measured default that goes with the passes: statistics streamed
with `SEQUENTIAL` passes wherever the method allows it (the GPU/TPU default), the gradients
held with the others (the CPU default). So "auto" is the backend's measured default.
Methods with no per-task backward pass over the shared parameters (loss weightings,
NTKMTL-SR, MGDA-UB) run one backward pass whatever the strategy.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

AUTO = "auto"


class Passes(str, enum.Enum):
  """How the per-task backward passes loop (all give the same numbers).

  Attributes:
    VMAP: all passes batched in one `jax.vmap` (memory: every pass's activations at once).
    UNROLL: a Python loop unrolled at trace time, one pass after another inside the compiled
      function; compile time grows with k. The fastest on XLA:CPU. When only statistics are
      streamed, each pass's cotangent waits on the previous task's result (an optimisation
      barrier), so XLA can free each gradient before the next pass starts.
    CHUNKED: `lax.map` over groups of `chunk_size` vmapped passes.
    SEQUENTIAL: one compiled pass run task after task (`lax.map`): compile time and memory
      flat in k, the form for accelerators.
  """

  VMAP = "vmap"
  UNROLL = "unroll"
  CHUNKED = "chunked"
  SEQUENTIAL = "sequential"

  def __repr__(self):
    return f"Passes.{self.name}"


@dataclasses.dataclass(frozen=True)
class Strategy:
  """How a step runs its per-task backward passes (see the module docstring).

  Attributes:
    passes: a `Passes` (or its value, e.g. "unroll"), or "auto" for the backend's measured
      default (`default_strategy`).
    materialize: True: hold the k task gradients and build the method's statistics from
      them; False: stream the statistics task by task and run one weighted backward pass
      (refused, with a ValueError naming the fix, where the gradients themselves are
      needed); None: the measured default for the passes (streamed with `SEQUENTIAL` where
      the method allows it, held otherwise).
    chunk_size: passes per vmapped group with `Passes.CHUNKED`.
  """

  passes: Passes | str = AUTO
  materialize: bool | None = None
  chunk_size: int = 8

  def __post_init__(self):
    if not (isinstance(self.passes, str) and self.passes == AUTO):
      try:
        object.__setattr__(self, "passes", Passes(self.passes))
      except ValueError:
        hint = (
          f" ({self.passes!r} names {NAMES[self.passes]})"
          if isinstance(self.passes, str) and self.passes in NAMES
          else ""
        )
        raise ValueError(
          f"Unknown passes {self.passes!r}{hint}: choose one of "
          f"{tuple(p.value for p in Passes)} or 'auto'."
        ) from None
    if self.materialize is not None and not isinstance(self.materialize, bool):
      raise TypeError(f"materialize must be True, False or None, got {self.materialize!r}.")
    if (
      isinstance(self.chunk_size, bool)
      or not isinstance(self.chunk_size, int)
      or self.chunk_size < 1
    ):
      raise ValueError(f"chunk_size must be a positive integer, got {self.chunk_size!r}.")


# The names `strategy=` takes (the table of the module docstring).
NAMES: dict[str, Strategy] = {
  AUTO: Strategy(),
  "vmap": Strategy(Passes.VMAP, materialize=True),
  "unroll": Strategy(Passes.UNROLL, materialize=True),
  "chunked": Strategy(Passes.CHUNKED, materialize=True),
  "sequential": Strategy(Passes.SEQUENTIAL),
  "streaming": Strategy(Passes.UNROLL, materialize=False),
}


def default_strategy(backend: str | None = None) -> Strategy:
  """The measured default way of running the k task backward passes on a backend.

  - CPU: `Passes.UNROLL`, gradients held. A Python loop of VJPs unrolled inside the jitted
    step is the fastest on XLA:CPU; vmapped and scanned convolution backward passes lower
    badly there (CelebA network, batch 8, 40 tasks: unrolled 3.5 s, `lax.map` one at a time
    241 s; see perf/step_time.py).
  - GPU and TPU: `Passes.SEQUENTIAL`, statistics streamed wherever the method allows it. One
    compiled VJP body looped over the tasks keeps compile time and memory flat in k. On one
    H200 (CelebA network, 40 tasks, batch 256, NTKMTL n = 1): compile 2.8 s against 176 s
    for "vmap" (LS: 7.2 s), peak memory 2.2x LS against 19x, step 243 ms against 219 ms
    (the authors' PyTorch step: 724 ms).

  Args:
    backend: "cpu", "gpu", "tpu", ...; None: `jax.default_backend()`.

  Returns:
    A `Strategy` with concrete `passes` and `materialize=None` (the default for the passes).
  """
  backend = backend or jax.default_backend()
  return Strategy(Passes.UNROLL if backend == "cpu" else Passes.SEQUENTIAL)


def _needs_gradients(needs) -> bool:
  return needs is None or needs.kind == "gradients"


def resolve(
  strategy: Strategy | str = AUTO,
  needs=None,
  *,
  backend: str | None = None,
  chunk_size: int | None = None,
  name: str = "this computation",
) -> Strategy:
  """The concrete choices of `strategy` for a method's needs on a backend.

  Args:
    strategy: a `Strategy`, or one of the names of `NAMES` (a `Passes` member is its name).
    needs: the method's `method.Needs`, or None where the task gradients (the Jacobian
      rows) themselves are wanted (`kernel.task_jacobian`, `kernel.pullback_rows`).
    backend: the backend for "auto" passes; None: `jax.default_backend()`.
    chunk_size: overrides the strategy's `chunk_size` when given.
    name: what needs the strategy (a method's name), for the error messages.

  Returns:
    A `Strategy` with `passes` a `Passes` and `materialize` a bool.

  Raises:
    ValueError: for an unknown name, or `materialize=False` where the gradients themselves
      are needed.
  """
  if isinstance(strategy, str):
    if strategy not in NAMES:
      raise ValueError(
        f"Unknown strategy {strategy!r}: choose one of {tuple(NAMES)} or a "
        "ntkmtl_jax.Strategy(passes=..., materialize=...)."
      )
    strategy = NAMES[strategy]
  elif not isinstance(strategy, Strategy):
    raise TypeError(
      "strategy must be a ntkmtl_jax.Strategy or one of the names "
      f"{tuple(NAMES)}, got {type(strategy).__name__}."
    )
  passes = default_strategy(backend).passes if strategy.passes == AUTO else strategy.passes
  gradients = _needs_gradients(needs)
  materialize = strategy.materialize
  if materialize is None:
    materialize = gradients or passes is not Passes.SEQUENTIAL
  elif not materialize and gradients:
    raise ValueError(
      f"{name} needs the task gradients themselves, which materialize=False "
      "(the 'streaming' strategy) never holds at once: use "
      f"Strategy(passes={passes.value!r}, materialize=True) or one of the "
      "names 'unroll', 'vmap', 'chunked', 'sequential'."
    )
  return Strategy(passes, materialize, strategy.chunk_size if chunk_size is None else chunk_size)


# ------------------------------------------------------------------------------ passes


def unit(index, size: int, dtype) -> jax.Array:
  """The unit cotangent e_index of length `size` (`index` may be traced)."""
  return (jnp.arange(size) == index).astype(dtype)


def _same(x):
  return x


def _after(previous, cotangent):
  """`cotangent`, made to depend on `previous` through an optimisation barrier.

  XLA then runs the task backward passes one after another and can free each gradient
  before the next starts, instead of scheduling them side by side.
  """
  if previous is None:
    return cotangent
  cotangent, _ = jax.lax.optimization_barrier((cotangent, previous))
  return cotangent


def _vmapped(per_task: Callable, num: int, chunk_size: int) -> Any:
  return jax.vmap(lambda i: per_task(i, _same))(jnp.arange(num))


def _unrolled(per_task: Callable, num: int, chunk_size: int) -> Any:
  out = []
  for i in range(num):
    out.append(per_task(i, functools.partial(_after, out[-1] if out else None)))
  return jax.tree.map(lambda *xs: jnp.stack(xs), *out)


def _chunked(per_task: Callable, num: int, chunk_size: int) -> Any:
  return jax.lax.map(lambda i: per_task(i, _same), jnp.arange(num), batch_size=min(chunk_size, num))


def _sequential(per_task: Callable, num: int, chunk_size: int) -> Any:
  return jax.lax.map(lambda i: per_task(i, _same), jnp.arange(num))


# The function that runs the passes of each `Passes` (the implementation table).
RUNNERS: dict[Passes, Callable] = {
  Passes.VMAP: _vmapped,
  Passes.UNROLL: _unrolled,
  Passes.CHUNKED: _chunked,
  Passes.SEQUENTIAL: _sequential,
}


def run_passes(strategy: Strategy, per_task: Callable, num: int) -> Any:
  """`[per_task(i, after) for i < num]`, stacked on axis 0, looped as `strategy.passes` says.

  Args:
    strategy: a resolved `Strategy` (see `resolve`).
    per_task: `per_task(i, after) -> pytree`, with `i` a Python int (`UNROLL`) or a traced
      int32 scalar (build cotangents with `unit`). `after(cotangent)` returns the cotangent
      made to wait on the previous task's result with `UNROLL` (the identity otherwise):
      pass the cotangents through it to run the tasks strictly one after another.
    num: the number of tasks (or rows).

  Returns:
    The results stacked on a leading axis of size `num`.
  """
  if strategy.passes == AUTO:
    raise ValueError("run_passes takes a resolved strategy: call strategy.resolve first.")
  return RUNNERS[strategy.passes](per_task, num, strategy.chunk_size)
