"""Meta-World MT10 with multi-task SAC (the paper's Table 4), in JAX."""
