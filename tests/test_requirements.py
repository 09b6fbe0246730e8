"""Every entry of requirements.txt is imported by the package (issue 10: used for what it does best, or removed)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: Distribution name -> the module the package imports (when they differ).
IMPORT_NAME = {"pillow": "PIL", "pyyaml": "yaml", "faiss-cpu": "faiss", "tensorboard": "torch.utils.tensorboard"}


def _requirements() -> list[str]:
    names = []
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(re.split(r"[<>=!~;\s\[]", line, maxsplit=1)[0].lower())
    return names


def _imported_modules() -> set[str]:
    """Every module named by an import statement anywhere in umarvel/ (top level or inside functions)."""
    out: set[str] = set()
    for path in (REPO / "umarvel").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                out.add(node.module)
    return out


def test_every_requirement_is_imported():
    imported = _imported_modules()
    unused = []
    for dist in _requirements():
        module = IMPORT_NAME.get(dist, dist.replace("-", "_"))
        if not any(m == module or m.startswith(module + ".") for m in imported):
            unused.append(f"{dist} (import {module})")
    assert not unused, f"requirements.txt lists packages umarvel never imports: {unused}"
