"""Small shared utilities: atomic I/O (``io``), checks before work (``checks``), run folders (``runs``)."""
