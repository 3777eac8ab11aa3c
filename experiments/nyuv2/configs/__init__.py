"""Configs: `default` (the run reported in the docs) and `tiny` (a smoke run)."""


def get_config(name: str = "default"):
  from importlib import import_module
  return import_module(f"{__name__}.{name}").get_config()
