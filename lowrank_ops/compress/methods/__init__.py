"""One module per compression method; each registers its `CompressionMethod` with `register_method` when imported.
`lowrank_ops.compress` imports every module here (`import_all`), so adding a method adds a file, not an import."""

from __future__ import annotations

import importlib
import pkgutil


def import_all() -> list[str]:
    """Import every method module of this package; returns their names."""
    names = [info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")]
    for name in names:
        importlib.import_module(f"{__name__}.{name}")
    return names
