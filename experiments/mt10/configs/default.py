"""The paper's MT10 setting: MTRL multi-task SAC, batch 1280 (128 per task), 2M steps."""

from experiments.mt10.configs import MT10Config


def get_config() -> MT10Config:
  return MT10Config()
