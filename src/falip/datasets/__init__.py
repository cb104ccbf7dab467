"""Loaders for the data formats users already have (one module per dataset family)."""
