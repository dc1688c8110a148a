"""Provenance Harness: score training-data attribution methods against planted data."""

__version__ = "0.1.0"
