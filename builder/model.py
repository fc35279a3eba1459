"""The base class of every built model: an ordinary `nn.Module` that also carries its generated code and graph."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn


class GraphModel(nn.Module):
    """Base of every built model. `code` is the generated `forward`; submodules are named after spec nodes.

    Each spec compiles to its own subclass (builder.compile), whose `typed_graph` is the typed graph it was built
    from: what `inspect`, `save` and the trainer read about the model.
    """

    code: ClassVar[str] = ""
    spec_name: ClassVar[str] = ""
    typed_graph: ClassVar[Any] = None

    def extra_repr(self) -> str:
        return f"spec={self.spec_name!r}"
