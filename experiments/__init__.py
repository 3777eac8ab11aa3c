"""The paper's benchmarks, one folder each (flax-examples layout): CelebA, QM9, NYUv2,
Cityscapes and MultiMNIST.

    python -m experiments.qm9.main --method ntkmtl_sr --data-dir ~/tensorflow_datasets
    python -m experiments.nyuv2.main --config tiny --max-steps 3 --data-dir /data/nyuv2

Each folder has `input_pipeline.py` (data), `train.py` (metrics, the `Pipeline`,
`train_and_evaluate`), `configs/default.py` (the official hyper-parameters and the paper's
STL row) and `configs/tiny.py` (a smoke run), and `main.py` (the command line).
`experiments.common` holds the loop, checkpoints and reports they share.
"""
