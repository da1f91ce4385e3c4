"""The fuzzfarm command line."""
