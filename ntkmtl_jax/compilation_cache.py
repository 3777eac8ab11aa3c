"""A persistent compilation cache, so a second run skips XLA compilation of the train step.

    from ntkmtl_jax import compilation_cache
    compilation_cache.enable()          # before the first jitted call; returns the folder

Compiling a multi-task step takes seconds (tens on a GPU for the 40-task CelebA network with
k task backward passes), every time a process starts. jax can keep the compiled executables
on disk, keyed on the computation, its shapes, the jax/XLA versions, the device and the
compile options; a later process that builds the same step reads it back instead.

The folder is the first of: the `directory` argument, $NTKMTL_CACHE_DIR,
$XDG_CACHE_HOME/ntkmtl-jax/xla, ~/.cache/ntkmtl-jax/xla. jax treats the cache as trusted
(it holds executables): keep it in a folder only you can write to.
"""

from __future__ import annotations

import os

import jax
from jax.experimental.compilation_cache import compilation_cache as _jax_cache

# Computations that compile faster than this are not written: reading a file back costs
# more than compiling them. The multi-task steps take seconds.
MIN_COMPILE_TIME_SECS = 0.5
# -1: no size threshold (and jax does not substitute its own per-filesystem one).
MIN_ENTRY_SIZE_BYTES = -1


def default_directory() -> str:
  """$NTKMTL_CACHE_DIR, else $XDG_CACHE_HOME/ntkmtl-jax/xla, else ~/.cache/ntkmtl-jax/xla."""
  if os.environ.get("NTKMTL_CACHE_DIR"):
    return os.path.abspath(os.path.expanduser(os.environ["NTKMTL_CACHE_DIR"]))
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.abspath(os.path.join(base, "ntkmtl-jax", "xla"))


def enable(
  directory: str | os.PathLike | None = None,
  *,
  min_compile_time_secs: float = MIN_COMPILE_TIME_SECS,
  min_entry_size_bytes: int = MIN_ENTRY_SIZE_BYTES,
) -> str:
  """Turns on jax's persistent compilation cache in `directory`; returns the folder.

  Idempotent: calling it again with the same folder changes nothing. Call it before the
  first jitted computation; if something was compiled already, the cache is re-initialised
  so that later compilations use it.

  Args:
    directory: where the executables go (default: `default_directory()`); created if
      missing.
    min_compile_time_secs: compilations faster than this are not written.
    min_entry_size_bytes: entries smaller than this are not written (-1: no threshold).

  Returns:
    The absolute path of the cache folder.
  """
  path = (
    os.path.abspath(os.path.expanduser(os.fspath(directory)))
    if directory
    else (default_directory())
  )
  os.makedirs(path, mode=0o700, exist_ok=True)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", int(min_entry_size_bytes))
  if jax.config.jax_compilation_cache_dir != path:
    jax.config.update("jax_compilation_cache_dir", path)
    # jax decides once per process whether the cache is used (at the first compilation);
    # a reset makes a folder set after that take effect.
    _jax_cache.reset_cache()
  return path


def directory() -> str | None:
  """The folder the persistent cache uses now, or None when it is off."""
  return jax.config.jax_compilation_cache_dir
