"""Compile time of each method's train step, as a ratio to a plain optax step in one run.

    python perf/compile_time.py                       # every registered method, 5 repeats
    python perf/compile_time.py --methods ls,ntkmtl,mgda --repeats 9
    python perf/compile_time.py --methods ntkmtl --parts   # op counts per part of the step

The model is a 3-task MLP (flax linen: two dense layers of 64 on 16 inputs, three linear
heads, squared errors, one task ten times the others' scale), batch 32. The reference is
a plain optax step of the same model: `jax.value_and_grad` of the summed losses, then Adam.
Every method's step (`make_train_step`, its default strategy, the same Adam) and the
reference are built afresh for every compilation (new Python functions, so nothing is
traced or compiled once and reused), lowered and compiled (`.lower(...).compile()`) with
the persistent compilation cache off. The rows are interleaved, reference first, --repeats
times over; the table gives medians, and each method's ratio to the reference's median in
wall time and in process CPU time (the machine may be shared: CPU time varies less with
the load). Besides the time, the size of the computation: operations in the lowered
StableHLO module and instructions in XLA's optimised HLO module.

--parts lists, for each method, the optimised module's instructions by the part of the
step they come from (the `jax.named_scope` names of `ntkmtl_jax.step`: oracle, weights,
update, optimizer, finite_gate, metrics), which is where to look when a step compiles slowly.
"""

from __future__ import annotations

import argparse
import collections
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ntkmtl_jax as nm
from ntkmtl_jax.models.multitask import LinearHeads, task_functions

NUM_TASKS, BATCH, FEATURES, WIDTH = 3, 32, 16, 64
REFERENCE = "plain optax"
# Rows beyond the registry's defaults (label, registry name, hyper-parameters, strategy).
EXTRA_ROWS = (
  ("ntkmtl n=4", "ntkmtl", {"num_chunks": 4}, "auto"),
  ("ntkmtl sequential", "ntkmtl", {}, "sequential"),
)


