"""The settings of one run (`Config`): a leaf that every other module may import.

    config = ntkmtl_jax.benchmarks.get_config("qm9", preset="tiny")
    config.replace(method="ntkmtl_sr", seed=1)

A `Config` names the benchmark (and its data and model options), the method and its
hyper-parameters, the optimiser and the protocol (epochs, schedule, evaluation batch,
checkpoint cadence). `ntkmtl_jax.loop.fit` runs one; the `ntkmtl` command builds them from
its flags (`ntkmtl_jax.cli.flags`).
"""

from __future__ import annotations

import dataclasses
import json
import math

from ntkmtl_jax._names import canonical

SCHEDULES = ("constant", "cosine", "step", "plateau")
OPTIMIZERS = ("adam", "adamw", "sgd")
PROTOCOLS = ("ours", "official")
# Settings a resumed run may change (recorded in results.json): how long it runs, where the
# data live, how often it reports, probes eigenvalues (an observation outside the step: the
# training is the same) and checkpoints. Every other field defines the run.
RESUMABLE = frozenset(
  {
    "num_epochs",
    "max_steps",
    "data_dir",
    "log_every",
    "probe_every",
    "checkpoint_every",
    "checkpoint_min_interval",
    "prefetch",
  }
)
SELECTIONS = ("best", "best_or_later", "last_epochs")


