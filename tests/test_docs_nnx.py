"""Every python code block of docs/nnx.md runs as written (each on its own, in a fresh
namespace, so any one of them can be pasted alone)."""

from __future__ import annotations

import os
import re

import pytest

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "nnx.md")


def _python_blocks(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    return re.findall(r"^```python\n(.*?)^```", f.read(), flags=re.S | re.M)


def test_doc_has_the_three_examples():
  assert len(_python_blocks(DOC)) == 3


@pytest.mark.parametrize("index", range(3))
def test_doc_block_runs(index, capsys):
  code = _python_blocks(DOC)[index]
  exec(compile(code, f"{DOC}[block {index}]", "exec"), {"__name__": "docs_nnx"})
  assert capsys.readouterr().out.strip()  # each example prints what it trained
