"""The installed package stands alone: it imports nothing outside itself but the standard
library and the distributions its pyproject.toml declares (core and extras), and it has no
import cycle between its modules at import time."""

from __future__ import annotations

import ast
import os
import pathlib
import re
import subprocess
import sys

import ntkmtl_jax

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
