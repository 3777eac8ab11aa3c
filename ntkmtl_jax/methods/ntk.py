"""Registry entries for the NTK methods (implemented in `ntkmtl_jax.transform`)."""

from ntkmtl_jax import transform
from ntkmtl_jax.methods import register

register("ntkmtl", transform.ntkmtl)
register("ntkmtl_sr", transform.ntkmtl_sr)