def mlp_functions():
  import flax.linen as nn

  class Encoder(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
      for _ in range(2):
        x = nn.relu(nn.Dense(WIDTH)(x))
      return x

  scale = jnp.asarray([10.0] + [1.0] * (NUM_TASKS - 1))  # one dominant task
  return task_functions(
    Encoder(),
    LinearHeads(NUM_TASKS),
    lambda out, b: scale * jnp.mean((out - b["y"]) ** 2, axis=0),
  )


def make_case(seed: int = 0):
  rng = np.random.default_rng(seed)
  fns = mlp_functions()
  batch = {
    "x": jnp.asarray(rng.normal(size=(BATCH, FEATURES)), jnp.float32),
    "y": jnp.asarray(rng.normal(size=(BATCH, NUM_TASKS)), jnp.float32),
  }
  params, model_state = fns.init(jax.random.key(seed), batch)
  return fns, params, model_state, batch


def reference_lowered(fns, params, model_state, batch):
  """The plain optax step of the same model, built afresh and lowered."""
  tx = optax.adam(1e-3)

  def step(params, opt_state, batch):
    loss = lambda p: jnp.sum(fns.loss_fn(p, model_state, batch)[0])
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  return jax.jit(step).lower(params, tx.init(params), batch)


def method_lowered(fns, name, hparams, strategy, params, model_state, batch):
  """The train step of one method, built afresh and lowered."""
  method = nm.methods.get(name, NUM_TASKS, shared=fns.shared, **hparams)
  step = nm.make_train_step(
    fns.loss_fn,
    method,
    optax.adam(1e-3),
    strategy=strategy,
    has_state=True,
    encode=fns.encode,
    decode=fns.decode,
  )
  return step.lower(step.init(params, model_state), batch)


def compile_once(lower):
  """(wall s, CPU s, StableHLO ops, optimised HLO instructions, optimised HLO text)."""
  t0, c0 = time.perf_counter(), time.process_time()
  lowered = lower()
  compiled = lowered.compile()
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  text = compiled.as_text()
  return wall, cpu, stablehlo_ops(lowered.as_text()), hlo_instructions(text), text


_STABLEHLO_OP = re.compile(r"^\s*(?:%\S+(?:, %\S+)* = )?\"?(?:stablehlo|chlo|mhlo|func)\.")
_HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = ")


def stablehlo_ops(text: str) -> int:
  """Operations in a lowered module (every func's body included)."""
  return sum(1 for line in text.splitlines() if _STABLEHLO_OP.match(line))


def hlo_instructions(text: str) -> int:
  """Instructions in an optimised HLO module (every computation included)."""
  return sum(1 for line in text.splitlines() if _HLO_INSTRUCTION.match(line))


PARTS = ("oracle", "weights", "update", "optimizer", "finite_gate", "metrics")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def instructions_by_part(text: str) -> dict[str, int]:
  """Optimised HLO instructions counted by the step's named scope they come from."""
  counts = collections.Counter()
  for line in text.splitlines():
    if not _HLO_INSTRUCTION.match(line):
      continue
    match = _OP_NAME.search(line)
    path = match.group(1).split("/") if match else []
    part = next((p for p in reversed(path) if p in PARTS), "other")  # the innermost
    counts[part] += 1
  return dict(counts)


def rows_for(selected):
  rows = [(name, name, {}, "auto") for name in nm.methods.names()]
  rows += list(EXTRA_ROWS)
  if selected:
    rows = [r for r in rows if r[0] in selected or r[1] in selected]
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--methods", default="", help="comma-separated registry names or row labels (default: all)"
  )
  parser.add_argument("--repeats", type=int, default=5, help="compilations of each row")
  parser.add_argument("--parts", action="store_true", help="instructions per part of the step")
  args = parser.parse_args()
  jax.config.update("jax_enable_compilation_cache", False)
  selected = {m.strip() for m in args.methods.split(",") if m.strip()}
  rows = rows_for(selected)
  if selected and not rows:
    raise SystemExit(f"No method among {sorted(selected)}; known: {nm.methods.names()}.")
  fns, params, model_state, batch = make_case()
  lowerings = {REFERENCE: lambda: reference_lowered(fns, params, model_state, batch)}
  for label, name, hparams, strategy in rows:
    lowerings[label] = lambda name=name, hparams=hparams, strategy=strategy: method_lowered(
      fns, name, hparams, strategy, params, model_state, batch
    )
  compile_once(lowerings[REFERENCE])  # jax's own first-use costs, outside the table
  results = collections.defaultdict(list)
  texts = {}
  for _ in range(args.repeats):
    for label, lower in lowerings.items():  # interleaved: the load falls on every row alike
      wall, cpu, ops, instructions, texts[label] = compile_once(lower)
      results[label].append((wall, cpu, ops, instructions))
  print(
    f"Compile time of the train step, {NUM_TASKS}-task MLP, batch {BATCH}, "
    f"{jax.default_backend()}, jax {jax.__version__}; medians of {args.repeats} fresh "
    "compilations; ratios to the plain optax step (value_and_grad + Adam)\n"
  )
  print("| method | wall s | / optax | CPU s | / optax | StableHLO ops | HLO instructions |")
  print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
  ref_wall = statistics.median(r[0] for r in results[REFERENCE])
  ref_cpu = statistics.median(r[1] for r in results[REFERENCE])
  for label, values in results.items():
    wall = statistics.median(v[0] for v in values)
    cpu = statistics.median(v[1] for v in values)
    print(
      f"| {label} | {wall:.3f} | {wall / ref_wall:.2f} | {cpu:.3f} | {cpu / ref_cpu:.2f} "
      f"| {values[-1][2]} | {values[-1][3]} |"
    )
  if args.parts:
    print("\nOptimised HLO instructions by part of the step\n")
    print("| method | " + " | ".join(PARTS + ("other",)) + " |")
    print("| --- |" + " ---: |" * (len(PARTS) + 1))
    for label, text in texts.items():
      if label == REFERENCE:
        continue
      counts = instructions_by_part(text)
      print(f"| {label} | " + " | ".join(str(counts.get(p, 0)) for p in PARTS + ("other",)))


if __name__ == "__main__":
  main()
