"""The PyTorch reference step on the CelebA network, for step_time.py to compare against.

Runs with a Python that has torch (CPU build), not in the project's environment:

    python -m venv /tmp/torch && /tmp/torch/bin/pip install torch==2.13.0 numpy
    /tmp/torch/bin/python perf/pytorch_reference.py --batch 32
    python perf/step_time.py --torch-python /tmp/torch/bin/python   # same table
    python perf/pytorch_reference.py --batch 256 --device cuda   # on a GPU

It re-states, from the paper and the authors' public code, what one training step does:
LS is one backward pass of the summed BCE losses; NTKMTL (n = 1) runs k backward passes
with `retain_graph`, copies each task's shared gradient into a (P, k) matrix, weights the
tasks by (trace(G^T G) / diag(G^T G)) ** 0.5, multiplies the combined gradient by k, clips
the shared gradient norm to 1.0, and lets the heads keep their accumulated (unweighted)
gradients; then Adam. Prints one JSON line of median step times. On a GPU (--device cuda)
each timed step ends with `torch.cuda.synchronize()`, like `block_until_ready` in JAX.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn


def celeba_network(num_tasks: int = 40):
  layers, in_channels = [], 3
  for out_channels, pool in (
    (64, True),
    (128, False),
    (128, True),
    (256, False),
    (256, True),
    (512, False),
    (512, False),
  ):
    layers += [
      nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
      nn.BatchNorm2d(out_channels),
      nn.ReLU(),
    ]
    if pool:
      layers.append(nn.MaxPool2d(2))
    in_channels = out_channels
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
  for _ in range(2):
    layers += [nn.Linear(512, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU()]
  encoder = nn.Sequential(*layers)
  heads = nn.ModuleList([nn.Linear(512, 1) for _ in range(num_tasks)])
  return encoder, heads


def task_losses(encoder, heads, x, y):
  z = encoder(x)
  return torch.stack(
    [
      nn.functional.binary_cross_entropy_with_logits(h(z)[:, 0], y[:, i])
      for i, h in enumerate(heads)
    ]
  )


def ls_step(encoder, heads, optimizer, x, y):
  optimizer.zero_grad()
  task_losses(encoder, heads, x, y).sum().backward()
  optimizer.step()


def ntkmtl_step(encoder, heads, optimizer, x, y, exponent=0.5, max_norm=1.0):
  optimizer.zero_grad()
  losses = task_losses(encoder, heads, x, y)
  shared = list(encoder.parameters())
  k = losses.shape[0]
  grads = torch.zeros(sum(p.numel() for p in shared), k, device=losses.device)
  for i in range(k):
    losses[i].backward(retain_graph=i < k - 1)
    grads[:, i] = torch.cat([p.grad.reshape(-1) for p in shared])
    for p in shared:
      p.grad = None
  sq_norms = (grads * grads).sum(0)
  weights = (sq_norms.sum() / (sq_norms + 1e-8)) ** exponent
  combined = (grads @ weights) * k
  offset = 0
  for p in shared:
    p.grad = combined[offset : offset + p.numel()].view_as(p).clone()
    offset += p.numel()
  torch.nn.utils.clip_grad_norm_(shared, max_norm)
  optimizer.step()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
  parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
  args = parser.parse_args(argv)
  if args.threads:
    torch.set_num_threads(args.threads)
  if args.device == "cuda" and not torch.cuda.is_available():
    parser.error("--device cuda: this torch build sees no CUDA device")
  device = torch.device(args.device)
  sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
  torch.manual_seed(0)
  encoder, heads = celeba_network()
  encoder, heads = encoder.to(device), heads.to(device)
  optimizer = torch.optim.Adam(list(encoder.parameters()) + list(heads.parameters()), lr=3e-4)
  x = torch.randn(args.batch, 3, 64, 64, device=device)
  y = torch.randint(0, 2, (args.batch, 40), device=device).float()
  result = {
    "torch": torch.__version__,
    "batch": args.batch,
    "device": args.device,
    "threads": torch.get_num_threads(),
  }
  if args.device == "cuda":
    result["device_name"] = torch.cuda.get_device_name()
  for name, step in (("ls", ls_step), ("ntkmtl", ntkmtl_step)):
    step(encoder, heads, optimizer, x, y)  # warm-up
    sync()
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      step(encoder, heads, optimizer, x, y)
      sync()
      times.append(time.perf_counter() - t0)
    result[name] = statistics.median(times)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
