"""The data-parallel step under jax.distributed: two CPU processes of four devices each, on
localhost, each loading its own half of the batch, give the single-process step's result."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest

import ntkmtl_jax as nm

from conftest import TanhMLP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES, LOCAL_DEVICES, BATCH, STEPS = 2, 4, 16, 3

WORKER = textwrap.dedent("""
    import json, os, sys
    process_id, port, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    import numpy as np, jax, optax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                               num_processes=%(processes)d, process_id=process_id,
                               initialization_timeout=60)
    sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
    import ntkmtl_jax as nm
    from ntkmtl_jax.sharding import data_mesh, process_rows, shard_process_batch
    from conftest import TanhMLP
    assert jax.process_count() == %(processes)d and jax.device_count() == %(devices)d
    model = TanhMLP(np.random.default_rng(seed), num_tasks=3, batch=%(batch)d)
    mesh = data_mesh()
    rows = process_rows(%(batch)d, mesh)
    local = {"x": model.x[rows].astype(np.float32), "y": model.y[rows].astype(np.float32)}
    batch = shard_process_batch(local, mesh)
    assert batch["x"].shape[0] == %(batch)d and len(batch["x"].addressable_shards) == %(local)d
    results = []
    for num_chunks in (1, 2):
      step = nm.make_train_step(model.loss_fn, nm.ntkmtl(3, num_chunks=num_chunks,
                                                         shared=model.shared),
                                optax.adam(1e-2))
      state = nm.replicate(step.init(model.params, key=jax.random.key(0)), mesh)
      for _ in range(%(steps)d):
        state, metrics = step(state, batch)
      assert np.all(np.isfinite(np.asarray(metrics["losses"])))  # replicated, readable
      results.append([np.asarray(x).tolist() for x in jax.tree.leaves(state.params)])
    print("RESULT " + json.dumps(results), flush=True)
""") % dict(
  processes=NUM_PROCESSES,
  devices=NUM_PROCESSES * LOCAL_DEVICES,
  batch=BATCH,
  local=LOCAL_DEVICES,
  steps=STEPS,
)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _single_process_results(seed):
  model = TanhMLP(np.random.default_rng(seed), num_tasks=3, batch=BATCH)
  results = []
  for num_chunks in (1, 2):
    step = nm.make_train_step(
      model.loss_fn, nm.ntkmtl(3, num_chunks=num_chunks, shared=model.shared), optax.adam(1e-2)
    )
    state = step.init(model.params, key=jax.random.key(0))
    for _ in range(STEPS):
      state, _ = step(state, model.batch)
    results.append([np.asarray(x) for x in jax.tree.leaves(state.params)])
  return results


@pytest.mark.one_seed
def test_two_processes_match_the_single_process_step(tmp_path, seed):
  if not hasattr(jax.distributed, "initialize") or not hasattr(
    jax.config, "jax_cpu_collectives_implementation"
  ):
    pytest.skip(f"jax {jax.__version__} has no CPU collectives for jax.distributed")
  path = tmp_path / "worker.py"
  path.write_text(WORKER)
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
    PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
  )
  port = _free_port()
  procs = [
    subprocess.Popen(
      [sys.executable, str(path), str(i), str(port), str(seed)],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(NUM_PROCESSES)
  ]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=240))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  for i, (p, (out, err)) in enumerate(zip(procs, outputs)):
    if p.returncode and "gloo" in err and "not" in err.lower() and "RESULT" not in out:
      pytest.skip(
        f"jax {jax.__version__} cannot run CPU collectives here: {err.strip().splitlines()[-1]}"
      )
    assert p.returncode == 0, f"process {i}:\n{out[-2000:]}\n{err[-3000:]}"
  expected = _single_process_results(seed)
  for i, (out, _) in enumerate(outputs):
    got = json.loads(out.split("RESULT ", 1)[1])
    for n, (params, want) in enumerate(zip(got, expected)):
      for a, b in zip(params, want):
        np.testing.assert_allclose(
          np.asarray(a),
          b,
          rtol=1e-5,
          atol=1e-5,
          err_msg=f"process {i}, {n + 1} chunk(s), seed={seed}",
        )
