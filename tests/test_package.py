"""The installed package stands alone: it imports nothing outside itself but the standard
library and the distributions its pyproject.toml declares (core and extras), and it has no
import cycle between its modules at import time."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import ntkmtl_jax

from conftest import TanhMLP, run_python

PACKAGE = pathlib.Path(ntkmtl_jax.__file__).parent
ROOT = PACKAGE.parent
# Distribution name -> the top-level module it installs, where the two differ.
IMPORT_NAMES = {
  "scikit-learn": "sklearn",
  "tensorflow-datasets": "tensorflow_datasets",
  "orbax-checkpoint": "orbax",
  "pillow": "PIL",
  "jaxlib": "jax",
}


def _declared_modules() -> set[str]:
  text = (ROOT / "pyproject.toml").read_text()
  core = re.search(r"^dependencies = \[(.*?)\]", text, re.M | re.S).group(1)
  extras = text.split("[project.optional-dependencies]")[1].split("\n[")[0]
  names = set()
  for block in [core] + re.findall(r"^\w+ = \[(.*?)\]$", extras, re.M | re.S):
    for requirement in re.findall(r'"([A-Za-z0-9_.\-]+)', block):
      if not requirement.startswith("ntkmtl"):
        names.add(IMPORT_NAMES.get(requirement, requirement.replace("-", "_")))
  return names


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
  tree = ast.parse(path.read_text(), str(path))
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      found.append((node.lineno, node.module.split(".")[0]))
  return found


def test_the_package_imports_only_itself_the_stdlib_and_declared_dependencies():
  allowed = set(sys.stdlib_module_names) | _declared_modules() | {"ntkmtl_jax", "mujoco"}
  # An import of an uninstalled folder of the repository would work from a checkout and fail
  # from a wheel: experiments/, perf/ and tests/ are never among the allowed names.
  assert not {"experiments", "perf", "tests", "conftest"} & allowed
  stray = [
    f"{path.relative_to(ROOT)}:{line} imports {name}"
    for path in sorted(PACKAGE.rglob("*.py"))
    for line, name in _imports(path)
    if name not in allowed
  ]
  assert not stray, "\n".join(stray)


def _module_name(path: pathlib.Path) -> str:
  return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _module_level_imports(path: pathlib.Path) -> set[str]:
  """The package's modules that `path` imports when it is imported (not inside functions)."""
  tree = ast.parse(path.read_text(), str(path))
  found = set()
  for node in tree.body:
    if (
      isinstance(node, ast.ImportFrom)
      and node.level == 0
      and node.module
      and node.module.startswith("ntkmtl_jax")
    ):
      found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
    elif isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.startswith("ntkmtl_jax")}
  return found


def test_no_import_cycle_between_modules():
  """The module-level import graph is acyclic, apart from a package's __init__ importing its
  own submodules to register them (methods, benchmarks): `benchmarks` never imports the loop
  that runs it, the config imports nothing of the package but its names."""
  modules = {_module_name(p): p for p in PACKAGE.rglob("*.py") if p.name != "__main__.py"}
  graph = {}
  for name, path in modules.items():
    targets = {t for t in _module_level_imports(path) if t in modules and t != name}
    if path.name == "__init__.py":
      targets = {t for t in targets if not t.startswith(name + ".")}
    graph[name] = targets
  assert graph["ntkmtl_jax.config"] <= {"ntkmtl_jax._names"}
  state, cycles = {}, []

  def visit(node, trail):
    state[node] = "open"
    for target in sorted(graph[node]):
      if state.get(target) == "open":
        cycles.append(" -> ".join(trail[trail.index(target) :] + [target]))
      elif target not in state:
        visit(target, trail + [target])
    state[node] = "done"

  for name in sorted(graph):
    if name not in state:
      visit(name, [name])
  assert not cycles, "\n".join(cycles)


def test_every_module_imports_from_outside_the_repository(tmp_path):
  """Every module imports in an interpreter whose working directory is not the repository,
  so no uninstalled folder (experiments/, perf/, tests/) is importable."""
  names = sorted(_module_name(p) for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")
  script = "import importlib, sys\nfor name in sys.argv[1:]:\n  importlib.import_module(name)\n"
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, "-c", script, *names],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr


def _aggregator_outputs(aggregator_class, method, params, task_grads, losses):
  """init/update of `method` wrapped in `aggregator_class`, bare and first in an optax chain
  that passes the losses along (chain forwards extra arguments to extra-args transforms)."""
  import optax

  bare = aggregator_class(method.init, method.update)
  key = jax.random.key(0)
  chain = optax.chain(bare, optax.adam(1e-2))
  outputs = []
  for tx in (bare, chain):
    state = tx.init(params)
    step = jax.jit(lambda g, s, tx=tx: tx.update(g, s, params, losses=losses, key=key))
    for _ in range(2):  # a second step reads the state the first one wrote
      update, state = step(task_grads, state)
      outputs.append((update, state))
  return outputs


