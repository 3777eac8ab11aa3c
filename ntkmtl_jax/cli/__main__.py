"""`python -m ntkmtl_jax.cli`: the `ntkmtl` command."""

import sys

from ntkmtl_jax.cli import main

sys.exit(main())
