"""blockgraph's builder: spec file → validated graph → shapes → compiled `nn.Module`."""

from blockgraph.builder.compile import compile_graph
from blockgraph.builder.graph import Graph, assemble
from blockgraph.builder.model import GraphModel
from blockgraph.builder.persist import load, save
from blockgraph.builder.pipeline import build, load_spec, typed_graph
from blockgraph.builder.shapes import TypedGraph, infer_shapes
from blockgraph.builder.trial import dummy_inputs, resolve_dims, trial_run
from blockgraph.common.errors import BlockgraphError, Location, PluginError, Problem, SpecError

__all__ = [
    "BlockgraphError",
    "Graph",
    "GraphModel",
    "Location",
    "PluginError",
    "Problem",
    "SpecError",
    "TypedGraph",
    "assemble",
    "build",
    "compile_graph",
    "dummy_inputs",
    "infer_shapes",
    "load",
    "load_spec",
    "resolve_dims",
    "save",
    "trial_run",
    "typed_graph",
]
