"""The hard cases of multi-task optimisation: task Jacobians where the tasks are imbalanced,
nearly agree, nearly cancel, vanish, repeat or span fewer dimensions than there are tasks.

    for case in hard_cases(ks=(3, 5), seeds=(0,)):
      case.name, case.jacobian, case.losses  # "imbalanced/k3/seed0", (3, 50), (3,)

Each case is a float64 matrix J (k, P) of shared task gradients (row i is g_i) with the task
losses that go with it. Task scales span 1 to 1e4 in every family but "mild", the control:
multi-task learning is hard exactly when one task's gradient is a thousand times another's,
and a solver whose stopping rule is absolute in the largest gradient is wrong there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

# The families, in the order `hard_cases` yields them.
FAMILIES = (
  "mild",
  "imbalanced",
  "near_collinear",
  "near_opposite",
  "zero_gradient",
  "duplicated",
  "rank_deficient",
)
NUM_TASKS = (2, 3, 5, 10, 40)
SEEDS = (0, 1, 2)
# The largest task gradient is this many times the smallest (log-spaced scales).
SCALE_RANGE = 1e4
# Angles of the near-collinear and near-opposite families: perturbations of relative size 1e-3.
PERTURBATION = 1e-3


@dataclasses.dataclass(frozen=True, eq=False)
class HardCase:
  """One hard case.

  Attributes:
    name: "<family>/k<k>/seed<seed>".
    family: one of `FAMILIES`.
    seed: the seed it was drawn from.
    jacobian: (k, P) float64, row i the shared gradient g_i of task i.
    losses: (k,) positive float64 task losses, of the size of each task's gradient (a task
      whose loss is multiplied by c has its gradient multiplied by c).
  """

  name: str
  family: str
  seed: int
  jacobian: np.ndarray
  losses: np.ndarray

  @property
  def num_tasks(self) -> int:
    return self.jacobian.shape[0]

  @property
  def gram(self) -> np.ndarray:
    """G = J J^T, float64."""
    return self.jacobian @ self.jacobian.T


def task_scales(
  rng: np.random.Generator, num_tasks: int, scale_range: float = SCALE_RANGE
) -> np.ndarray:
  """k scales log-spaced from 1 to `scale_range`, in a random order."""
  return rng.permutation(np.logspace(0.0, np.log10(scale_range), num_tasks))


def make_case(family: str, num_tasks: int, seed: int, dim: int = 50) -> HardCase:
  """The case of `family` with `num_tasks` tasks and `dim` shared parameters, from `seed`."""
  if family not in FAMILIES:
    raise ValueError(f"Unknown family {family!r}: one of {FAMILIES}.")
  if num_tasks < 2:
    raise ValueError(f"A hard case has at least 2 tasks, got {num_tasks}.")
  # Each (family, k, seed) has its own stream, so that adding a family changes no other case.
  rng = np.random.default_rng([seed, num_tasks, FAMILIES.index(family)])
  k = num_tasks
  scales = np.ones(k) if family == "mild" else task_scales(rng, k)
  directions = rng.normal(size=(k, dim))
  if family == "near_collinear":
    # One common direction, each task tilted from it by an angle of about 1e-3.
    common = rng.normal(size=dim)
    directions = common + PERTURBATION * np.linalg.norm(common) / np.sqrt(dim) * directions
  elif family == "rank_deficient":
    # Rank max(1, k // 2) < k: more tasks than independent directions, 0 often in the hull.
    rank = max(1, k // 2)
    directions = rng.normal(size=(k, rank)) @ rng.normal(size=(rank, dim))
  directions /= np.linalg.norm(directions, axis=1, keepdims=True)
  jac = directions * scales[:, None]
  if family == "near_opposite":
    # Task 1 points against task 0 (keeping its own scale), tilted by an angle of 1e-3: the
    # hull of the two passes within about 1e-3 of the smaller one from 0, not through it.
    noise = rng.normal(size=dim)
    jac[1] = scales[1] * (-directions[0] + PERTURBATION * noise / np.linalg.norm(noise))
  elif family == "zero_gradient":
    jac[0] = 0.0
  elif family == "duplicated":
    jac[1] = jac[0]
  losses = np.linalg.norm(jac, axis=1) * rng.uniform(0.5, 2.0, k)
  # A task at a stationary point still has a positive loss.
  losses = np.where(losses > 0, losses, rng.uniform(0.5, 2.0, k))
  return HardCase(f"{family}/k{k}/seed{seed}", family, seed, jac, losses)


def hard_cases(
  families: Sequence[str] = FAMILIES,
  ks: Sequence[int] = NUM_TASKS,
  seeds: Sequence[int] = SEEDS,
  dim: int = 50,
) -> Iterator[HardCase]:
  """Every case of `families` x `ks` x `seeds` (by default 7 x 5 x 3 = 105 cases)."""
  for family in families:
    for k in ks:
      for seed in seeds:
        yield make_case(family, k, seed, dim)


def relative_error(
  direction: np.ndarray, reference: np.ndarray, jacobian: np.ndarray, floor: float = 1e-6
) -> float:
  """||d - d_ref|| / max(||d_ref||, floor * max_i ||g_i||), in float64.

  Relative to the reference's own size; a reference below `floor` times the largest task
  gradient (the min-norm point of a hull that contains 0, say) counts as that size, so
  that an answer of 1e-12 times the largest gradient against an exact 0 is an error of 1e-6.
  """
  reference = np.asarray(reference, np.float64)
  scale = max(
    float(np.linalg.norm(reference)),
    floor * float(np.max(np.linalg.norm(jacobian, axis=1))),
    np.finfo(float).tiny,
  )
  return float(np.linalg.norm(np.asarray(direction, np.float64) - reference) / scale)
