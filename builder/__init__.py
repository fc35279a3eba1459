"""blockgraph's builder: spec file → validated graph → shapes → compiled `nn.Module`."""

from builder.compile import compile_graph
from builder.graph import Graph, assemble
from builder.model import GraphModel
from builder.persist import load, save
from builder.pipeline import build, load_spec, typed_graph
from builder.shapes import TypedGraph, infer_shapes
from builder.trial import dummy_inputs, resolve_dims, trial_run
from common.errors import BlockgraphError, Location, PluginError, Problem, SpecError

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
