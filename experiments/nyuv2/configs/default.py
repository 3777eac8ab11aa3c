"""NYUv2: the official hyper-parameters (Adam 1e-4, StepLR(100, 0.5), batch 2, 200 epochs,
augmentation on; NTKMTL exponent 0.75 as the NYUv2 run script, NTKMTL-SR with n = 2) and
the paper's Table 1 rows."""

from experiments.common import Config

METRICS = ("mIoU", "pix acc", "abs err", "rel err", "mean angle", "median angle", "<11.25",
           "<22.5", "<30")
HIGHER_IS_BETTER = (True, True, False, False, False, False, True, True, True)
STL = (38.30, 63.76, 0.6754, 0.2780, 25.01, 19.21, 30.14, 57.20, 69.15)
PAPER_ROWS = {
    "ls": (39.29, 65.33, 0.5493, 0.2263, 28.15, 23.96, 22.09, 47.50, 61.08),
    "famo": (38.88, 64.90, 0.5474, 0.2194, 25.06, 19.57, 29.21, 56.61, 68.98),
    "fairgrad": (39.74, 66.01, 0.5377, 0.2236, 24.84, 19.60, 29.26, 56.58, 69.16),
    "nash_mtl": (40.13, 65.93, 0.5261, 0.2171, 25.26, 20.08, 28.40, 55.47, 68.15),
    "ntkmtl": (39.68, 65.43, 0.5296, 0.2168, 24.24, 18.63, 30.74, 58.72, 70.78),
    "ntkmtl_sr": (40.23, 65.28, 0.5261, 0.2136, 24.88, 19.58, 29.53, 56.67, 69.08),
}
PAPER_DELTA_M = {"ls": 5.59, "famo": -4.10, "fairgrad": -4.66, "nash_mtl": -4.04,
                 "ntkmtl": -6.99, "ntkmtl_sr": -5.35}


def get_config() -> Config:
  return Config(
      benchmark="nyuv2",
      method="ls",
      method_hparams={"ntkmtl": {"exponent": 0.75}, "ntkmtl_sr": {"num_chunks": 2}},
      learning_rate=1e-4,
      batch_size=2,
      num_epochs=200,
      lr_schedule="step",
      lr_step_size=100,
      lr_gamma=0.5,
      max_grad_norm=1.0,
      eval_batch_size=2,
      data=dict(augment=True),
      model=dict(filters=(64, 128, 256, 512, 512)),
      metric_names=METRICS,
      higher_is_better=HIGHER_IS_BETTER,
      metric_tasks=(0, 0, 1, 1, 2, 2, 2, 2, 2),
      stl_row=STL,
      paper_rows=PAPER_ROWS,
  )
