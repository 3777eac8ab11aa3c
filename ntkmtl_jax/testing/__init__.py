"""Hard cases and independent references for checking multi-task methods.

`cases` draws the task Jacobians on which multi-task methods go wrong (task scales from 1 to
1e4, nearly collinear or opposite gradients, a zero or duplicated gradient, more tasks than
directions); `references` solves each method's problem on them with NumPy and SciPy, by
other algorithms than the library's. The test suite and `perf/solver_accuracy.py`
use both; so can a method of your own.
"""

from ntkmtl_jax.testing import cases, references
from ntkmtl_jax.testing.cases import FAMILIES, HardCase, hard_cases, make_case, relative_error

__all__ = [
  "FAMILIES",
  "HardCase",
  "cases",
  "hard_cases",
  "make_case",
  "references",
  "relative_error",
]
