"""Small shared utilities (I/O, logging)."""
