"""The package version, in a leaf module so that anything may read it without importing the package face."""

__version__ = "0.1.0"
