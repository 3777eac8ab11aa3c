"""The spectra notebook runs headless and its own assertion cells pass.

A copy of notebooks/ntk_spectra.ipynb is executed in a temporary directory with nbclient, so
the committed notebook (and its rendered outputs) is never touched.
"""

import pathlib
import shutil

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "ntk_spectra.ipynb"


def test_spectra_notebook_executes(tmp_path):
  copy = tmp_path / NOTEBOOK.name
  shutil.copy(NOTEBOOK, copy)
  notebook = nbformat.read(copy, as_version=4)
  assert any(cell.cell_type == "code" and "assert" in cell.source for cell in notebook.cells)
  client = nbclient.NotebookClient(
    notebook, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
  )
  client.execute()  # raises CellExecutionError on a failing cell (an assertion included)
  errors = [
    out
    for cell in notebook.cells
    if cell.cell_type == "code"
    for out in cell.get("outputs", [])
    if out.get("output_type") == "error"
  ]
  assert not errors, errors
  images = [
    out
    for cell in notebook.cells
    if cell.cell_type == "code"
    for out in cell.get("outputs", [])
    if "image/png" in out.get("data", {})
  ]
  assert len(images) >= 4, "the notebook's plots were not rendered"
