"""The type of every built model: an ordinary `nn.Module` that also carries its generated code and typed graph."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

if TYPE_CHECKING:
    from blockgraph.builder.shapes import TypedGraph


class GraphModel(nn.Module):
    """Base of every built model. `code` is the generated `forward`; submodules are named after spec nodes.

    Each spec compiles to its own subclass (builder.compile), whose `typed_graph` is the typed graph it was built
    from: what `inspect`, `save`, decoding and the trainer read about the model. `build` and `load` return it, and
    the code that needs the graph takes a `GraphModel`, never a bare `nn.Module` with an attribute to hope for.
    """

    code: ClassVar[str] = ""
    spec_name: ClassVar[str] = ""
    typed_graph: ClassVar[TypedGraph]

    @property
    def spec(self) -> dict[str, Any]:
        """The spec this model was built from, standalone (what `save` writes as spec.yaml)."""
        return self.typed_graph.graph.standalone

    def extra_repr(self) -> str:
        return f"spec={self.spec_name!r}"
