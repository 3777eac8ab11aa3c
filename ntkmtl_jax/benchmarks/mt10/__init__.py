"""Meta-World MT10 with multi-task SAC (the paper's Table 4), in JAX.

    from ntkmtl_jax.benchmarks import mt10
    results = mt10.run(mt10.get_config("tiny"), ["ls", "ntkmtl"], [0], "runs/mt10_tiny")

One actor and two critics shared by the ten tasks; any method of `ntkmtl_jax.methods`
aggregates the ten per-task losses of each (`ls` is MT-SAC). The modules: `config`
(`MT10Config`, `PRESETS`, the paper's numbers), `environments` (the ten Meta-World tasks,
the per-task replay buffer), `sac` (networks, losses, the jitted update), `loop`
(`train_and_evaluate`, `run`, checkpoints) and `report` (tables, JSON/CSV, curves).

Running needs the `rl` extra (Meta-World, gymnasium: `pip install -e '.[rl]'` in a checkout), the
checkpoints orbax (the `data` extra) and the curves matplotlib (`plots`); they are imported
when used, so importing this package needs none of them.
"""

from ntkmtl_jax.benchmarks.mt10.config import PAPER_SUCCESS, PRESETS, MT10Config, get_config
from ntkmtl_jax.benchmarks.mt10.loop import run, train_and_evaluate

__all__ = ["MT10Config", "PAPER_SUCCESS", "PRESETS", "get_config", "run", "train_and_evaluate"]
