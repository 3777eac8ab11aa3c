"""What a run leaves behind: its per-step `History` and its `RunResult`, and how to read them.

result = ntkmtl_jax.loop.fit(bench, config)
result.metrics           # test metrics of the selected model
result.history.losses    # (T, k)
skip_report(result)      # None, or why most steps were skipped
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ntkmtl_jax.io import jsonable

PyTree = Any


@dataclasses.dataclass
class History:
  """What happened during one run, as NumPy arrays (T steps taken, k tasks).

  Attributes:
    steps: (T,) step numbers 1..T.
    losses: (T, k) training losses of each task on each step's batch.
    weights: (T, k) the method's task weights at each step.
    grad_norm: (T,) norm of the aggregated shared update.
    eigen_steps: (E,) steps at which `eigenvalues` were recorded.
    eigenvalues: (E, k) lambda_i, the largest eigenvalue of task i's NTK block over the
      shared parameters (for n = 1, ||g_i||^2): from the train step for NTKMTL, or from a
      separate probe every `probe_every` steps for the other methods.
    eigen_source: "step", "probe" or "" (none recorded).
    skip_cause: (T,) why each step was skipped: 0 applied, 1 non-finite losses, 2 non-finite
      update from the method, 3 non-finite new parameters or optimiser/method/model state.
  """

  steps: np.ndarray
  losses: np.ndarray
  weights: np.ndarray
  grad_norm: np.ndarray
  eigen_steps: np.ndarray
  eigenvalues: np.ndarray
  eigen_source: str = ""
  skip_cause: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))

  def to_dict(self) -> dict:
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in out.items()}

  @classmethod
  def from_dict(cls, d: dict) -> History:
    return cls(
      **{
        f.name: (
          np.asarray(d.get(f.name, ()), np.float64) if f.name != "eigen_source" else d[f.name]
        )
        for f in dataclasses.fields(cls)
      }
    )


# What `History.skip_cause` codes mean (0: the step was applied).
SKIP_CAUSES = {1: "losses", 2: "update", 3: "state"}
# A run that skipped more than this fraction of its steps did not train: `skip_report` says so.
MAX_SKIPPED_FRACTION = 0.5


def skip_report(result: RunResult, max_fraction: float = MAX_SKIPPED_FRACTION) -> str | None:
  """One line saying that `result` skipped most of its steps and why, or None if it trained."""
  if not result.steps or result.skipped <= max_fraction * result.steps:
    return None
  causes = ", ".join(
    f"non-finite {name}: {count}" for name, count in result.skipped_by_cause.items() if count
  )
  return (
    f"{result.method} seed {result.seed} skipped {result.skipped} of its {result.steps} "
    f"steps ({causes}), so it did not train as configured. Check the learning rate, the "
    "method's hyper-parameters and the data for NaN/inf."
  )


@dataclasses.dataclass
class RunResult:
  """The record of one run.

  Attributes:
    method: the method's registry name.
    seed: the seed (parameter init and batch order).
    hparams: the hyper-parameters given to the method.
    metrics: test metrics of the selected model (the final one without a validation
      split; with `Config.selection="last_epochs"` the mean over the last epochs); {} when
      no step was taken.
    wall_time: seconds for the run, compilation and evaluation included.
    steps: the number of steps taken.
    skipped: steps skipped because something came out non-finite (`skipped_by_cause`).
    interrupted: whether the run was stopped (Ctrl-C, SIGTERM) before its end.
    stop_signal: the signal that stopped it ("SIGINT" or "SIGTERM"; None: not stopped).
    changes_on_resume: the settings that resumes changed (`loop.RunState.changes_on_resume`).
    history: the `History`.
    val_metrics: validation metrics of the selected model (None without validation).
    best_epoch: the epoch of the selected model (None without validation).
    evaluations: one entry per evaluation: epoch, step, val and score (with a validation
      split), test (when that model became the best, or is one of the reported epochs).
    protocol: the run's `Config.protocol` ("ours" or "official").
    selection: the run's `Config.selection` (how `metrics` was chosen).
    step_time_s: median wall time of a train step after the first two.
    params, model_state: the final parameters and model state (not serialised).
  """

  method: str
  seed: int
  hparams: dict
  metrics: dict
  wall_time: float
  steps: int
  skipped: int
  interrupted: bool
  history: History
  stop_signal: str | None = None
  changes_on_resume: list = dataclasses.field(default_factory=list)
  val_metrics: dict | None = None
  best_epoch: int | None = None
  evaluations: list = dataclasses.field(default_factory=list)
  protocol: str = "ours"
  selection: str = "best"
  step_time_s: float | None = None
  params: PyTree = None
  model_state: PyTree = None

  @property
  def skipped_by_cause(self) -> dict:
    """Skipped steps per cause: non-finite `losses`, `update` (the method's) or `state`
    (new parameters, optimiser, method or model state)."""
    cause = np.asarray(self.history.skip_cause)
    return {name: int(np.sum(cause == code)) for code, name in SKIP_CAUSES.items()}

  @property
  def last_losses(self) -> np.ndarray:
    """The task losses of the last step ((k,), empty before the first)."""
    return self.history.losses[-1] if len(self.history.losses) else np.zeros(0)

  def to_dict(self, with_history: bool = True) -> dict:
    out = dict(
      method=self.method,
      seed=self.seed,
      hparams=jsonable(self.hparams),
      metrics=self.metrics,
      wall_time=self.wall_time,
      steps=self.steps,
      skipped=self.skipped,
      skipped_by_cause=self.skipped_by_cause,
      interrupted=self.interrupted,
      stop_signal=self.stop_signal,
      changes_on_resume=self.changes_on_resume,
      val_metrics=self.val_metrics,
      best_epoch=self.best_epoch,
      evaluations=self.evaluations,
      protocol=self.protocol,
      selection=self.selection,
      step_time_s=self.step_time_s,
    )
    if with_history:
      out["history"] = self.history.to_dict()
    return out

  @classmethod
  def from_dict(cls, d: dict) -> RunResult:
    return cls(
      method=d["method"],
      seed=d["seed"],
      hparams=d["hparams"],
      metrics=d["metrics"],
      wall_time=d["wall_time"],
      steps=d["steps"],
      skipped=d["skipped"],
      interrupted=d["interrupted"],
      history=History.from_dict(d["history"]),
      stop_signal=d.get("stop_signal"),
      changes_on_resume=d.get("changes_on_resume", []),
      val_metrics=d.get("val_metrics"),
      best_epoch=d.get("best_epoch"),
      evaluations=d.get("evaluations", []),
      protocol=d.get("protocol", "ours"),
      selection=d.get("selection", "best"),
      step_time_s=d.get("step_time_s"),
    )
