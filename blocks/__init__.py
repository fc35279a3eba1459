"""blockgraph's block library: every block registered in one registry, importable by plugins.

Each family module registers its blocks when imported; all modules of this package are imported here,
so adding a family is adding a file.
"""

import importlib
import pkgutil

from blockgraph.blocks.registry import REGISTRY, Block, BlockEntry, BlockParams, Port, RegistrationError, register
from blockgraph.blocks.types import (
    Dim,
    ShapeError,
    TensorType,
    dims_equal,
    expect_last,
    expect_same_shape,
    format_shape,
)

_INFRASTRUCTURE = {"registry", "stepping", "types"}
for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _module.name not in _INFRASTRUCTURE and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "REGISTRY",
    "Block",
    "BlockEntry",
    "BlockParams",
    "Dim",
    "Port",
    "RegistrationError",
    "ShapeError",
    "TensorType",
    "dims_equal",
    "expect_last",
    "expect_same_shape",
    "format_shape",
    "register",
]
