"""`python -m experiments.cityscapes.main [--config tiny] [--method ntkmtl] [--data-dir DIR]`."""

from __future__ import annotations

import sys

from experiments import common
from experiments.cityscapes import configs, train


def main(argv=None) -> dict:
  flags = common.parse_flags("cityscapes", argv)
  config = common.config_from_flags(flags, configs.get_config)
  try:
    results = train.train_and_evaluate(config, flags.workdir)
  except common.DatasetMissingError as error:
    sys.exit(str(error))
  print(common.results_table(config, [results]))
  return results


if __name__ == "__main__":
  main()
