"""A CelebA smoke run: 16x16 images, the first 4 attributes, a few batches of 8."""

from experiments.celeba.configs import default


def get_config():
  return default.get_config().replace(batch_size=8, num_epochs=1, max_steps=3, log_every=1,
                                      eval_batch_size=16,
                                      data=dict(image_size=16, num_attributes=4))
