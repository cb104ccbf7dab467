"""falip's version: the one place it is written (pyproject.toml reads it; results JSON records it)."""

__version__ = "0.1.0"
