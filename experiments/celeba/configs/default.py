"""CelebA: the official hyper-parameters (../REFERENCE: Adam 3e-4, cosine, batch 256, 15
epochs, 64x64 images). The paper reports only MR and Delta m % for CelebA (Table 2), not
the STL row's per-attribute F1, so Delta m needs an STL row from your own runs
(`stl_row`) or STL runs in the same report."""

from experiments.celeba.input_pipeline import ATTRIBUTES
from experiments.common import Config

# Table 2 of the paper: (MR, Delta m %) per method.
PAPER_MR_DELTA_M = {
    "ls": (7.85, 4.15), "si": (9.75, 7.20), "rlw": (6.90, 1.46), "dwa": (8.72, 3.20),
    "uw": (7.38, 3.23), "mgda": (12.97, 14.85), "pcgrad": (8.53, 3.17), "cagrad": (8.10, 2.48),
    "imtl_g": (6.25, 0.84), "nash_mtl": (6.50, 2.84), "famo": (6.45, 1.21),
    "fairgrad": (6.92, 0.37), "ntkmtl": (4.35, -0.77), "ntkmtl_sr": (4.33, 0.23)}


def get_config() -> Config:
  return Config(
      benchmark="celeba",
      method="ls",
      method_hparams={"ntkmtl": {"exponent": 0.5}, "ntkmtl_sr": {"num_chunks": 4}},
      learning_rate=3e-4,
      batch_size=256,
      num_epochs=15,
      lr_schedule="cosine",
      max_grad_norm=1.0,
      eval_batch_size=512,
      data=dict(image_size=64, num_attributes=40),
      metric_names=tuple(f"{a} F1" for a in ATTRIBUTES),
      higher_is_better=(True,) * 40,
      metric_tasks=tuple(range(40)),
      stl_row=None,
      paper_rows={"mr_delta_m": PAPER_MR_DELTA_M},
  )
