"""File helpers of the zero-shot readers: presence checks (-> :class:`MissingSetData`) and safe loaders."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Callable, Sequence

from umarvel.errors import DataError
from umarvel.utils.io import open_text
from umarvel.eval.zeroshot.types import MissingSetData, ZSItem


def require_file(set_name: str, path: Path) -> Path:
    """Return ``path`` if it is a file, else raise :class:`MissingSetData`."""
    if not path.is_file():
        raise MissingSetData(set_name, path)
    return path


def require_dir(set_name: str, path: Path) -> Path:
    """Return ``path`` if it is a folder, else raise :class:`MissingSetData`."""
    if not path.is_dir():
        raise MissingSetData(set_name, path)
    return path


def expect(cond: bool, path: Path, what: str) -> None:
    """Raise :class:`DataError` ``"<path>: <what>"`` unless ``cond``."""
    if not cond:
        raise DataError(f"{path}: {what}")


class _PlainUnpickler(pickle.Unpickler):
    """Unpickler limited to builtin containers and scalars (no code execution from a data file)."""

    _ALLOWED = {("builtins", n) for n in ("dict", "list", "tuple", "str", "int", "float", "set", "frozenset")}
    _ALLOWED |= {("collections", "OrderedDict"), ("collections", "defaultdict")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_plain_pickle(path: Path) -> Any:
    """Load a pickle holding only builtin containers / strings / numbers (e.g. MSVD ``raw-captions.pkl``)."""
    try:
        with path.open("rb") as fh:
            return _PlainUnpickler(fh).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: cannot read the pickle ({exc})") from None


def load_torch_plain(path: Path) -> Any:
    """``torch.load(weights_only=True)`` of a dict of lists / strings (CC-Neg ``ccneg_preprocessed.pt``)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise DataError(f"{path}: cannot read the torch file ({type(exc).__name__}: {exc})") from None


def read_text_first_line(path: Path) -> str:
    """First line of a UTF-8 text file, without the newline."""
    with open_text(path) as fh:
        return fh.readline().rstrip("\r\n")


def official_order(items: Sequence[ZSItem], key: Callable[[ZSItem], str]) -> tuple[tuple[ZSItem, ...], list[int]]:
    """Reorder candidates as an official script lists them (``sorted`` by ``key``): ``(items, new index of each
    old index)``. The order decides which items share an official batch (``compat="official"``)."""
    order = sorted(range(len(items)), key=lambda i: key(items[i]))
    new_of_old = [0] * len(items)
    for new, old in enumerate(order):
        new_of_old[old] = new
    return tuple(items[i] for i in order), new_of_old
