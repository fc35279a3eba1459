"""blockgraph: a model architecture written as a YAML or JSON spec, turned into a runnable PyTorch model.

`from blockgraph import build, load_spec, save, load` is the Python API; the layers are the subpackages
`blockgraph.common` < `blockgraph.blocks` < `blockgraph.builder` < `blockgraph.trainer` < `blockgraph.cli`.
The names below are imported on first use, so that `import blockgraph` (and `blockgraph --help`) stays
free of torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blockgraph.builder.persist import load, save
    from blockgraph.builder.pipeline import build, load_spec, typed_graph

_HOMES = {
    "build": "blockgraph.builder.pipeline",
    "load_spec": "blockgraph.builder.pipeline",
    "typed_graph": "blockgraph.builder.pipeline",
    "save": "blockgraph.builder.persist",
    "load": "blockgraph.builder.persist",
}

__all__ = ["build", "load", "load_spec", "save", "typed_graph"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'blockgraph' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
