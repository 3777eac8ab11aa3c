"""`python -m experiments.mt10.main [--config default|short|tiny] [--methods ls,ntkmtl,nash_mtl]
[--seeds 0,1,...] [--workdir DIR] [--num-train-steps N] [--per-task-alpha]`

Trains multi-task SAC on Meta-World MT10 with each method and seed (into
`WORKDIR/<method>/seed_<s>`, resuming from checkpoints found there) and writes a summary
(mean ± standard error over seeds, per-task success, curves) next to the paper's Table 4.
"""

from __future__ import annotations

import argparse
import os

from experiments.mt10 import configs, report
from experiments.mt10.train import train_and_evaluate

__all__ = ["main", "train_and_evaluate"]


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m experiments.mt10.main", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="default", help="default (paper), short or tiny")
  p.add_argument("--method", default=None, help="one method (same as --methods NAME)")
  p.add_argument("--methods", default=None, help="comma-separated ntkmtl_jax.methods names")
  p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the config's)")
  p.add_argument("--workdir", default=None, help="where runs, checkpoints and reports go")
  p.add_argument("--num-train-steps", type=int, default=None)
  p.add_argument("--eval-freq", type=int, default=None)
  p.add_argument("--per-task-alpha", action="store_true",
                 help="one learnt temperature per task (MTRL's disentangled alpha)")
  p.add_argument("--no-progress", action="store_true")
  return p.parse_args(argv)


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  config = configs.get_config(args.config)
  changes = {}
  if args.num_train_steps is not None:
    changes["num_train_steps"] = args.num_train_steps
  if args.eval_freq is not None:
    changes["eval_freq"] = args.eval_freq
  if args.per_task_alpha:
    changes["per_task_alpha"] = True
  config = config.replace(**changes)
  methods = (args.methods or args.method or config.method).split(",")
  seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [config.seed]
  results = []
  for method in methods:
    for seed in seeds:
      workdir = os.path.join(args.workdir, method, f"seed_{seed}") if args.workdir else None
      result = train_and_evaluate(config.replace(method=method.strip(), seed=seed), workdir,
                                  progress=not args.no_progress)
      final = result["final"]
      print(f"{method} seed {seed}: mean success {final['mean_success']:.2f}, mean return "
            f"{final['mean_return']:.1f} ({result['seconds']:.0f} s)", flush=True)
      results.append(result)
  if args.workdir:
    summary = report.write_summary(results, args.workdir)
    print(open(os.path.join(args.workdir, "summary.md")).read())
  else:
    print(report.per_task_table({f"{r['method']} seed {r['seed']}": r["final"]["success"]
                                 for r in results}))
  return results


if __name__ == "__main__":
  main()
