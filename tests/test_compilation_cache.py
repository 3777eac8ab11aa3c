"""The persistent compilation cache: where it goes, and that a second process reads it."""

import json
import os
import subprocess
import sys
import textwrap

from ntkmtl_jax import compilation_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_directory_order(monkeypatch, tmp_path):
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.delenv("NTKMTL_CACHE_DIR", raising=False)
  monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
  assert compilation_cache.default_directory() == str(
    tmp_path / "home" / ".cache" / "ntkmtl-jax" / "xla"
  )
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compilation_cache.default_directory() == str(tmp_path / "xdg" / "ntkmtl-jax" / "xla")
  monkeypatch.setenv("NTKMTL_CACHE_DIR", str(tmp_path / "mine"))
  assert compilation_cache.default_directory() == str(tmp_path / "mine")


# Runs in a fresh process: enable the cache (twice: idempotent), compile a small multi-task
# step, and report what jax read from the cache.
CHILD = textwrap.dedent("""
    import json, jax, jax.numpy as jnp
    from ntkmtl_jax import compilation_cache
    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None)
    # Something compiled before enable(): the cache must still take effect afterwards.
    jax.jit(lambda x: x + 1)(1.0).block_until_ready()
    path = compilation_cache.enable(min_compile_time_secs=0.0)
    assert compilation_cache.enable(min_compile_time_secs=0.0) == path
    assert compilation_cache.directory() == path

    def task_losses(w, x, y):
      return jnp.mean((jnp.tanh(x @ w[0]) @ w[1] - y) ** 2, axis=0)

    @jax.jit
    def step(w, x, y):
      jac = jax.jacrev(task_losses)(w, x, y)
      flat = jnp.concatenate([jac[0].reshape(3, -1), jac[1].reshape(3, -1)], axis=1)
      weights = jnp.sqrt(jnp.sum(flat ** 2) / jnp.sum(flat ** 2, axis=1))
      return [p - 0.1 * jnp.tensordot(weights, g, axes=1) for p, g in zip(w, jac)]

    w = [jnp.ones((4, 8)) * 0.1, jnp.ones((8, 3)) * 0.1]
    out = step(w, jnp.ones((16, 4)), jnp.zeros((16, 3)))
    jax.block_until_ready(out)
    print(json.dumps({"path": path, "hits": len(hits)}))
""")


def test_second_process_reads_the_first_ones_entries(tmp_path):
  folder = tmp_path / "cache"
  env = dict(
    os.environ,
    NTKMTL_CACHE_DIR=str(folder),
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
  )
  runs = []
  for _ in range(2):
    out = subprocess.run(
      [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-3000:]
    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if len(runs) == 1:
      entries = sorted(os.listdir(folder))
      assert entries, "the first process wrote nothing to the cache"
  assert runs[0]["path"] == runs[1]["path"] == str(folder)
  assert runs[0]["hits"] == 0
  assert runs[1]["hits"] >= 1
  assert sorted(os.listdir(folder)) == entries  # read, not compiled and written again
