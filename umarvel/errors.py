"""Exception hierarchy: every error a user can cause names the file, line, item or key at fault.

One class per kind of problem; the CLI (:func:`umarvel.commands.dispatch`) prints any of them as one line
``umarvel: error: ...`` with exit code 2 (``--debug`` adds the traceback)::

    UMarvelError
    ├── ConfigError          a config file / override / flag is invalid
    │   └── RunConflictError  the output folder holds another run (other config) or is in use (lock)
    ├── DataError            an input record or file is malformed (file:line, id)
    │   └── ImageLoadError   an image is missing, unreadable or corrupt
    ├── CheckpointError      a checkpoint folder is missing, unsupported or inconsistent
    ├── EnvError             the machine cannot do what was asked (no CUDA for --device cuda, ...)
    └── FileAccessError      a file or folder cannot be read or written (permission, not a folder, disk full)
"""


class UMarvelError(Exception):
    """Base class of all errors raised deliberately by umarvel."""


class ConfigError(UMarvelError, ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, missing value)."""


class RunConflictError(ConfigError):
    """The output folder belongs to another run (a different config) or another process is writing it."""


class DataError(UMarvelError, ValueError):
    """An input record is malformed: bad JSONL/TSV line, unknown id, empty item, ..."""


class ImageLoadError(DataError):
    """An image is missing, unreadable or corrupt."""


class CheckpointError(UMarvelError, ValueError):
    """A checkpoint folder is missing, unsupported or inconsistent."""


class EnvError(UMarvelError, RuntimeError):
    """The environment cannot run the request: a device that is not there, a missing optional package."""


class FileAccessError(UMarvelError, OSError):
    """A file or folder cannot be read or written (permission denied, a file where a folder is expected,
    disk full); the message names the path and says what was kept."""
