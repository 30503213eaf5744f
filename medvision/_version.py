"""The package version (one place; setup reads it from here too)."""

__version__ = "0.1.0"
