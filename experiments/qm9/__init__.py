"""QM9: 11 molecular property regressions with an MPNN on padded dense graphs."""
