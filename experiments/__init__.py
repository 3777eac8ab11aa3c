"""The paper's benchmarks, one folder each (flax-examples layout): CelebA, QM9, NYUv2,
Cityscapes and MultiMNIST. This folder is part of the repository, not of the installed
package: the data pipelines, metrics, models and the training loop live in `ntkmtl_jax`
(`ntkmtl_jax.benchmarks.<name>`, `ntkmtl_jax.training`).

    python -m experiments.qm9.main --method ntkmtl_sr --data-dir ~/tensorflow_datasets
    python -m experiments.nyuv2.main --config tiny --max-steps 3 --data-dir /data/nyuv2

Each folder has `configs/default.py` (the official protocol), `configs/tiny.py` (a smoke
run), `train.py` (`train_and_evaluate(config, workdir)`) and `main.py` (the command line).
"""
