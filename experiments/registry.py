"""The paper's benchmarks as `ntkmtl_jax.benchmarks.Benchmark`s, for the `ntkmtl` command.

    ntkmtl train --benchmark qm9 --method ntkmtl_sr --option data_dir=~/tensorflow_datasets
    ntkmtl compare --benchmark multimnist --option config=tiny

Each factory takes `config` ("default": the official hyper-parameters, or "tiny"),
`data_dir`, and any data option of the benchmark's config (e.g. `image_size=32` for
CelebA, `val_size=5000` for MultiMNIST). The `ntkmtl` loop is step-based: the benchmark's
`defaults["steps"]` is the official number of epochs times the steps per epoch, its
learning rate is constant (or cosine for CelebA) and it scores the final model on the
test split. The per-benchmark commands (`python -m experiments.<name>.main`) run the full
protocol instead: per-epoch schedules (step, plateau), model selection on the validation
split, orbax checkpoints and resume, and Delta m % against the paper's STL row.

`register_all()` adds the five names to `ntkmtl_jax.benchmarks` (resolved lazily).
"""

from __future__ import annotations

import importlib

import jax

from experiments import common

NAMES = ("celeba", "qm9", "nyuv2", "cityscapes", "multimnist")
DESCRIPTIONS = {
    "celeba": "CelebA: 40 binary face attributes (F1), the paper's 7-conv network",
    "qm9": "QM9: 11 molecular properties (MAE, paper units), MPNN on dense graphs",
    "nyuv2": "NYUv2: segmentation, depth, surface normals, SegNet-MTAN (MTAN .npy layout)",
    "cityscapes": "Cityscapes: 7-class segmentation and depth, SegNet-MTAN (MTAN .npy layout)",
    "multimnist": "MultiMNIST: left and right digit of two overlaid MNIST digits, LeNet",
}
DEFAULT_METHODS = ("stl", "ls", "ntkmtl", "ntkmtl_sr", "famo", "fairgrad", "nash_mtl")


def build(name: str, *, config: str = "default", data_dir: str | None = None,
          **data_options):
  """The `Benchmark` of experiment `name` (raises `DatasetMissingError` without its data)."""
  from ntkmtl_jax.benchmarks import Benchmark
  configs = importlib.import_module(f"experiments.{name}.configs")
  train = importlib.import_module(f"experiments.{name}.train")
  cfg = configs.get_config(str(config))
  cfg = cfg.replace(data_dir=str(data_dir) if data_dir else cfg.data_dir,
                    data={**cfg.data, **data_options})
  pipeline = train.create_pipeline(cfg)
  predict = jax.jit(pipeline.functions.predict)
  test = pipeline.test if pipeline.test is not None else pipeline.val

  def evaluate(params, model_state):
    return common.evaluate(pipeline, predict, params, model_state, test, cfg.eval_batch_size)

  steps = cfg.num_epochs * max(len(pipeline.train) // cfg.batch_size, 1)
  if cfg.max_steps is not None:
    steps = min(steps, cfg.max_steps)
  defaults = dict(steps=steps, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                  max_grad_norm=cfg.max_grad_norm,
                  schedule="cosine" if cfg.lr_schedule == "cosine" else "constant",
                  hparams=dict(cfg.method_hparams), methods=DEFAULT_METHODS)
  return Benchmark(
      name=name, description=DESCRIPTIONS[name], task_names=tuple(pipeline.task_names),
      metric_names=tuple(cfg.metric_names), higher_is_better=tuple(cfg.higher_is_better),
      metric_tasks=tuple(cfg.metric_tasks), functions=pipeline.functions,
      train_data=lambda seed, batch_size: common.endless_batches(pipeline.train, batch_size,
                                                                 seed),
      evaluate=evaluate, defaults=defaults)


def celeba(**options):
  """CelebA (tfds `celeb_a`): options `config`, `data_dir`, `image_size`, `num_attributes`."""
  return build("celeba", **options)


def qm9(**options):
  """QM9 (tfds `qm9`): options `config`, `data_dir`, `test_size`, `val_size`, `split_seed`."""
  return build("qm9", **options)


def nyuv2(**options):
  """NYUv2 (MTAN layout): options `config`, `data_dir`, `augment`."""
  return build("nyuv2", **options)


def cityscapes(**options):
  """Cityscapes (MTAN layout): options `config`, `data_dir`, `augment`."""
  return build("cityscapes", **options)


def multimnist(**options):
  """MultiMNIST (tfds `mnist`): options `config`, `data_dir`, `val_size`, `data_seed`."""
  return build("multimnist", **options)


def register_all():
  """Registers the five benchmarks with `ntkmtl_jax.benchmarks` (idempotent)."""
  from ntkmtl_jax import benchmarks
  for name in NAMES:
    if name not in benchmarks.benchmark_names():
      benchmarks.register_benchmark(name, f"experiments.registry:{name}")
