"""Exception hierarchy: every error a user can cause names the file, line, item or key at fault."""


class UMarvelError(Exception):
    """Base class of all errors raised deliberately by umarvel."""


class ConfigError(UMarvelError, ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, missing value)."""


class DataError(UMarvelError, ValueError):
    """An input record is malformed: bad JSONL/TSV line, unknown id, empty item, ..."""


class ImageLoadError(DataError):
    """An image is missing, unreadable or corrupt."""


class CheckpointError(UMarvelError, ValueError):
    """A checkpoint folder is missing, unsupported or inconsistent."""
