"""The one spelling of registry names (methods and benchmarks)."""


def canonical(name: str) -> str:
  """The registry form of a name: "NTKMTL-SR" -> "ntkmtl_sr", " MGDA " -> "mgda"."""
  return name.strip().lower().replace("-", "_")
