"""CelebA: 40 binary face attributes from 64x64 images (the paper's 7-conv network)."""
