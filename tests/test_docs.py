"""The examples people read first run: every python block of README.md and of the docs site's
getting-started page, in order, in one fresh interpreter per page; and the optional imports
of a base install stop with one line naming the extra."""

import os
import pathlib
import re

import pytest

from ntkmtl_jax import _optional

from conftest import run_python

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/getting-started.md"]
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: str) -> list[str]:
  return PYTHON_BLOCK.findall((ROOT / page).read_text(encoding="utf-8"))


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page, tmp_path):
  blocks = python_blocks(page)
  assert blocks, f"{page} has no python block"
  jax_platforms = os.environ.get("JAX_PLATFORMS", "cpu")
  out = run_python(["-c", "\n".join(blocks)], cwd=tmp_path, JAX_PLATFORMS=jax_platforms)
  assert out.returncode == 0, f"{page}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"


def test_require_names_the_extra():
  with pytest.raises(_optional.MissingExtraError) as error:
    _optional.require("no_such_module_ntkmtl.sub", "data", "the demo")
  assert isinstance(error.value, ImportError)
  assert str(error.value) == (
    "no_such_module_ntkmtl is needed for the demo: pip install 'ntkmtl-jax[data]'"
  )
  assert _optional.require("json", "data").dumps([1]) == "[1]"


def test_require_reraises_a_broken_dependency(tmp_path, monkeypatch):
  # An installed package whose own import fails is a real error, not a missing extra.
  (tmp_path / "pkg_with_broken_dep.py").write_text("import no_such_dependency_ntkmtl\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(ModuleNotFoundError) as error:
    _optional.require("pkg_with_broken_dep", "data")
  assert not isinstance(error.value, _optional.MissingExtraError)
