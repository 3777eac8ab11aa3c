"""MT10 reports: per-task success tables beside the paper's Table 4, JSON/CSV, and curves."""

from __future__ import annotations

import csv
import json
import os

import numpy as np

from ntkmtl_jax._optional import require
from ntkmtl_jax.benchmarks.mt10.config import PAPER_SUCCESS
from ntkmtl_jax.benchmarks.mt10.environments import TASK_NAMES


# Our method names for the paper's rows: LS on one shared SAC is the paper's "MTL SAC".
PAPER_NAMES = {"ls": "mtl_sac"}


def _jsonable(result: dict) -> dict:
  return {k: v for k, v in result.items() if k != "state"}


def per_task_table(rows: dict[str, list[float]], paper: bool = True) -> str:
  """Markdown: one row per run (per-task success and the mean), then the paper's means."""
  head = "| run | " + " | ".join(TASK_NAMES) + " | mean |\n"
  head += "| --- |" + " --- |" * (len(TASK_NAMES) + 1) + "\n"
  body = "".join(f"| {name} | " + " | ".join(f"{s:.2f}" for s in success) +
                 f" | {np.mean(success):.2f} |\n" for name, success in rows.items())
  if paper:
    body += "".join(f"| paper: {name} (10 seeds) | " + " | ".join("" for _ in TASK_NAMES) +
                    f" | {m:.2f} ± {se:.2f} |\n" for name, (m, se) in PAPER_SUCCESS.items())
  return head + body


def write_run_report(result: dict, workdir: str) -> None:
  """Writes results.json, history.csv, per_task.csv, report.md and success_curve.png."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(_jsonable(result), f, indent=1)
  history = result["history"]
  with open(os.path.join(workdir, "history.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["step", "env_steps", "mean_success", "mean_return"] +
               [f"success/{t}" for t in TASK_NAMES] + [f"return/{t}" for t in TASK_NAMES])
    for row in history:
      w.writerow([row["step"], row["env_steps"], row["mean_success"], row["mean_return"]] +
                 row["success"] + row["episode_return"])
  final = result["final"]
  with open(os.path.join(workdir, "per_task.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["task", "success", "episode_return"])
    for t, s, r in zip(TASK_NAMES, final["success"], final["episode_return"]):
      w.writerow([t, s, r])
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(f"# MT10, {result['method']}, seed {result['seed']}, step {final['step']}\n\n")
    f.write(per_task_table({result["method"]: final["success"]}))
  plot_curves({result["method"]: [result]}, os.path.join(workdir, "success_curve.png"))


def summarize(results: list[dict]) -> dict:
  """Mean and standard error over seeds of the final mean success, per method."""
  by_method: dict[str, list[dict]] = {}
  for r in results:
    by_method.setdefault(r["method"], []).append(r)
  out = {}
  for method, runs in by_method.items():
    finals = np.array([r["final"]["mean_success"] for r in runs])
    per_task = np.mean([r["final"]["success"] for r in runs], axis=0)
    out[method] = dict(mean_success=float(finals.mean()),
                       stderr=float(finals.std(ddof=1) / np.sqrt(len(finals)))
                       if len(finals) > 1 else 0.0,
                       seeds=[r["seed"] for r in runs], per_task_success=per_task.tolist(),
                       paper=PAPER_SUCCESS.get(PAPER_NAMES.get(method, method)))
  return out


def write_summary(results: list[dict], workdir: str) -> dict:
  """summary.json, summary.md (per-task table, mean ± stderr vs the paper), curves.png."""
  summary = summarize(results)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  lines = ["| method | seeds | mean success ± stderr | paper (Table 4) |",
           "| --- | --- | --- | --- |"]
  for method, s in summary.items():
    paper = f"{s['paper'][0]:.2f} ± {s['paper'][1]:.2f}" if s["paper"] else "-"
    lines.append(f"| {method} | {len(s['seeds'])} | {s['mean_success']:.2f} ± "
                 f"{s['stderr']:.2f} | {paper} |")
  with open(os.path.join(workdir, "summary.md"), "w") as f:
    f.write("\n".join(lines) + "\n\nPer task (mean over seeds):\n\n")
    f.write(per_task_table({m: s["per_task_success"] for m, s in summary.items()}))
  by_method: dict[str, list[dict]] = {}
  for r in results:
    by_method.setdefault(r["method"], []).append(r)
  plot_curves(by_method, os.path.join(workdir, "curves.png"))
  return summary


def plot_curves(runs_by_method: dict[str, list[dict]], path: str, title: str | None = None):
  """Mean evaluation success and return vs environment steps (mean over seeds)."""
  require("matplotlib", "plots", "the MT10 curves").use("Agg")  # files only: no display
  plt = require("matplotlib.pyplot", "plots")
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for method, runs in runs_by_method.items():
    steps = np.array([row["env_steps"] for row in runs[0]["history"]])
    length = min(len(r["history"]) for r in runs)
    for ax, key in zip(axes, ("mean_success", "mean_return")):
      values = np.array([[row[key] for row in r["history"][:length]] for r in runs])
      ax.plot(steps[:length], values.mean(0), marker="o", ms=3, label=f"{method} ({len(runs)} seed"
              f"{'s' if len(runs) > 1 else ''})")
  axes[0].set_ylabel("mean success (10 tasks)")
  axes[0].set_ylim(-0.05, 1.05)
  axes[1].set_ylabel("mean episode return")
  for ax in axes:
    ax.set_xlabel("environment steps (all tasks)")
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(title or "Meta-World MT10, multi-task SAC: deterministic-policy evaluation")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
