"""`python -m experiments.cityscapes.main [--config tiny] [--method ntkmtl | --methods stl,ls,ntkmtl
--seeds 0,1,2] [--data-dir DIR] [--workdir DIR] [--max-steps N]`."""

from __future__ import annotations

from experiments import common
from experiments.cityscapes import configs, train


def main(argv=None) -> list[dict]:
  return common.main("cityscapes", configs.get_config, train.create_pipeline, argv)


if __name__ == "__main__":
  main()
