"""The package version (one place; ``umarvel.__version__`` and every ``umarvel.json`` read it)."""
__version__ = "0.1.0"
