"""Optional dependencies: imported where they are used, with one message naming the extra.

`pip install -e .` in a checkout gives the library (kernels, weightings, the train step, the
loop); the built-in demo data, the plots, the paper's pipelines and the notebooks need extras
(`pip install -e '.[data]'`; `pip install 'ntkmtl-jax[data]'` once the package is on PyPI).
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ImportError):
  """An optional dependency is not installed; the message names the extra that brings it."""

  def __init__(self, module: str, extra: str, purpose: str = ""):
    self.module = module
    self.extra = extra
    for_what = f" for {purpose}" if purpose else ""
    super().__init__(
      f"{module} is needed{for_what}: install the {extra!r} extra (pip install -e '.[{extra}]' "
      "in the ntkmtl-jax checkout)",
      name=module,
    )


def require(module: str, extra: str, purpose: str = "") -> ModuleType:
  """Imports `module`, or raises `MissingExtraError` naming the extra that installs it.

  Args:
    module: the dotted module name, e.g. "sklearn.datasets".
    extra: the ntkmtl-jax extra that installs it, e.g. "data".
    purpose: what it is needed for, shown in the message (optional).

  Returns:
    The imported module.

  Raises:
    MissingExtraError: `module` (or its top-level package) is not installed. An ImportError
      raised while importing an installed package is not caught: it is a real failure.
  """
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as error:
    top = module.split(".")[0]
    if error.name is not None and error.name.split(".")[0] != top:
      raise  # The package is there but one of its own dependencies is not.
    raise MissingExtraError(top, extra, purpose) from error