@dataclasses.dataclass
class Config:
  """The settings of one run: benchmark options, method, optimiser and protocol.

  Attributes:
    benchmark: the benchmark's registry name.
    data_dir: where the benchmark's data lives (tfds data_dir or the MTAN `.npy` root).
    data: the benchmark's data options (image size, split sizes, ...).
    model: the benchmark's model options (widths, ...).
    method: a name from `ntkmtl_jax.methods.names()`, with its registered defaults (the
      published code's: "ntkmtl" is the official step, NTKMTL scaled by k with plain head
      gradients; gradient methods get the shared clip of `max_grad_norm`).
    method_hparams: per method, the published hyper-parameters used on this benchmark.
    hparams: hyper-parameters of this run's method (override `method_hparams`).
    optimizer: one of `OPTIMIZERS` (or give `fit` any optax transformation).
    learning_rate: the optimiser's base learning rate.
    weight_decay: decoupled weight decay for "adamw".
    batch_size: training batch size.
    num_epochs: epochs to run (None: as many as `max_steps` needs).
    max_steps: stop after this many train steps (None: run all epochs).
    lr_schedule: "constant", "cosine" (per epoch, to 0 at the end), "step" (times
      `lr_gamma` every `lr_step_size` epochs) or "plateau" (times `plateau_factor` when the
      validation score has not improved for `plateau_patience` epochs, not below
      `plateau_min_lr`).
    plateau_threshold: the plateau schedule's improvement threshold, as PyTorch's
      `ReduceLROnPlateau(mode="min", threshold_mode="rel")` applies it to the minimised
      quantity (-score): an epoch improves when -score < -best * (1 - threshold); 0: any
      strict improvement (torch's default is 1e-4).
    max_grad_norm: global-norm clip of the shared update for gradient-based methods (None:
      no clipping). That is what the NTKMTL and FairGrad repositories do for NTKMTL and
      FairGrad (inside their own backward passes) and the original nash-mtl repository for
      Nash-MTL; the NTKMTL and FAMO repositories' other gradient methods (MGDA, IMTL-G,
      their Nash-MTL, ...) call the clip before the backward pass, where it does nothing,
      and so run unclipped there. Loss-weighting methods are not clipped, as in those
      repositories.
    eval_batch_size: batch of the evaluation passes.
    protocol: "ours" or "official": which protocol the benchmark's default run follows
      (`benchmarks.get_config(name, protocol=...)`; see experiments/README.md). Set by the
      benchmark; the fields below carry what it changes in the loop.
    selection: how the reported model is chosen: "best" (the epoch with the best validation
      score, the first of equal ones), "best_or_later" (the same, a later equal score
      replacing an earlier one: the `<=` of the authors' QM9 trainer) or "last_epochs" (no
      selection: the test metrics of each of the last `report_epochs` epochs, averaged, as
      the MTAN code family reports NYUv2 and Cityscapes). Without a validation split "best"
      reports the final model.
    report_epochs: epochs averaged by `selection="last_epochs"`.
    drop_last: drop each epoch's last partial training batch (fixed shapes: one compiled
      step); False keeps it, as PyTorch's DataLoader does by default (one more compilation
      for its shape).
    probe_every: for methods whose step does not produce the shared-parameter eigenvalues,
      compute lambda_i = ||g_i||^2 every `probe_every` steps outside the step (0: never).
    task_passes: how the task backward passes loop: "auto" (the backend's measured
      default), "vmap", "unroll", "chunked" or "sequential" (`ntkmtl_jax.strategy.Passes`).
    materialize: whether the k task gradients are held together (True), or only their
      statistics streamed task by task before one weighted backward pass (False); None: the
      backend's measured default (`ntkmtl_jax.strategy.Strategy`).
    seed: seeds the parameters and the order of the batches.
    init_prng: the random-number generator of the parameter initialisation (a
      `jax.random.key` impl); the paper benchmarks use "rbg": on XLA:CPU, initialising a
      network of a hundred layers with threefry keys spends tens of seconds compiling
      random-number code.
    prefetch: training batches loaded ahead on a background thread while the jitted step
      runs (`ntkmtl_jax.data.splits.prefetch`; 0: each batch is loaded when the loop asks).
      The batches are the same either way.
    log_every: steps between progress-bar refreshes (and host transfers of the metrics).
    checkpoint_every: with a workdir, also checkpoint every this many steps (0: at epoch
      ends and where `max_steps` stops the run only).
    checkpoint_min_interval: with a workdir, skip an epoch-end checkpoint when the last one
      is younger than this many seconds (0: every epoch end); where the run stops, Ctrl-C and
      `checkpoint_every` always save. Short runs of many tiny epochs (the offline
      benchmarks) then save once instead of at every epoch end.
  """

  benchmark: str = ""
  data_dir: str | None = None
  data: dict = dataclasses.field(default_factory=dict)
  model: dict = dataclasses.field(default_factory=dict)
  method: str = "ls"
  method_hparams: dict = dataclasses.field(default_factory=dict)
  hparams: dict = dataclasses.field(default_factory=dict)
  optimizer: str = "adam"
  learning_rate: float = 1e-3
  weight_decay: float = 0.0
  batch_size: int = 32
  num_epochs: int | None = 1
  max_steps: int | None = None
  lr_schedule: str = "constant"
  lr_step_size: int = 100
  lr_gamma: float = 0.5
  plateau_factor: float = 0.7
  plateau_patience: int = 10
  plateau_min_lr: float = 1e-5
  plateau_threshold: float = 0.0
  max_grad_norm: float | None = 1.0
  eval_batch_size: int = 64
  protocol: str = "ours"
  selection: str = "best"
  report_epochs: int = 10
  drop_last: bool = True
  probe_every: int = 0
  task_passes: str = "auto"
  materialize: bool | None = None
  seed: int = 0
  init_prng: str = "threefry2x32"
  prefetch: int = 2
  log_every: int = 50
  checkpoint_every: int = 0
  checkpoint_min_interval: float = 0.0

  def __post_init__(self):
    for field, value, allowed in (
      ("protocol", self.protocol, PROTOCOLS),
      ("selection", self.selection, SELECTIONS),
    ):
      if value not in allowed:
        raise ValueError(f"Config: {field}={value!r}; choose one of {', '.join(allowed)}.")

    def finite(x):
      return isinstance(x, (int, float)) and math.isfinite(x)

    checks = (
      ("learning_rate", finite(self.learning_rate) and self.learning_rate > 0, "> 0 and finite"),
      ("weight_decay", finite(self.weight_decay) and self.weight_decay >= 0, ">= 0 and finite"),
      ("seed", isinstance(self.seed, int) and self.seed >= 0, "an integer >= 0"),
      ("batch_size", isinstance(self.batch_size, int) and self.batch_size >= 1, "an integer >= 1"),
      ("eval_batch_size", int(self.eval_batch_size) >= 1, ">= 1"),
      (
        "max_grad_norm",
        self.max_grad_norm is None or (finite(self.max_grad_norm) and self.max_grad_norm > 0),
        "None (no clipping) or > 0",
      ),
      ("probe_every", int(self.probe_every) >= 0, ">= 0"),
      ("log_every", int(self.log_every) >= 1, ">= 1"),
      ("checkpoint_every", int(self.checkpoint_every) >= 0, ">= 0"),
    )
    for field, ok, rule in checks:
      if not ok:
        raise ValueError(f"Config: {field}={getattr(self, field)!r}; it must be {rule}.")
    if int(self.report_epochs) < 1:
      raise ValueError(f"Config: report_epochs={self.report_epochs}; it must be at least 1.")
    if int(self.prefetch) < 0:
      raise ValueError(f"Config: prefetch={self.prefetch}; it must be >= 0 (0: no prefetching).")
    if self.plateau_threshold < 0:
      raise ValueError(
        f"Config: plateau_threshold={self.plateau_threshold}; it must be >= 0 (torch: 1e-4)."
      )

  def fingerprint(self) -> dict:
    """Every setting of the run, as JSON reads it back (tuples as lists): what a resume
    checks (`RESUMABLE` fields may differ)."""
    return json.loads(json.dumps(dataclasses.asdict(self), default=list))

  def replace(self, **changes) -> Config:
    return dataclasses.replace(self, **changes)

  @property
  def method_key(self) -> str:
    """The method's registry name ("NTKMTL-SR" -> "ntkmtl_sr")."""
    return canonical(self.method)

  def method_hyperparameters(self) -> dict:
    """The published hyper-parameters of the method, overridden by `hparams`."""
    return {**self.method_hparams.get(self.method_key, {}), **self.hparams}

  def run_length(self, steps_per_epoch: int) -> tuple[int, int]:
    """(epochs, steps) of the run, given the batches in one epoch."""
    if self.num_epochs is None and self.max_steps is None:
      raise ValueError("Config: set num_epochs or max_steps (or both).")
    epochs = (
      self.num_epochs
      if self.num_epochs is not None
      else math.ceil(self.max_steps / steps_per_epoch)
    )
    steps = epochs * steps_per_epoch
    return epochs, steps if self.max_steps is None else min(steps, self.max_steps)
