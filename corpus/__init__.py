"""Seed corpus: LIEF-built ELF inputs for the farm."""
