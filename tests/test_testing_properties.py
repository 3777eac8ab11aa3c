"""One property suite over the whole registry: every claim of every method (its tags next
to its registration, `methods.claims`), and what every method must do, on hard cases.

A method registered later gets all of this by being registered; there is no list to edit.
The checks live in `ntkmtl_jax.testing.properties`; the claims run in float64, where they
hold to rounding, the rest in float32, what users run.
"""

import numpy as np
import pytest

from ntkmtl_jax import methods
from ntkmtl_jax.testing import cases, properties

from conftest import SEEDS, TanhMLP, check_end_to_end

CLAIMS = [(name, claim) for name in methods.names() for claim in methods.claims(name)]


def test_every_method_claims_known_properties():
  assert len(methods.names()) >= 28
  for name in methods.names():
    assert set(methods.claims(name)) <= set(methods.PROPERTIES), name
  # The claims the papers make, spot-checked against the registry.
  assert "non_conflicting" in methods.claims("mgda")
  assert "non_conflicting" in methods.claims("upgrad")
  assert "scale_invariant" in methods.claims("nash_mtl")
  assert "direction_scale_invariant" in methods.claims("ntkmtl")


@pytest.mark.parametrize("name,claim", CLAIMS, ids=[f"{n}-{c}" for n, c in CLAIMS])
def test_claimed_property(name, claim):
  # Every seed in one test, so that each method compiles once (NTKMTL_TEST_SEEDS applies).
  properties.check_claim(name, claim, properties.claim_cases(seeds=SEEDS))


@pytest.mark.parametrize("name", methods.names())
def test_jit_matches_eager(name):
  properties.check_jit_matches_eager(name)


@pytest.mark.parametrize("name", methods.names())
def test_state_keeps_its_shapes_and_dtypes(name):
  properties.check_state_stable(name)


@pytest.mark.parametrize("num_tasks", [1, 5])
@pytest.mark.parametrize("name", methods.names())
def test_finite_on_degenerate_inputs(name, num_tasks):
  # A zero gradient, identical tasks, two exactly opposite gradients, all gradients zero.
  properties.check_finite_on_degenerate(name, num_tasks)


@pytest.mark.parametrize(
  "name", [n for n in methods.names() if not methods.get(n, 3).needs.uses_representation]
)
@pytest.mark.one_seed
def test_trains_in_the_jitted_step_with_every_strategy(seed, name):
  # (MGDA-UB and NTKMTL-SR need a model split into encode and decode: tests/test_step.py.)
  rng = np.random.default_rng(seed)
  model = TanhMLP(rng, num_tasks=3, task_scales=rng.uniform(0.5, 2.0, 3))
  # SDMGrad's published iteration does not converge: it turns the strategies' rounding
  # differences into different weights; small steps make it a contraction.
  hparams = dict(learning_rate=0.05, momentum=0.0) if name == "sdmgrad" else {}
  method = methods.get(name, 3, shared=model.shared, **hparams)
  streams = method.needs.kind in ("gram", "sq_norms")
  check_end_to_end(seed, model, method, ("unroll", "streaming") if streams else ("unroll",))


# ------------------------------------------------------- the checks themselves can fail


@pytest.mark.parametrize(
  "name,claim",
  [
    ("ls", "non_conflicting"),  # the sum conflicts with a small opposed task
    ("ls", "scale_invariant"),  # the sum follows every task's scale
    ("stl", "permutation_equivariant"),  # STL trains task 0, wherever it is
    ("mgda", "linear_under_scaling"),  # the min-norm point is not linear in the scales
    ("imtl_g", "direction_scale_invariant"),
    ("pcgrad", "permutation_equivariant"),  # each task's random projection order
  ],
)
def test_a_false_claim_fails(name, claim):
  with pytest.raises(AssertionError):
    properties.check_claim(name, claim, properties.claim_cases(seeds=(0,)))


def test_a_non_finite_update_is_caught():
  # A method whose weights divide by a task's gradient norm gives inf on a zero gradient.
  import jax.numpy as jnp

  from ntkmtl_jax.method import Needs, Weighting
  from ntkmtl_jax.methods.loss_weighting import WeightsState

  def weights(stats, state):
    w = 1.0 / stats.sq_norms
    return w, WeightsState(state.count + 1, w.astype(jnp.float32))

  broken = Weighting(
    name="inverse",
    needs=Needs("sq_norms"),
    weights=weights,
    init=lambda p: WeightsState(jnp.zeros([], jnp.int32), jnp.ones(2)),
  )
  methods.register("inverse_norms", lambda num_tasks: broken)
  try:
    with pytest.raises(AssertionError, match="non-finite"):
      properties.check_finite_on_degenerate("inverse_norms", 2)
  finally:
    methods._REGISTRY.pop("inverse_norms")
    methods._CLAIMS.pop("inverse_norms")


def test_claim_cases_are_hard():
  spread = [
    np.ptp(np.log10(np.linalg.norm(c.jacobian, axis=1)))
    for c in properties.claim_cases()
    if c.family == "imbalanced"
  ]
  assert min(spread) > 3.9  # task scales 1 to 1e4
  assert {c.family for c in properties.claim_cases()} == set(properties.CLAIM_FAMILIES)
  assert set(cases.FAMILIES) - set(properties.CLAIM_FAMILIES) == {"zero_gradient", "rank_deficient"}


def test_the_docs_table_of_claims_is_the_registry():
  import pathlib

  page = pathlib.Path(__file__).parents[1] / "docs" / "methods" / "index.md"
  assert properties.claims_table() in page.read_text(), (
    "docs/methods/index.md's claims table differs from the registry: paste "
    "ntkmtl_jax.testing.properties.claims_table() there"
  )
