"""Fingerprints: probe sets, representations of a model's response, and baselines."""
