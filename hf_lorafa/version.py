"""The package version, in a leaf module: modules that record it need not import the package face."""

__version__ = "0.1.0"
