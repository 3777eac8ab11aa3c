"""`--methods all` and `ntkmtl list`: every registered method, by name."""

import pytest

from ntkmtl_jax import cli, methods
from ntkmtl_jax.cli import flags


def test_all_is_every_registered_method():
  assert flags.method_list(["all"]) == methods.names()
  assert flags.method_list(["ALL"]) == methods.names()
  # Named methods first, no repeats.
  assert flags.method_list(["ntkmtl", "all"]) == ["ntkmtl"] + [
    n for n in methods.names() if n != "ntkmtl"
  ]
  with pytest.raises(flags.UsageError, match="no_such"):
    flags.method_list(["all", "no_such"])


def test_list_shows_every_method(capsys):
  assert cli.main(["list"]) == 0
  rows = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
  assert set(methods.names()) <= set(rows)
  for name in ("krum", "trimmed_mean", "modo", "cr_mogm", "pivrg", "consmtl"):
    assert name in rows
