"""blockgraph's block library: every block registered in one registry, importable by plugins."""

from blocks import attention, core, embedding, feedforward, generator, norm, positional
from blocks.registry import REGISTRY, Block, BlockEntry, BlockParams, Port, RegistrationError, register
from blocks.types import Dim, ShapeError, TensorType, dims_equal, expect_last, expect_same_shape, format_shape

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
    "attention",
    "core",
    "dims_equal",
    "embedding",
    "expect_last",
    "expect_same_shape",
    "feedforward",
    "format_shape",
    "generator",
    "norm",
    "positional",
    "register",
]
