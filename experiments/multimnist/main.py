"""`python -m experiments.multimnist.main [--config tiny] [--method ntkmtl | --methods stl,ls,ntkmtl
--seeds 0,1,2] [--data-dir DIR] [--workdir DIR] [--max-steps N]`."""

from __future__ import annotations

from experiments.multimnist import configs
from ntkmtl_jax import cli


def main(argv=None) -> list:
  return cli.experiment_main("multimnist", configs.get_config, argv)


if __name__ == "__main__":
  main()
