"""The method registry (methods/__init__.py): the registered names and their published
defaults, the names and hyper-parameters it refuses, and what holds for every registered
Gram-based method and its solver (products at full precision). Every claim of every
registered method is checked in test_testing_properties.py."""

import jax
import jax.numpy as jnp
import pytest

import ntkmtl_jax as nm
from ntkmtl_jax import methods
from ntkmtl_jax.method import TaskStats
from ntkmtl_jax.methods import solvers

# ------------------------------------------------------------------------ registration


def test_registered_with_published_defaults():
  assert {"upgrad", "dualproj", "aligned_mtl", "config", "gradvac", "sdmgrad", "moco"} <= set(
    methods.names()
  )
  assert methods.defaults("gradvac")["beta"] == 0.01
  assert methods.defaults("aligned_mtl")["scale_mode"] == "min"
  assert methods.defaults("upgrad")["reg_eps"] == 1e-4
  assert methods.defaults("moco")["gamma"] == 0.1
  assert methods.defaults("sdmgrad")["lamda"] == 0.3
  assert methods.defaults("sdmgrad")["solver"] == "authors"
  assert methods.get("moco", 2).needs.kind == "gradients"


def test_published_defaults():
  assert methods.defaults("famo")["learning_rate"] == 0.025
  assert methods.defaults("famo")["gamma"] == 0.01
  assert methods.defaults("uw")["learning_rate"] == 0.025
  assert methods.defaults("stch")["mu"] == 1.0 and methods.defaults("stch")["warmup_epochs"] == 4
  assert methods.defaults("db_mtl")["beta"] == 0.9


def test_registry_refuses_unknown_names_and_non_finite_hyperparameters():
  with pytest.raises(ValueError, match="Unknown method 'nope'"):
    nm.methods.get("nope", 3)
  with pytest.raises(ValueError, match="has no hyper-parameter"):
    nm.methods.get("ntkmtl", 3, exponnent=0.5)
  for name, hp in (
    ("cagrad", dict(c=float("nan"))),
    ("ntkmtl", dict(exponent=float("inf"))),
    ("graddrop", dict(leak=[0.0, float("nan"), 0.0])),
  ):
    with pytest.raises(ValueError, match="must be finite"):
      nm.methods.get(name, 3, **hp)
  with pytest.raises(ValueError, match="task must be in"):
    nm.methods.get("stl", 3, task=7)
  assert nm.methods.get("cagrad", 3, c=0.0).hparams["c"] == 0.0


def assert_products_at_full_precision(lowered):
  dots = [line for line in lowered.as_text().splitlines() if "dot_general" in line]
  assert dots and all("HIGHEST" in line for line in dots), [d for d in dots if "HIGHEST" not in d][
    :2
  ]


# Every registered weighting of the Gram matrix but IMTL-G (a linear solve), the methods on
# IMTL-G (imtl, log_imtl), PCGrad and Krum (elementwise sums and distances read off G), which
# form no matrix product.
GRAM_PRODUCTS = tuple(
  n
  for n in methods.names()
  if n not in ("imtl_g", "imtl", "log_imtl", "pcgrad", "krum")
  and methods.get(n, 3).needs.kind in ("gram", "representation_gram")
)


@pytest.mark.parametrize("name", GRAM_PRODUCTS)
def test_solver_products_run_at_full_precision(name):
  # TPUs (bf16 passes) and TF32 GPUs would otherwise round the k x k products far above
  # the solvers' tolerances.
  agg = methods.get(name, 3)
  stats = TaskStats(gram=jnp.eye(3), losses=jnp.ones(3), key=jax.random.key(0))
  assert_products_at_full_precision(jax.jit(agg.weights).lower(stats, agg.init(None)))


@pytest.mark.parametrize(
  "solve",
  [
    solvers.min_norm_point,
    lambda g: solvers.simplex_minimize(lambda w: w @ (g @ w), jnp.full(3, 1.0 / 3)),
    solvers.power_balance,
    lambda g: solvers.nonnegative_qp(g, jnp.ones(3)),
  ],
)
def test_solvers_run_at_full_precision_wherever_called(solve):
  assert_products_at_full_precision(jax.jit(solve).lower(jnp.eye(3)))