@pytest.mark.one_seed
@pytest.mark.parametrize("name", ["ntkmtl", "pcgrad"])  # a Weighting and a GradientRule
def test_local_aggregator_behaves_like_optax_aggregator(seed, name):
  """Where optax has `optax.experimental.aggregating.Aggregator` (0.2.7+), the class used on
  older optax gives the same init/update outputs, bit for bit, bare and in an optax.chain, on
  task gradients of scales 1 to 1e4 with one task's gradient zero."""
  import optax

  aggregating = getattr(pytest.importorskip("optax.experimental"), "aggregating", None)
  if aggregating is None:
    pytest.skip("this optax has no optax.experimental.aggregating (added in 0.2.7)")

  from ntkmtl_jax import _optax_compat

  local = _optax_compat.LocalAggregator
  assert _optax_compat.Aggregator is aggregating.Aggregator  # optax's own where it exists
  assert type(ntkmtl_jax.ntkmtl(2).aggregator) is aggregating.Aggregator
  assert local.__name__ == aggregating.Aggregator.__name__ == "Aggregator"
  assert local.__mro__[1] is optax.GradientTransformationExtraArgs
  assert aggregating.Aggregator.__mro__[1] is optax.GradientTransformationExtraArgs
  assert local._fields == aggregating.Aggregator._fields
  rng = np.random.default_rng(seed)
  k = 3
  model = TanhMLP(rng, num_tasks=k, task_scales=[1.0, 1e2, 1e4])
  task_grads = jax.jacrev(model.loss_fn)(model.params, model.batch)
  task_grads = jax.tree.map(lambda g: g.at[0].set(0.0), task_grads)  # task 0: zero gradient
  losses = model.loss_fn(model.params, model.batch)
  method = ntkmtl_jax.methods.get(name, k, shared=model.shared)
  expected = _aggregator_outputs(aggregating.Aggregator, method, model.params, task_grads, losses)
  actual = _aggregator_outputs(local, method, model.params, task_grads, losses)
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(expected[-1][0]))


def test_methods_aggregate_without_optax_experimental():
  """On an optax without `optax.experimental.aggregating` (before 0.2.7, e.g. Colab's 0.2.5)
  `method.aggregator` is the local class, and its update is the method's own."""
  script = """
import json, sys
import jax, jax.numpy as jnp, numpy as np, optax
try:  # `from optax.experimental import aggregating` fails, as on optax < 0.2.7
  import optax.experimental
  del optax.experimental.aggregating
except (ImportError, AttributeError):
  pass
sys.modules["optax.experimental.aggregating"] = None
import ntkmtl_jax as nm
from ntkmtl_jax import _optax_compat
method = nm.ntkmtl(2, shared=lambda p: {"w": True, "h": False})
agg = method.aggregator
assert type(agg) is _optax_compat.LocalAggregator, type(agg)
assert isinstance(agg, optax.GradientTransformationExtraArgs)
params = {"w": jnp.ones(3), "h": jnp.ones(2)}
grads = {"w": jnp.array([[3.0, 0.0, 4.0], [0.0, 1.0, 0.0]]), "h": jnp.ones((2, 2))}
update, _ = jax.jit(agg.update)(grads, agg.init(params), params)
direct, _ = method.update(grads, method.init(params), params)
print(json.dumps({k: [np.asarray(t[k]).tolist() for t in (update, direct)] for k in update}))
"""
  result = run_python(["-c", script], JAX_PLATFORMS="cpu")
  assert result.returncode == 0, result.stderr
  out = {k: np.array(v) for k, v in json.loads(result.stdout.splitlines()[-1]).items()}
  np.testing.assert_array_equal(out["w"][0], out["w"][1])
  np.testing.assert_array_equal(out["h"][0], out["h"][1])
  # NTKMTL weights task i by (sum_j ||g_j||^2 / ||g_i||^2) ** 0.5, squared norms 25 and 1:
  # the shared update points along g_1 / 5 + g_2 / 1; the head gets the plain sum.
  direction = np.array([3 / 5, 1.0, 4 / 5])
  cos = out["w"][0] @ direction / np.linalg.norm(out["w"][0]) / np.linalg.norm(direction)
  np.testing.assert_allclose(cos, 1.0, rtol=1e-6)
  np.testing.assert_array_equal(out["h"][0], [2.0, 2.0])
