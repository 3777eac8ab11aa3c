"""Cityscapes: the official hyper-parameters (Adam 1e-4, StepLR(100, 0.5), batch 8, 200
epochs, augmentation on; NTKMTL exponent 0.5, NTKMTL-SR n = 4) and the paper's Table 7
rows."""

from experiments.common import Config

METRICS = ("mIoU", "pix acc", "abs err", "rel err")
HIGHER_IS_BETTER = (True, True, False, False)
STL = (74.01, 93.16, 0.0125, 27.77)
PAPER_ROWS = {
    "ls": (75.18, 93.49, 0.0155, 46.77),
    "famo": (74.54, 93.29, 0.0145, 32.59),
    "fairgrad": (75.72, 93.68, 0.0134, 32.25),
    "nash_mtl": (75.41, 93.66, 0.0129, 35.02),
    "ntkmtl": (73.71, 92.71, 0.0136, 27.21),
    "ntkmtl_sr": (72.58, 92.93, 0.0124, 31.65),
}
PAPER_DELTA_M = {"ls": 22.60, "famo": 8.13, "fairgrad": 5.18, "nash_mtl": 6.82,
                 "ntkmtl": 1.92, "ntkmtl_sr": 3.84}


def get_config() -> Config:
  return Config(
      benchmark="cityscapes",
      method="ls",
      method_hparams={"ntkmtl": {"exponent": 0.5}, "ntkmtl_sr": {"num_chunks": 4}},
      learning_rate=1e-4,
      batch_size=8,
      num_epochs=200,
      lr_schedule="step",
      lr_step_size=100,
      lr_gamma=0.5,
      max_grad_norm=1.0,
      eval_batch_size=8,
      data=dict(augment=True),
      model=dict(filters=(64, 128, 256, 512, 512)),
      metric_names=METRICS,
      higher_is_better=HIGHER_IS_BETTER,
      metric_tasks=(0, 0, 1, 1),
      stl_row=STL,
      paper_rows=PAPER_ROWS,
  )
